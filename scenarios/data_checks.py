"""Checks on a user's own files, run once per load so that bad data stops a run before training.

Each check is vectorised over a whole split and raises :class:`~clpeft.errors.UserError` as one
line naming the file, the problem (with a count and the first offender) and the fix: text that
is not UTF-8, malformed CSV, non-finite features, labels that are not whole numbers or lie
outside ``class_names``, classes missing from one split, and list-file entries that point
outside their folder.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clpeft.errors import UserError

KEY = "scenario.root"


def listed(items: Sequence) -> str:
    """The first five items, comma-separated, and how many more there are."""
    shown = ", ".join(str(i) for i in items[:5])
    return shown if len(items) <= 5 else f"{shown} (+{len(items) - 5} more)"


# ------------------------------------------------------------------ text files


def read_text(path: Path) -> str:
    """A UTF-8 file's text, without a byte-order mark; another encoding is refused naming the line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", key=KEY) from None
    body = data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{body[exc.start]:02x}); save the file as UTF-8", key=KEY) from None


def csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and ``(line number, row)`` of every non-empty row of a CSV file.

    A row has every header column (``None`` where it is short), as :class:`csv.DictReader` gives.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    rows, start = [], 1
    try:
        header = next(reader, [])
        start = reader.line_num + 1
        for fields in reader:
            if fields:
                rows.append((start, {c: fields[i] if i < len(fields) else None for i, c in enumerate(header)}))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(
            f"{path}:{start}: not valid CSV ({exc}); fix that line, or store the data as JSONL (no field-size limit)", key=KEY
        ) from None
    return header, rows


# ------------------------------------------------------------------ arrays and labels


def finite_rows(x: torch.Tensor, source: str) -> None:
    """Every row of float features is finite (NaN, inf and values past float32's range are refused)."""
    if x.numel() == 0:
        return
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    count = int(bad.sum())
    if count:
        raise UserError(
            f"{source}: {count} of {len(x)} rows hold NaN, inf or a value past float32's range "
            f"(first: row {int(bad.nonzero()[0])}, counting from 0); remove or fix those rows",
            key=KEY,
        )


def label_values(labels, source: str, key: str = KEY) -> np.ndarray:
    """One label per sample: ``int64`` for numbers (whole numbers only), ``str`` for text."""
    values = np.asarray(labels)
    if values.ndim != 1:
        raise UserError(f"{source}: labels must be one value per sample, got shape {values.shape}", key=key)
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind in "US":
        return values.astype(str)
    if values.dtype.kind != "f":
        raise UserError(f"{source}: labels must be integers or strings, got dtype {values.dtype}", key=key)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(values) & (np.round(values) == values) & (np.abs(values) < 2.0**62))
    count = int(bad.sum())
    if count:
        first = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{source}: {count} of {len(values)} labels are not whole numbers (first: {values[first]} "
            f"at row {first}); labels must be integers or strings",
            key=key,
        )
    return values.astype(np.int64)


def ids_in_range(ids: np.ndarray, n_classes: int, source: str) -> None:
    """Integer labels are ids into ``class_names``: ``0 <= id < n_classes``."""
    bad = (ids < 0) | (ids >= n_classes)
    count = int(bad.sum())
    if count:
        first = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{source}: {count} of {len(ids)} labels lie outside 0..{n_classes - 1}, the ids of its "
            f"{n_classes} class_names (first: {ids[first]} at row {first}); fix the labels or class_names",
            key=KEY,
        )


def unique_names(names: Sequence[str], source: str) -> None:
    """Class names are distinct."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"{source}: class_names holds '{name}' twice; class names must be unique", key=KEY)
        seen.add(name)


def every_class_in_both(train_ids, test_ids, names: Sequence[str], train_source: str, test_source: str) -> None:
    """Each class has training and test samples (an experience without test data cannot be scored)."""
    for ids, source in ((train_ids, train_source), (test_ids, test_source)):
        counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(names))
        missing = [names[c] for c in np.flatnonzero(counts == 0)]
        if missing:
            raise UserError(
                f"{source}: no samples of classes {listed(missing)}; every class needs samples in both "
                f"{train_source} and {test_source}: add some, or remove the class",
                key=KEY,
            )


# ------------------------------------------------------------------ paths from list files


def inside(root: Path, entry: str, where: str) -> Path:
    """``root / entry`` for an ``entry`` (read at ``where``: a list file and line) that stays inside ``root``."""
    normal = os.path.normpath(entry)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(f"..{os.sep}"):
        raise UserError(f"{where}: '{entry}' points outside {root}; list files must name files inside it", key=KEY)
    return root / normal
