"""A user's own image data: a folder per class, and the layouts of ImageNet-R, CUB-200-2011 and
mini-ImageNet (``.npz``/``.npy`` arrays: :mod:`clpeft.scenarios.array_datasets`).

Every loader returns ``(train, test)`` datasets whose ``class_names`` come from the data (folder
names, label values), for :func:`clpeft.scenarios.datasets.load_dataset`.

**Decoding.** Images are decoded with PIL, converted to RGB (or ``L``), resized so the shorter
side is ``image_size`` and centre-cropped to ``image_size x image_size`` (stored as ``uint8``
``(C, S, S)``; backbones resize and normalise further). With ``decode: auto`` a dataset whose
decoded pixels fit in :data:`EAGER_LIMIT_BYTES` is decoded once into memory (an
:class:`~clpeft.data.ArrayDataset`: fast batches, fingerprint over the pixels); a larger one stays
on disk as an :class:`ImageFileDataset` decoded per item (set ``train.num_workers`` to decode in
parallel; a frozen backbone's feature cache still decodes each image once). ``eager``/``lazy``
force either.

**Splits.** ``train/`` and ``test/`` subfolders are used as they are; otherwise every class is
split on its own, ``test_fraction`` of its files (sorted by path, then permuted with a generator
seeded by ``split_seed`` and the class name) going to test. The split does not depend on the run
seed, so every seed of a multi-seed run sees the same test set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from clpeft.data import ArrayDataset
from clpeft.errors import UserError
from clpeft.scenarios import data_checks
from clpeft.scenarios.text_datasets import split_positions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
EAGER_LIMIT_BYTES = 1 << 30
#: Class counts of the published datasets; a folder with another count is refused.
PRESET_CLASSES = {"imagenet_r": 200, "cub200": 200, "mini_imagenet": 100}
Decode = Literal["auto", "eager", "lazy"]
Mode = Literal["RGB", "L"]
_KEY = "scenario.root"


# ------------------------------------------------------------------ decoding


def decode_image(path: str | Path, image_size: int, mode: str = "RGB") -> torch.Tensor:
    """One image file -> ``uint8`` ``(C, S, S)``: shorter side resized to ``S``, centre crop.

    Raises:
        UserError: the file cannot be read or decoded (the message names it).
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            w, h = img.size
            scale = image_size / min(w, h)
            size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
            img = img.resize(size, Image.BILINEAR)
            left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(img, dtype=np.uint8)
    except _unreadable_image() as exc:
        raise UserError(f"cannot read image {path}: {exc}; delete or replace the file", key=_KEY) from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _unreadable_image() -> tuple[type[Exception], ...]:
    """What PIL raises for a damaged file (``UnidentifiedImageError`` is an ``OSError``; a
    decompression bomb, an image over twice ``Image.MAX_IMAGE_PIXELS``, is neither)."""
    from PIL import Image

    return OSError, ValueError, Image.DecompressionBombError


#: The bytes a whole file of these formats ends with (a PNG's IEND chunk with its fixed CRC).
_END_OF_IMAGE = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "GIF": b"\x3b"}


def check_image_file(path: str, image_size: int, mode: str) -> None:
    """Refuse a broken image before training without decoding it: the header must parse and a
    PNG, JPEG or GIF must end with its end-of-image bytes (a truncated file does not). A file
    that does not (e.g. with bytes appended after the image) is decoded once to decide. Damaged
    pixel data inside an intact file, or a truncated file of another format, is found only when
    the image is decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            end = _END_OF_IMAGE.get(img.format)
        if end is None:
            return
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - len(end)))
            whole = f.read() == end
    except _unreadable_image() as exc:
        raise UserError(f"cannot read image {path}: {exc}; delete or replace the file", key=_KEY) from None
    if not whole:
        decode_image(path, image_size, mode)


class _LazyInputs:
    """``dataset.inputs`` of an :class:`ImageFileDataset`: shape known, pixels decoded on access."""

    def __init__(self, dataset: ImageFileDataset):
        self._dataset = dataset

    @property
    def shape(self) -> tuple[int, ...]:
        d = self._dataset
        return (len(d), 1 if d.mode == "L" else 3, d.image_size, d.image_size)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._dataset[i][0]


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files decoded on access (see the module docstring for the decoding).

    Args:
        paths: one file per sample.
        targets: ``(N,)`` integer labels.
        name: a human-readable identity, part of the fingerprint.
        class_names: label -> name.
        image_size: side of the square ``uint8`` images returned.
        mode: ``RGB`` (3 channels) or ``L`` (grayscale, 1 channel).
    """

    def __init__(self, paths: Sequence[str], targets, name: str, class_names: list[str] | None, image_size: int, mode: str = "RGB"):
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.name = name
        self.class_names = class_names
        self.image_size = image_size
        self.mode = mode
        self.inputs = _LazyInputs(self)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return decode_image(self.paths[i], self.image_size, self.mode), self.targets[i]

    def relabel(self, mapping: torch.Tensor, class_names: list[str] | None = None) -> ImageFileDataset:
        """The same files with labels mapped through ``mapping[old] = new``."""
        out = ImageFileDataset(self.paths, mapping[self.targets], self.name, class_names, self.image_size, self.mode)
        out._fingerprint = self._fingerprint
        return out

    @property
    def fingerprint(self) -> str:
        """A digest of the name, decoding settings and every file's path, size and mtime."""
        if self._fingerprint is None:
            h = hashlib.sha1(f"{self.name}|{self.image_size}|{self.mode}|{len(self.paths)}".encode())
            for p in self.paths:
                st = os.stat(p)
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def image_dataset(paths: Sequence[str], targets: Sequence[int], name: str, class_names: list[str], image_size: int, mode: str, decode: str):
    """An :class:`ArrayDataset` of decoded pixels or an :class:`ImageFileDataset` (``decode``)."""
    channels = 1 if mode == "L" else 3
    eager = decode == "eager" or (decode == "auto" and len(paths) * channels * image_size**2 <= EAGER_LIMIT_BYTES)
    if not eager:
        for p in paths:
            check_image_file(p, image_size, mode)
        return ImageFileDataset(paths, targets, name, class_names, image_size, mode)
    pixels = torch.empty((len(paths), channels, image_size, image_size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        pixels[i] = decode_image(p, image_size, mode)
    return ArrayDataset(pixels, torch.as_tensor(list(targets), dtype=torch.long), name, class_names)


# ------------------------------------------------------------------ splits


def split_per_class(items_by_class: dict[str, list], test_fraction: float, seed: int):
    """``{class: items}`` -> ``(train, test)`` lists of ``(item, class index)``, classes in dict order."""
    train, test = [], []
    for label, (cls, items) in enumerate(items_by_class.items()):
        items = sorted(items)
        if len(items) < 2:
            raise UserError(f"class '{cls}' has {len(items)} sample; a train/test split needs at least 2", key=_KEY)
        tr, te = split_positions(len(items), test_fraction, seed, cls)
        train += [(items[i], label) for i in tr]
        test += [(items[i], label) for i in te]
    return train, test


# ------------------------------------------------------------------ image folders


def require_dir(root: Path, what: str) -> Path:
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; {what}", key=_KEY)
    return root


def _class_folders(root: Path) -> dict[str, list[str]]:
    """``{folder name: sorted image paths}`` of every visible subfolder of ``root``.

    Raises:
        UserError: no class folders, or a class folder without images (the folder is named).
    """
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root} has no class folders; expected one subfolder of images per class", key=_KEY)
    out = {}
    for folder in folders:
        files = sorted(str(f) for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise UserError(
                f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder", key=_KEY
            )
        out[folder.name] = files
    return out


def _from_folders(root: Path, name: str, image_size: int, test_fraction: float, split_seed: int, decode: str, mode: str):
    """``root/{train,test}/<class>/`` when both exist, else ``root/<class>/`` split per class."""
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        train_files, test_files = _class_folders(train_dir), _class_folders(test_dir)
        classes = list(train_files)
        extra = sorted(set(test_files) - set(train_files))
        if extra:
            raise UserError(f"{test_dir} has classes missing from {train_dir}: {', '.join(extra[:5])}", key=_KEY)
        index = {c: i for i, c in enumerate(classes)}
        train = [(p, index[c]) for c, ps in train_files.items() for p in ps]
        test = [(p, index[c]) for c, ps in test_files.items() for p in ps]
        data_checks.every_class_in_both([y for _, y in train], [y for _, y in test], classes, str(train_dir), str(test_dir))
    else:
        by_class = _class_folders(root)
        classes = list(by_class)
        train, test = split_per_class(by_class, test_fraction, split_seed)
    return _build_images({"train": train, "test": test}, classes, name, image_size, mode, decode)


def _build_images(splits: dict[str, list[tuple[str, int]]], classes: list[str], name: str, image_size: int, mode: str, decode: str):
    return tuple(
        image_dataset([p for p, _ in items], [y for _, y in items], f"{name}/{part}", list(classes), image_size, mode, decode)
        for part, items in splits.items()
    )


def load_image_folder(
    root: Path,
    download: bool = False,
    *,
    image_size: int = 224,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    decode: Decode = "auto",
    mode: Mode = "RGB",
):
    """A folder per class under ``root`` (or under ``root/train`` and ``root/test``).

    Class ``k`` is the ``k``-th folder name in sorted order.
    """
    check_split_options(image_size, test_fraction)
    require_dir(root, "set scenario.root to a folder with one subfolder of images per class")
    return _from_folders(root, f"image_folder:{root}", image_size, test_fraction, split_seed, decode, mode)


def check_split_options(image_size: int, test_fraction: float) -> None:
    if image_size < 1:
        raise UserError(f"must be at least 1, got {image_size}", key="scenario.dataset_options.image_size")
    if not 0 < test_fraction < 1:
        raise UserError(f"must be between 0 and 1 (exclusive), got {test_fraction}", key="scenario.dataset_options.test_fraction")


# ------------------------------------------------------------------ published layouts


def _dataset_dir(root: Path, subdirs: Sequence[str], markers: Sequence[str], what: str, url: str) -> Path:
    """``root/<subdir>`` for the first subdir that exists, else ``root`` itself when it holds one of
    the ``markers`` (glob patterns such as ``train`` or ``n*``: it is the extracted folder)."""
    for sub in subdirs:
        if (root / sub).is_dir():
            return root / sub
    if root.is_dir() and any(next(root.glob(m), None) is not None for m in ("train", *markers)):
        return root
    raise UserError(
        f"{what} not found: neither {root / subdirs[0]} nor {root} holds it; it is not downloaded "
        f"automatically: get it from {url} and set scenario.root to the extracted folder",
        key=_KEY,
    )


def _expect_classes(datasets, preset: str, what: str, root: Path):
    found, expected = len(datasets[0].class_names), PRESET_CLASSES[preset]
    if found != expected:
        raise UserError(f"{root}: found {found} classes, {what} has {expected}; check scenario.root", key=_KEY)
    return datasets


def load_imagenet_r(
    root: Path, download: bool = False, *, image_size: int = 224, test_fraction: float = 0.2, split_seed: int = 0, decode: Decode = "auto"
):
    """ImageNet-R (Hendrycks et al., 2021): 200 WordNet-id folders, 30,000 renditions.

    The folder of the release tar (``imagenet-r/<wnid>/*.jpg``), split per class 80/20 with
    ``split_seed`` as in L2P/CODA-Prompt/PILOT, or PILOT's ``train/`` and ``test/`` folders.
    """
    check_split_options(image_size, test_fraction)
    base = _dataset_dir(root, ["imagenet-r"], ["n[0-9]*"], "ImageNet-R", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar")
    return _expect_classes(
        _from_folders(base, "imagenet_r", image_size, test_fraction, split_seed, decode, "RGB"), "imagenet_r", "ImageNet-R", base
    )


def load_cub200(
    root: Path, download: bool = False, *, image_size: int = 224, test_fraction: float = 0.2, split_seed: int = 0, decode: Decode = "auto"
):
    """CUB-200-2011 (Wah et al., 2011): 200 bird species, 11,788 images.

    The release layout (``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
    ``images/<class>/``) with its official 5,994/5,794 split; or class folders (``train/`` and
    ``test/``, or one folder per class split by ``test_fraction``).
    """
    check_split_options(image_size, test_fraction)
    base = _dataset_dir(
        root,
        ["CUB_200_2011", "cub200"],
        ["images.txt", "[0-9][0-9][0-9].*"],
        "CUB-200-2011",
        "https://www.vision.caltech.edu/datasets/cub_200_2011/",
    )
    if (base / "images.txt").is_file() and (base / "train_test_split.txt").is_file():
        datasets = _cub_official(base, image_size, decode)
    else:
        datasets = _from_folders(base, "cub200", image_size, test_fraction, split_seed, decode, "RGB")
    return _expect_classes(datasets, "cub200", "CUB-200-2011", base)


def _read_pairs(path: Path) -> dict[str, tuple[str, str]]:
    """``{image id: (value, "file:line")}`` of a CUB list file; a repeated id is refused."""
    if not path.is_file():
        raise UserError(f"{path} is missing; the CUB-200-2011 release has it next to images.txt", key=_KEY)
    pairs: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(data_checks.read_text(path).splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise UserError(f"{path}:{n}: expected '<image id> <value>', got {line!r}", key=_KEY)
            if parts[0] in pairs:
                raise UserError(f"{path}:{n}: image id {parts[0]} appears twice (first at {pairs[parts[0]][1]})", key=_KEY)
            pairs[parts[0]] = (parts[1].strip(), f"{path}:{n}")
    return pairs


def _cub_official(base: Path, image_size: int, decode: str):
    classes, splits = _cub_release_split(base)
    return _build_images(splits, classes, "cub200", image_size, "RGB", decode)


def _cub_release_split(base: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class folder names and ``{"train"/"test": [(path, label)]}`` of the release files, in
    image-id order (the order of CEC's and TOPIC's CUB loaders)."""
    images_dir, split_file = base / "images", base / "train_test_split.txt"
    split = _read_pairs(split_file)
    files = {
        image_id: (data_checks.inside(images_dir, rel, where), where) for image_id, (rel, where) in _read_pairs(base / "images.txt").items()
    }
    class_of = {image_id: path.relative_to(images_dir).parts[0] for image_id, (path, _) in files.items()}
    classes = sorted(set(class_of.values()))
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list] = {"train": [], "test": []}
    for image_id, (path, where) in sorted(files.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]):
        if not path.is_file():
            raise UserError(f"{path} (listed at {where}) is missing", key=_KEY)
        if image_id not in split:
            raise UserError(f"{split_file} has no line for image {image_id} (listed at {where})", key=_KEY)
        is_train, split_at = split[image_id]
        if is_train not in ("0", "1"):
            raise UserError(f"{split_at}: expected 1 (train) or 0 (test) for image {image_id}, got '{is_train}'", key=_KEY)
        splits["train" if is_train == "1" else "test"].append((str(path), index[class_of[image_id]]))
    data_checks.every_class_in_both(
        [y for _, y in splits["train"]],
        [y for _, y in splits["test"]],
        classes,
        f"the training images of {split_file}",
        f"the test images of {split_file}",
    )
    return classes, splits


def cub200_training_files(root: Path) -> list[str]:
    """``<class folder>/<file>`` of every training image of the CUB-200-2011 release under
    ``root``, in the order of :func:`load_cub200`'s training split (image-id order).

    Raises:
        UserError: ``root`` does not hold the release files (``images.txt``, ``train_test_split.txt``).
    """
    base = _dataset_dir(
        root,
        ["CUB_200_2011", "cub200"],
        ["images.txt", "[0-9][0-9][0-9].*"],
        "CUB-200-2011",
        "https://www.vision.caltech.edu/datasets/cub_200_2011/",
    )
    if not ((base / "images.txt").is_file() and (base / "train_test_split.txt").is_file()):
        raise UserError(
            f"{base} has no images.txt and train_test_split.txt: the CUB-200-2011 release files are "
            f"needed to place the fixed session lists in its split",
            key=_KEY,
        )
    _, splits = _cub_release_split(base)
    return ["/".join(Path(path).parts[-2:]) for path, _ in splits["train"]]


def load_mini_imagenet(
    root: Path,
    download: bool = False,
    *,
    image_size: int = 84,
    test_fraction: float = 1 / 6,
    split_seed: int = 0,
    decode: Decode = "auto",
    split: Literal["pooled", "cec"] = "pooled",
):
    """mini-ImageNet (Vinyals et al., 2016): 100 classes of 600 images, 84x84 by custom.

    ``split: pooled``: Ravi & Larochelle's split files (``train.csv``, ``val.csv``, ``test.csv``
    with ``filename,label`` rows, images in ``images/``): their 64/16/20 classes are pooled and
    every class split 500/100 (``test_fraction`` 1/6, seeded), the class-incremental protocol; or
    class folders (``train/`` and ``test/``, or one folder per class).

    ``split: cec``: the fixed 500/100 split of the few-shot class-incremental protocol, the
    ``train.csv``/``test.csv`` that TOPIC and CEC (icoz69/CEC-CVPR2021) use, shipped with clpeft
    (``fscil_sessions/mini_imagenet/``): images from ``images/`` (Ravi's folder, or CEC's
    ``miniimagenet/images``), classes in sorted WordNet-id order, every split in the CSV's row order.
    """
    check_split_options(image_size, test_fraction)
    base = _dataset_dir(
        root,
        ["mini-imagenet", "miniImageNet", "mini_imagenet", "miniimagenet"],
        ["train.csv", "n[0-9]*", "images"],
        "mini-ImageNet",
        "https://github.com/twitter-research/meta-learning-lstm (split files) and the ImageNet images",
    )
    if split == "cec":
        datasets = _mini_imagenet_cec(base, image_size, decode)
        return _expect_classes(datasets, "mini_imagenet", "mini-ImageNet", base)
    lists = [base / f"{s}.csv" for s in ("train", "val", "test")]
    if all(p.is_file() for p in lists):
        by_class: dict[str, list[str]] = {}
        for path in lists:
            for filename, label, where in _csv_pairs(path, "filename", "label"):
                by_class.setdefault(label, []).append(str(data_checks.inside(base / "images", filename, where)))
        by_class = dict(sorted(by_class.items()))
        missing = next((p for ps in by_class.values() for p in ps if not os.path.isfile(p)), None)
        if missing:
            raise UserError(f"{missing} (listed in the split files of {base}) is missing", key=_KEY)
        train, test = split_per_class(by_class, test_fraction, split_seed)
        datasets = _build_images({"train": train, "test": test}, list(by_class), "mini_imagenet", image_size, "RGB", decode)
    else:
        datasets = _from_folders(base, "mini_imagenet", image_size, test_fraction, split_seed, decode, "RGB")
    return _expect_classes(datasets, "mini_imagenet", "mini-ImageNet", base)


#: TOPIC/CEC's mini-ImageNet split files, shipped with clpeft (see fscil_sessions/NOTICE).
CEC_MINI_IMAGENET = Path(__file__).resolve().parent / "fscil_sessions" / "mini_imagenet"


def mini_imagenet_cec_rows(part: str) -> list[tuple[str, str, str]]:
    """``(filename, wnid, "file:line")`` of CEC's ``train.csv`` or ``test.csv`` (``part``), in row order."""
    return _csv_pairs(CEC_MINI_IMAGENET / f"{part}.csv", "filename", "label")


def _mini_imagenet_cec(base: Path, image_size: int, decode: str):
    images = base / "images"
    require_dir(images, "split: cec reads the images from the images/ folder of mini-ImageNet")
    rows = {part: mini_imagenet_cec_rows(part) for part in ("train", "test")}
    classes = sorted({wnid for _, wnid, _ in rows["train"]})
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        part: [(str(data_checks.inside(images, name, where)), index[wnid]) for name, wnid, where in part_rows]
        for part, part_rows in rows.items()
    }
    missing = next((p for items in splits.values() for p, _ in items if not os.path.isfile(p)), None)
    if missing:
        raise UserError(f"{missing} (listed in CEC's mini-ImageNet split) is missing from {images}", key=_KEY)
    return _build_images(splits, classes, "mini_imagenet", image_size, "RGB", decode)


def _csv_pairs(path: Path, first: str, second: str) -> list[tuple[str, str, str]]:
    """``(first, second, "file:line")`` of every row of a CSV list file."""
    header, rows = data_checks.csv_rows(path)
    for column in (first, second):
        if column not in header:
            raise UserError(f"{path}: no column '{column}' (columns: {', '.join(header)})", key=_KEY)
    return [(row[first] or "", row[second] or "", f"{path}:{n}") for n, row in rows]
