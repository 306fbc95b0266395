"""Hostile input: a user's own data and the on-disk feature cache, damaged on purpose.

Bad data must be refused before training as one line (``clpeft: error: ...``, exit 2) that
names the file and the problem; a damaged feature cache is rebuilt with a warning naming its
folder and never serves wrong features. Every file is written here, so each expected message,
row and label is known; features are checked against a direct backbone pass.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clpeft.backbones.mlp import MLPBackbone
from clpeft.cli import main
from clpeft.data import ArrayDataset, DataView
from clpeft.errors import UserError
from clpeft.feature_cache import FeatureCache
from clpeft.scenarios import class_incremental, datasets, folder_datasets

CLASSES = ["cat", "dog", "eel", "fox"]


def _features(n_per_class=20, dim=6, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.5, (n_per_class, dim)) for c in range(4)]).astype(np.float32)
    return x, np.repeat(np.arange(4), n_per_class)


def _png(path, colour=(10, 20, 30), size=(11, 7)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _folder(root, classes=CLASSES, per_class=5):
    for label, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", (40 * label, 5 * i, 7))
    return root


def _config(tmp_path, scenario: dict, backbone=None, train=None) -> str:
    cfg = {
        "seed": 0,
        "scenario": {"name": "class_incremental", "n_experiences": 2, **scenario},
        "backbone": backbone or {"name": "mlp", "hidden": [16], "scale": 1.0},
        "strategy": {"name": "finetune"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, **(train or {})},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _refused(capsys, tmp_path, scenario: dict, *expected: str, train=None) -> str:
    """Run the CLI; it must exit 2 with one ``clpeft: error:`` line holding every ``expected``."""
    code = main(["run", _config(tmp_path, scenario, train=train), "--out", tempfile.mkdtemp(dir=tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("clpeft: error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _load_error(name, root, options=None) -> str:
    with pytest.raises(UserError) as info:
        datasets.load_dataset(name, root, options=options)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ own data: non-finite features


def test_a_nan_row_in_an_npz_file_is_refused_before_training(tmp_path, capsys):
    x, y = _features()
    x[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    _refused(capsys, tmp_path, {"dataset": "npz", "root": str(tmp_path / "nan.npz")}, str(tmp_path / "nan.npz"), "1 of 80 rows", "row 3")
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.pt"))


def test_inf_and_float32_overflow_count_every_bad_row(tmp_path):
    x, y = _features()
    x = x.astype(np.float64)
    x[[10, 11], 0] = np.inf
    x[12, 5] = -np.inf
    x[40, 1] = 1e39  # finite in float64, inf once read as float32
    np.savez(tmp_path / "d.npz", x=x, y=y)
    message = _load_error("npz", tmp_path / "d.npz")
    assert "4 of 80 rows" in message and "row 10" in message


@pytest.mark.parametrize("layout", ["npz", "npy"])
def test_nan_in_the_test_split_of_a_folder_names_that_file(tmp_path, layout):
    x, y = _features()
    bad = x[1::2].copy()
    bad[[7, 9]] = np.nan
    if layout == "npz":
        np.savez(tmp_path / "train.npz", x=x[::2], y=y[::2])
        np.savez(tmp_path / "test.npz", x=bad, y=y[1::2])
        culprit = str(tmp_path / "test.npz")
    else:
        for split, xs in (("train", x[::2]), ("test", bad)):
            np.save(tmp_path / f"{split}_x.npy", xs)
            np.save(tmp_path / f"{split}_y.npy", y[::2])
        culprit = str(tmp_path / "test_x.npy")
    message = _load_error("npz", tmp_path)
    assert culprit in message and "2 of 40 rows" in message and "row 7" in message


def test_complex_features_are_refused(tmp_path):
    x, y = _features()
    np.savez(tmp_path / "d.npz", x=x + 1j, y=y)
    assert "got dtype complex64" in _load_error("npz", tmp_path / "d.npz")


# ------------------------------------------------------------------ own data: labels


def _with_names(path, x, y, names):
    np.savez(path, x=x, y=y, class_names=np.array(names))
    return path


def test_out_of_range_ids_with_class_names_are_refused(tmp_path, capsys):
    x, y = _features()
    y[:5], y[20:25] = 7, -3
    path = _with_names(tmp_path / "oob.npz", x, y, list("abcd"))
    _refused(capsys, tmp_path, {"dataset": "npz", "root": str(path)}, str(path), "10 of 80 labels", "first: 7", "0..3")


@pytest.mark.parametrize("names", [None, list("abcd")])
def test_a_fractional_label_is_refused_not_truncated(tmp_path, names):
    x, y = _features()
    y = y.astype(np.float64)
    y[30] = 0.7
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y) if names is None else _with_names(path, x, y, names)
    message = _load_error("npz", path)
    assert str(path) in message and "first: 0.7 at row 30" in message and "1 of 80 labels" in message


def test_a_nan_label_is_refused(tmp_path):
    x, y = _features()
    y = y.astype(np.float32)
    y[[2, 50]] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=y)
    message = _load_error("npz", tmp_path / "d.npz")
    assert "2 of 80 labels" in message and "first: nan at row 2" in message


def test_whole_float_labels_read_as_integers(tmp_path):
    x, y = _features()
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.float64) + 1)
    train, test = datasets.load_dataset("npz", tmp_path / "d.npz")
    assert train.class_names == ["1", "2", "3", "4"]
    assert sorted(np.unique(test.targets.numpy()).tolist()) == [0, 1, 2, 3]


def test_class_names_in_another_order_are_remapped_by_name(tmp_path):
    x, y = _features()
    _with_names(tmp_path / "train.npz", x[::2], y[::2], CLASSES)
    reverse = CLASSES[::-1]
    _with_names(tmp_path / "test.npz", x[1::2], 3 - y[1::2], reverse)  # the same classes, ids by the reversed list
    train, test = datasets.load_dataset("npz", tmp_path)
    assert train.class_names == test.class_names == CLASSES
    assert test.targets.tolist() == y[1::2].tolist()
    # the features of a test sample sit near its class's mean: the remapped label is the true one
    assert np.allclose(test.inputs.numpy().mean(1), test.targets.numpy(), atol=1.0)


def test_a_test_class_name_unknown_to_train_is_refused(tmp_path):
    x, y = _features()
    _with_names(tmp_path / "train.npz", x[::2], y[::2], CLASSES)
    _with_names(tmp_path / "test.npz", x[1::2], y[1::2], ["cat", "dog", "emu", "fox"])
    message = _load_error("npz", tmp_path)
    assert str(tmp_path / "test.npz") in message and "emu" in message


def test_a_test_id_past_the_class_names_is_refused_not_an_index_error(tmp_path, capsys):
    x, y = _features()
    _with_names(tmp_path / "train.npz", x[::2], y[::2], CLASSES)
    yt = y[1::2].copy()
    yt[4] = 9
    _with_names(tmp_path / "test.npz", x[1::2], yt, CLASSES)
    _refused(capsys, tmp_path, {"dataset": "npz", "root": str(tmp_path)}, str(tmp_path / "test.npz"), "first: 9 at row 4", "1 of 40 labels")


@pytest.mark.parametrize("case", ["duplicate", "one_split", "two_dims"])
def test_malformed_class_names_are_refused(tmp_path, case):
    x, y = _features()
    if case == "duplicate":
        _with_names(tmp_path / "d.npz", x, y, ["cat", "dog", "cat", "fox"])
        root, expected = tmp_path / "d.npz", "'cat' twice"
    elif case == "one_split":
        _with_names(tmp_path / "train.npz", x[::2], y[::2], CLASSES)
        np.savez(tmp_path / "test.npz", x=x[1::2], y=y[1::2])
        root, expected = tmp_path, "no class_names"
    else:
        _with_names(tmp_path / "d.npz", x, y[:, None], CLASSES)
        root, expected = tmp_path / "d.npz", "one value per sample"
    assert expected in _load_error("npz", root)


def test_an_empty_npz_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 6), np.float32), y=np.zeros(0, np.int64))
    assert "no samples" in _load_error("npz", tmp_path / "d.npz")


# ------------------------------------------------------------------ own data: classes missing from a split


def test_an_image_test_folder_missing_classes_is_refused(tmp_path, capsys):
    _folder(tmp_path / "d" / "train")
    _folder(tmp_path / "d" / "test", classes=CLASSES[:2])
    _refused(
        capsys,
        tmp_path,
        {"dataset": "image_folder", "root": str(tmp_path / "d"), "dataset_options": {"image_size": 8, "mode": "L"}},
        str(tmp_path / "d" / "test"),
        "no samples of classes eel, fox;",
    )


def test_npz_and_text_test_splits_missing_a_class_are_refused(tmp_path):
    x, y = _features()
    keep = y[1::2] != 2
    np.savez(tmp_path / "train.npz", x=x[::2], y=y[::2])
    np.savez(tmp_path / "test.npz", x=x[1::2][keep], y=y[1::2][keep])
    message = _load_error("npz", tmp_path)
    assert str(tmp_path / "test.npz") in message and "no samples of classes 2;" in message

    text = tmp_path / "text"
    text.mkdir()
    (text / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n" for i, lab in enumerate("aabbcc")))
    (text / "test.jsonl").write_text("".join(json.dumps({"text": f"u{i}", "label": lab}) + "\n" for i, lab in enumerate("ab")))
    message = _load_error("jsonl", text)
    assert str(text / "test.jsonl") in message and "no samples of classes c;" in message


def test_an_experience_without_test_samples_is_refused(tmp_path, monkeypatch):
    """The builder's own guard, behind the loaders' checks: data whose test split lacks classes 2, 3."""
    x, y = _features()
    train = ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), "t/train", CLASSES)
    test = ArrayDataset(torch.from_numpy(x[:40]), torch.from_numpy(y[:40]), "t/test", CLASSES)
    monkeypatch.setattr(class_incremental.datasets, "load_dataset", lambda *a, **k: (train, test))
    scenario = class_incremental.ClassIncremental(seed=0, dataset="npz", n_experiences=2, root=str(tmp_path))
    with pytest.raises(UserError, match=r"experience 1 \(classes eel, fox\) has no test samples"):
        scenario.experiences()


# ------------------------------------------------------------------ own data: unreadable files


def test_a_decompression_bomb_is_one_line(tmp_path, capsys, monkeypatch):
    root = _folder(tmp_path / "imgs")
    bomb = _png(root / "dog" / "bomb.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,600 pixels > 2 x 500: DecompressionBombError
    for decode in ("eager", "lazy"):
        _refused(
            capsys,
            tmp_path,
            {"dataset": "image_folder", "root": str(root), "dataset_options": {"image_size": 8, "decode": decode}},
            str(bomb),
            "decompression bomb",
        )


def test_truncated_npz_and_npy_files_are_one_line(tmp_path, capsys):
    x, y = _features()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
    _refused(capsys, tmp_path, {"dataset": "npz", "root": str(tmp_path / "d.npz")}, str(tmp_path / "d.npz"))

    folder = tmp_path / "split"
    folder.mkdir()
    for split in ("train", "test"):
        np.save(folder / f"{split}_x.npy", x)
        np.save(folder / f"{split}_y.npy", y)
    data = (folder / "test_x.npy").read_bytes()
    (folder / "test_x.npy").write_bytes(data[:-100])
    assert str(folder / "test_x.npy") in _load_error("npz", folder)


def test_a_compressed_npz_with_a_damaged_member_is_one_line(tmp_path):
    x, y = _features()
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    data = bytearray((tmp_path / "d.npz").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + 40  # inside x's compressed bytes
    data[start : start + 50] = bytes(50)
    (tmp_path / "d.npz").write_bytes(bytes(data))
    assert str(tmp_path / "d.npz") in _load_error("npz", tmp_path / "d.npz")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_latin1_text_files_are_one_line_naming_the_line(tmp_path, capsys, fmt):
    path = tmp_path / f"d.{fmt}"
    rows = [("caf\u00e9" if i == 3 else f"text {i}", "ab"[i % 2]) for i in range(8)]
    if fmt == "csv":
        path.write_bytes(("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)).encode("latin-1"))
    else:
        path.write_bytes("".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows).encode("latin-1"))
    line = 5 if fmt == "csv" else 4
    _refused(capsys, tmp_path, {"dataset": fmt, "root": str(path), "n_experiences": 1}, f"{path}:{line}", "UTF-8")


def test_a_csv_field_over_the_csv_module_limit_is_one_line(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nshort,a\nalso short,b\n" + "x" * 140_000 + ",a\nmore,b\n")
    _refused(capsys, tmp_path, {"dataset": "csv", "root": str(path), "n_experiences": 1}, f"{path}:4")


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,label\n".encode() + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(6)).encode())
    train, test = datasets.load_dataset("csv", path)
    assert train.class_names == ["a", "b"] and len(train) + len(test) == 6


def test_a_jsonl_label_that_is_a_list_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "y"]}\n')
    assert f"{path}:2" in _load_error("jsonl", path)


@pytest.mark.parametrize("how", ["under_a_file", "a_file"])
def test_an_unusable_feature_cache_folder_is_one_line(tmp_path, capsys, monkeypatch, how):
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CLPEFT_CACHE", str(blocker / "cache") if how == "under_a_file" else str(blocker))
    cfg = _config(
        tmp_path,
        {"dataset": "sklearn_digits", "n_experiences": 2, "train_per_class": 5},
        backbone={"name": "mlp", "hidden": [16], "freeze": True},
    )
    code = main(["run", cfg, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert str(blocker) in err and "CLPEFT_CACHE" in err


def _broken_pixels(path):
    """A PNG with an intact header and end chunk whose pixel data is garbage: only decoding finds it."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (7, 11, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    at = data.find(b"IDAT")
    size = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 6 : at + 4 + size] = b"\xaa" * (size - 2)
    path.write_bytes(bytes(data))
    return path


def test_a_decode_error_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    bad = _broken_pixels(root / "eel" / "9.png")
    _refused(
        capsys,
        tmp_path,
        {"dataset": "image_folder", "root": str(root), "dataset_options": {"image_size": 8, "decode": "lazy"}},
        f"cannot read image {bad}",
        train={"num_workers": 2},
    )


def test_lazy_decoding_checks_every_file_before_training(tmp_path):
    """A truncated file passes a header-only check; the end-of-image check catches it at load time."""
    root = _folder(tmp_path / "imgs")
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cat" / "0.png")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "0.png").write_bytes(good[: len(good) // 2])  # the header survives: Image.open succeeds
    (root / "dog" / "9.png").write_bytes(good + b"trailing bytes")  # decodes fine: not refused
    message = _load_error("image_folder", root, {"image_size": 8, "decode": "lazy"})
    assert str(root / "cat" / "0.png") in message
    (root / "cat" / "0.png").write_bytes(good)
    train, _ = datasets.load_dataset("image_folder", root, options={"image_size": 8, "decode": "lazy"})
    assert isinstance(train, folder_datasets.ImageFileDataset)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncated_images", "cannot read"),
        ("fractional_label", "first: 0.5 at row 4"),
        ("negative_label", "one class id"),
        ("fewer_labels", "N = 29"),
    ],
)
def test_damaged_cifar_c_files_are_refused_before_adapting(tmp_path, damage, expected):
    from clpeft.scenarios.test_time_adaptation import TestTimeAdaptation

    images = np.zeros((30, 4, 4, 3), np.uint8)
    labels = np.tile(np.arange(3), 10).astype(np.float64)
    if damage == "fractional_label":
        labels[4] = 0.5
    elif damage == "negative_label":
        labels[7] = -1
    elif damage == "fewer_labels":
        labels = labels[:-1]
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    if damage == "truncated_images":
        _cut(tmp_path / "fog.npy", lambda n: n - 100)
    scenario = TestTimeAdaptation(seed=0, corruptions=["fog"], severity=1, corrupted_root=str(tmp_path), source_checkpoint="unused-here")
    with pytest.raises(UserError, match="scenario.corrupted_root") as info:
        scenario.experiences()
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda plan: plan["test_indices"].append(10**6), "test_indices must lie in 0.."),
        (lambda plan: plan["class_order"].__setitem__(0, 12), "class_order must list distinct class ids of 0..9"),
        (lambda plan: plan.pop("test_indices"), "not a complete sessions plan (KeyError"),
        (lambda plan: plan["sessions"][2].pop("classes"), "not a complete sessions plan (KeyError"),
    ],
    ids=["test_index", "class_order", "no_test_indices", "no_classes"],
)
def test_a_damaged_sessions_file_is_refused(tmp_path, damage, expected):
    from clpeft.scenarios.few_shot_class_incremental import SESSIONS_FILE, FewShotClassIncremental

    shape = {"dataset": "sklearn_digits", "n_base": 4, "n_way": 2, "k_shot": 5, "test_per_class": 5}
    first = FewShotClassIncremental(seed=0, **shape)
    first.experiences()
    first.save_artifacts(tmp_path)
    plan = json.loads((tmp_path / SESSIONS_FILE).read_text())
    damage(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="scenario.sessions_file") as info:
        FewShotClassIncremental(seed=0, sessions_file=str(tmp_path / "plan.json"), **shape).experiences()
    assert expected in str(info.value)


# ------------------------------------------------------------------ own data: list files stay inside the root


def _cub(tmp_path, entries: list[str], split=None):
    cub = tmp_path / "CUB_200_2011"
    for c in ("001.A", "002.B"):
        for i in range(2):
            _png(cub / "images" / c / f"{i}.png")
    _png(tmp_path / "outside.png")
    (cub / "images.txt").write_text("".join(f"{k + 1} {e}\n" for k, e in enumerate(entries)))
    split = split or "".join(f"{k + 1} {k % 2}\n" for k in range(len(entries)))
    (cub / "train_test_split.txt").write_text(split)
    return cub


GOOD_CUB = ["001.A/0.png", "001.A/1.png", "002.B/0.png", "002.B/1.png"]


@pytest.mark.parametrize("entry", ["001.A/../../../outside.png", "/etc/hostname"])
def test_cub_entries_outside_the_images_folder_are_refused(tmp_path, monkeypatch, entry):
    monkeypatch.setitem(folder_datasets.PRESET_CLASSES, "cub200", 2)
    cub = _cub(tmp_path, [*GOOD_CUB[:3], entry])
    message = _load_error("cub200", tmp_path, {"image_size": 4})
    assert f"{cub / 'images.txt'}:4" in message and "points outside" in message


@pytest.mark.parametrize(
    "split, expected",
    [
        ("1 1\n2 0\n3 1\n", "train_test_split.txt has no line for image 4"),
        ("1 1\n2 0\n3 1\n4 2\n", "train_test_split.txt:4"),
    ],
)
def test_cub_split_file_must_cover_every_image_with_0_or_1(tmp_path, monkeypatch, split, expected):
    monkeypatch.setitem(folder_datasets.PRESET_CLASSES, "cub200", 2)
    _cub(tmp_path, GOOD_CUB, split)
    assert expected in _load_error("cub200", tmp_path, {"image_size": 4})


def test_cub_duplicate_image_ids_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_datasets.PRESET_CLASSES, "cub200", 2)
    cub = _cub(tmp_path, GOOD_CUB)
    (cub / "images.txt").write_text("1 001.A/0.png\n2 001.A/1.png\n3 002.B/0.png\n3 002.B/1.png\n")
    assert f"{cub / 'images.txt'}:4: image id 3" in _load_error("cub200", tmp_path, {"image_size": 4})


def test_mini_imagenet_entries_outside_the_images_folder_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_datasets.PRESET_CLASSES, "mini_imagenet", 1)
    mini = tmp_path / "mini-imagenet"
    for i in range(3):
        _png(mini / "images" / "n01" / f"{i}.png")
    _png(tmp_path / "outside.png")
    (mini / "train.csv").write_text("filename,label\nn01/0.png,n01\nn01/1.png,n01\n")
    (mini / "val.csv").write_text("filename,label\n../../outside.png,n01\n")
    (mini / "test.csv").write_text("filename,label\nn01/2.png,n01\n")
    message = _load_error("mini_imagenet", tmp_path, {"image_size": 4})
    assert f"{mini / 'val.csv'}:2" in message and "points outside" in message


# ------------------------------------------------------------------ feature cache


CPU = torch.device("cpu")


def _cache_setup(tmp_path):
    torch.manual_seed(0)
    backbone = MLPBackbone(input_shape=(1, 8, 8), hidden=[16], freeze=True)
    g = torch.Generator().manual_seed(0)
    dataset = ArrayDataset(torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(40) % 4, "imgs")
    view = DataView.of(dataset)
    FeatureCache(backbone, CPU, directory=tmp_path).features(view)
    (folder,) = {p.parent for p in tmp_path.rglob("features.npy")}
    with torch.no_grad():
        expected = backbone(view.load()[0])
    return backbone, view, folder, expected


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


DAMAGE = {
    "features_truncated": lambda d: _cut(d / "features.npy", lambda n: n // 2),
    "features_cut_in_header": lambda d: _cut(d / "features.npy", lambda n: 60),
    "features_empty": lambda d: _cut(d / "features.npy", lambda n: 0),
    "features_extra_bytes": lambda d: (d / "features.npy").write_bytes((d / "features.npy").read_bytes() + bytes(64)),
    "features_float64": lambda d: np.save(d / "features.npy", np.load(d / "features.npy").astype(np.float64)),
    "features_fortran": lambda d: np.save(d / "features.npy", np.asfortranarray(np.load(d / "features.npy"))),
    "done_truncated": lambda d: _cut(d / "done.npy", lambda n: n - 10),
    "done_cut_in_header": lambda d: _cut(d / "done.npy", lambda n: 9),
    "done_wrong_shape": lambda d: np.save(d / "done.npy", np.ones(39, bool)),
    "done_missing": lambda d: (d / "done.npy").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, damage):
    backbone, view, folder, expected = _cache_setup(tmp_path)
    DAMAGE[damage](folder)
    cache = FeatureCache(backbone, CPU, directory=tmp_path)
    if damage == "done_missing":  # an interrupted first build: nothing to warn about
        got = cache.features(view)
    else:
        with pytest.warns(UserWarning, match=f"feature cache {folder}"):
            got = cache.features(view)
    assert cache.computed == len(view)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # the rebuilt files are whole: a third cache reads them without computing or warning
    again = FeatureCache(backbone, CPU, directory=tmp_path)
    assert torch.equal(again.features(view), got) and again.computed == 0


def test_a_cache_file_that_is_a_folder_is_one_line(tmp_path):
    backbone, view, folder, _ = _cache_setup(tmp_path)
    (folder / "features.npy").unlink()
    (folder / "features.npy").mkdir()
    with pytest.raises(UserError, match=f"{folder / 'features.npy'}.*delete"):
        FeatureCache(backbone, CPU, directory=tmp_path).features(view)


def test_a_run_on_a_truncated_cache_equals_a_fresh_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "fc"))
    cfg = _config(
        tmp_path,
        {"dataset": "sklearn_digits", "n_experiences": 2, "train_per_class": 20},
        backbone={"name": "mlp", "hidden": [16], "freeze": True},
    )
    results = []
    assert main(["run", cfg, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    for path in (tmp_path / "fc").rglob("features.npy"):
        _cut(path, lambda n: n // 2)
    with pytest.warns(UserWarning, match=r"feature cache .* is damaged \(features.npy is \d+ bytes"):
        assert main(["run", cfg, "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    results = [json.loads((tmp_path / out / "metrics.json").read_text())["acc_matrix"] for out in "ab"]
    assert results[0] == results[1]
