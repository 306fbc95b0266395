"""A user's arrays: ``.npz``/``.npy`` files of images or precomputed features, with labels.

``uint8`` arrays are images (``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``, stored channels
first); any other integer or float array holds features, read as ``float32``. Every array is
checked once as it is read (:mod:`clpeft.scenarios.data_checks`): features must be finite,
labels whole numbers or strings, ids inside ``class_names``, and every class present in both
splits, so bad data stops the run before training with the file, the count and the first
offending row.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from clpeft.data import ArrayDataset
from clpeft.errors import UserError
from clpeft.scenarios import data_checks
from clpeft.scenarios.data_checks import KEY
from clpeft.scenarios.folder_datasets import check_split_options, require_dir, split_per_class

#: What reading a damaged ``.npy``/``.npz`` raises (zip and zlib errors are not OSErrors).
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


class _Split(NamedTuple):
    inputs: np.ndarray
    labels: np.ndarray
    source: str  # the file(s), for messages
    class_names: list[str] | None  # stored in the .npz, or None


def _unreadable(path: Path, exc: Exception, key: str = KEY) -> UserError:
    return UserError(f"cannot read {path}: {exc}; write the file again (np.savez / np.save)", key=key)


def _read_npz(path: Path, inputs_key: str, labels_key: str) -> _Split:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (inputs_key, labels_key) if k not in data.files]
            if missing:
                raise UserError(
                    f"{path} has no array '{missing[0]}' (it has {', '.join(data.files) or 'none'}); "
                    f"set scenario.dataset_options.inputs_key / labels_key",
                    key=KEY,
                )
            names = [str(n) for n in np.asarray(data["class_names"]).ravel()] if "class_names" in data.files else None
            return _Split(data[inputs_key], data[labels_key], str(path), names)
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None


def load_npy(path: Path, mmap_mode: str | None = None, key: str = KEY) -> np.ndarray:
    """One ``.npy`` array (no pickles); a damaged or truncated file is a one-line error naming it."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except _UNREADABLE as exc:
        raise _unreadable(path, exc, key) from None


def _read_split(root: Path, split: str, inputs_key: str, labels_key: str) -> _Split | None:
    """``<split>.npz``, or ``<split>_<inputs_key>.npy`` with ``<split>_<labels_key>.npy``; None when absent."""
    if (root / f"{split}.npz").is_file():
        return _read_npz(root / f"{split}.npz", inputs_key, labels_key)
    x_file, y_file = root / f"{split}_{inputs_key}.npy", root / f"{split}_{labels_key}.npy"
    if not (x_file.is_file() and y_file.is_file()):
        return None
    # the inputs file is named first: it is the one checked row by row
    return _Split(load_npy(x_file), load_npy(y_file), f"{x_file} (with {y_file.name})", None)


def _as_inputs(part: _Split) -> torch.Tensor:
    """Images stay ``uint8`` (channels first); integer or float features become finite ``float32``."""
    x, source = part.inputs, part.source
    if len(x) != len(part.labels):
        raise UserError(f"{source}: {len(x)} inputs but {len(part.labels)} labels", key=KEY)
    if len(x) == 0:
        raise UserError(f"{source}: no samples", key=KEY)
    if x.ndim < 2:
        raise UserError(f"{source}: inputs must have a sample axis and at least one more, got shape {x.shape}", key=KEY)
    if x.dtype == np.uint8:
        if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        elif x.ndim == 3:
            x = x[:, None]
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype.kind not in "iuf":
        raise UserError(f"{source}: inputs must be integers or floats, got dtype {x.dtype}", key=KEY)
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
        features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    data_checks.finite_rows(features, source)
    return features


def labels_to_ids(
    values: np.ndarray, source: str, known: list[str] | None = None, known_from: str = "the training split"
) -> tuple[np.ndarray, list[str]]:
    """Label values (from :func:`~clpeft.scenarios.data_checks.label_values`) -> ids ``0..C-1`` and names.

    Classes are the sorted values (numeric order for numbers); with ``known`` (the names of
    ``known_from``), values map onto those names.
    """
    unique, inverse = np.unique(values, return_inverse=True)
    unique = [str(v) for v in unique.tolist()]
    if known is None:
        return inverse.astype(np.int64), unique
    index = {n: i for i, n in enumerate(known)}
    unknown = [u for u in unique if u not in index]
    if unknown:
        raise UserError(f"{source}: labels {data_checks.listed(unknown)} do not occur in {known_from}", key=KEY)
    return np.asarray([index[u] for u in unique], dtype=np.int64)[inverse], known


def _stored_ids(values: np.ndarray, names: list[str], source: str) -> np.ndarray:
    """Labels as ids into a stored ``class_names``: integer ids in range, or the names themselves."""
    data_checks.unique_names(names, source)
    if values.dtype.kind == "U":
        return labels_to_ids(values, source, names, "its class_names")[0]
    data_checks.ids_in_range(values, len(names), source)
    return values


def _ids(part: _Split, train: _Split | None = None, train_names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class ids and names of a split; a test split (``train`` given) maps onto the train split's names."""
    values = data_checks.label_values(part.labels, part.source)
    if train is None:
        if part.class_names is None:
            return labels_to_ids(values, part.source)
        return _stored_ids(values, part.class_names, part.source), part.class_names
    if (part.class_names is None) != (train.class_names is None):
        has, lacks = (train, part) if part.class_names is None else (part, train)
        raise UserError(
            f"{lacks.source}: no class_names array, but {has.source} has one; store the same class_names in both files", key=KEY
        )
    if part.class_names is None:
        return labels_to_ids(values, part.source, train_names)
    ids = _stored_ids(values, part.class_names, part.source)
    index = {n: i for i, n in enumerate(train_names)}
    extra = [n for n in part.class_names if n not in index]
    if extra:
        raise UserError(
            f"{part.source}: class_names {data_checks.listed(extra)} do not occur in the class_names of {train.source}", key=KEY
        )
    return np.asarray([index[n] for n in part.class_names], dtype=np.int64)[ids], train_names


def load_arrays(
    root: Path,
    download: bool = False,
    *,
    inputs_key: str = "x",
    labels_key: str = "y",
    test_fraction: float = 0.2,
    split_seed: int = 0,
):
    """Images (``uint8``) or precomputed features (integer or float -> ``float32``) with labels.

    ``root`` is one ``.npz`` file (split per class by ``test_fraction``), or a folder holding
    ``train.npz`` and ``test.npz`` (or ``train_x.npy``, ``train_y.npy``, ``test_x.npy``,
    ``test_y.npy``, with ``x``/``y`` = ``inputs_key``/``labels_key``). Labels may be integers
    (whole-number floats too) or strings; class ``k`` is the ``k``-th sorted label value, or
    ``class_names[k]`` when the ``.npz`` stores a ``class_names`` array: then labels are ids
    into it (or names in it), and a ``test.npz`` whose ``class_names`` lists the same classes in
    another order is mapped onto the training split's order by name.
    """
    check_split_options(1, test_fraction)
    if root.is_file():
        part = _read_npz(root, inputs_key, labels_key)
        inputs = _as_inputs(part)
        ids, names = _ids(part)
        return _split_arrays(inputs, ids, names, test_fraction, split_seed, f"npz:{root}")
    require_dir(root, "set scenario.root to a .npz file or a folder of train/test arrays")
    train, test = (_read_split(root, split, inputs_key, labels_key) for split in ("train", "test"))
    if train is None or test is None:
        raise UserError(
            f"{root}: expected train.npz and test.npz (or train_{inputs_key}.npy, train_{labels_key}.npy, "
            f"test_{inputs_key}.npy, test_{labels_key}.npy)",
            key=KEY,
        )
    inputs = [_as_inputs(part) for part in (train, test)]
    train_ids, names = _ids(train)
    test_ids, _ = _ids(test, train, names)
    data_checks.every_class_in_both(train_ids, test_ids, names, train.source, test.source)
    return tuple(
        ArrayDataset(x, torch.from_numpy(ids), f"npz:{root}/{split}", list(names))
        for split, x, ids in (("train", inputs[0], train_ids), ("test", inputs[1], test_ids))
    )


def _split_arrays(inputs: torch.Tensor, ids: np.ndarray, names: list[str], test_fraction, seed, name):
    by_class = {n: np.flatnonzero(ids == k).tolist() for k, n in enumerate(names)}
    train, test = split_per_class(by_class, test_fraction, seed)
    labels = torch.from_numpy(ids)
    out = []
    for split, items in (("train", train), ("test", test)):
        idx = torch.as_tensor(sorted(i for i, _ in items), dtype=torch.long)
        out.append(ArrayDataset(inputs[idx], labels[idx], f"{name}/{split}", list(names)))
    return tuple(out)
