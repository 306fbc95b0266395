"""A user's own data: image folders, npz arrays, JSONL/CSV text, the published layouts, bad data.

Independent references: the pixels and labels are generated here (every image one flat colour
that encodes its class and index), so each decoded sample can be traced back to its file; the
text files are written here with known labels; bad data must exit 2 through ``clpeft.cli.main``
with a message naming the file or column.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clpeft.cli import main
from clpeft.scenarios import datasets, folder_datasets
from clpeft.scenarios.class_incremental import ClassIncremental

CLASSES = ["cat", "dog", "eel", "fox"]


def _colour(label: int, i: int) -> tuple[int, int, int]:
    return (40 * label + 20, 5 * i, 200 - 10 * i)


def _write_folder(root, classes=CLASSES, per_class=10, size=(11, 7), fmt="png"):
    """``root/<class>/<i>.<fmt>``: flat images of colour :func:`_colour`."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, _colour(label, i)).save(root / name / f"{i}.{fmt}")
    return root


def _config(tmp_path, scenario: dict, backbone=None) -> str:
    cfg = {
        "seed": 0,
        "scenario": {"name": "class_incremental", **scenario},
        "backbone": backbone or {"name": "mlp", "hidden": [32]},
        "strategy": {"name": "finetune"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# ------------------------------------------------------------------ image folders


def test_image_folder_decodes_every_file_to_its_class_and_colour(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    train, test = datasets.load_dataset("image_folder", root, options={"image_size": 6})
    assert train.class_names == CLASSES
    assert len(train) == 4 * 8 and len(test) == 4 * 2  # test_fraction 0.2 of 10 per class
    assert train.inputs.dtype == torch.uint8 and tuple(train.inputs.shape[1:]) == (3, 6, 6)
    seen = set()
    for ds in (train, test):
        for x, y in zip(ds.inputs, ds.targets):
            colour = x[:, 0, 0].tolist()
            assert (x == x[:, :1, :1]).all()  # still one flat colour after resize + crop
            label, i = int(y), (colour[1] // 5)
            assert colour == list(_colour(label, i))
            seen.add((label, i))
    assert seen == {(c, i) for c in range(4) for i in range(10)}  # train and test partition the files


def test_split_depends_on_split_seed_only(tmp_path):
    root = _write_folder(tmp_path / "imgs")

    def test_colours(seed):
        _, test = datasets.load_dataset("image_folder", root, options={"image_size": 4, "split_seed": seed})
        return sorted(map(tuple, test.inputs[:, :, 0, 0].tolist()))

    assert test_colours(0) == test_colours(0)
    assert test_colours(0) != test_colours(1)


def test_train_and_test_subfolders_are_used_as_given(tmp_path):
    _write_folder(tmp_path / "d" / "train", per_class=5)
    _write_folder(tmp_path / "d" / "test", per_class=2)  # a class missing here is refused: test_hostile_data.py
    train, test = datasets.load_dataset("image_folder", tmp_path / "d", options={"image_size": 4})
    assert (len(train), len(test)) == (20, 8)
    assert np.bincount(test.targets.numpy()).tolist() == [2, 2, 2, 2]


def test_image_folder_runs_end_to_end_and_lazy_equals_eager(tmp_path, capsys):
    root = _write_folder(tmp_path / "imgs")
    cfg = _config(tmp_path, {"dataset": "image_folder", "root": str(root), "n_experiences": 2, "dataset_options": {"image_size": 6}})
    results = {}
    for decode in ("eager", "lazy"):
        code, text = _run(capsys, "run", cfg, "--out", str(tmp_path / decode), "--set", f"scenario.dataset_options.decode={decode}")
        assert code == 0, text
        results[decode] = json.loads((tmp_path / decode / "metrics.json").read_text())
    assert results["eager"]["class_names"] == CLASSES
    assert results["eager"]["test_sizes"] == [4, 4]
    assert results["lazy"]["acc_matrix"] == results["eager"]["acc_matrix"]


def test_lazy_dataset_matches_eager_pixels_and_fingerprint_follows_files(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=3)
    eager, _ = datasets.load_dataset("image_folder", root, options={"image_size": 5, "decode": "eager", "test_fraction": 0.34})
    lazy, _ = datasets.load_dataset("image_folder", root, options={"image_size": 5, "decode": "lazy", "test_fraction": 0.34})
    assert isinstance(lazy, folder_datasets.ImageFileDataset)
    assert tuple(lazy.inputs.shape) == tuple(eager.inputs.shape)
    assert torch.equal(torch.stack([lazy[i][0] for i in range(len(lazy))]), eager.inputs)
    before = lazy.fingerprint
    Image.new("RGB", (11, 7), (1, 2, 3)).save(lazy.paths[0])
    assert folder_datasets.ImageFileDataset(lazy.paths, lazy.targets, lazy.name, CLASSES, 5).fingerprint != before


# ------------------------------------------------------------------ arrays


def test_npz_images_channels_last_and_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(30, 5, 4, 3), dtype=np.uint8)
    y = np.array(["b", "a", "c"] * 10)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    train, test = datasets.load_dataset("npz", tmp_path / "data.npz", options={"test_fraction": 0.2})
    assert train.class_names == ["a", "b", "c"]
    assert tuple(train.inputs.shape[1:]) == (3, 5, 4)
    # every sample is one of the stored images with its label, and the splits partition them
    lookup = {x[i].tobytes(): y[i] for i in range(30)}
    pairs = [
        (ds.inputs[k].permute(1, 2, 0).numpy().tobytes(), ds.class_names[int(ds.targets[k])])
        for ds in (train, test)
        for k in range(len(ds))
    ]
    assert sorted(lookup[b] == name for b, name in pairs) == [True] * 30
    assert len({b for b, _ in pairs}) == 30 and len(test) == 6


def test_npz_features_train_and_test_files_run_end_to_end(tmp_path, capsys):
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float64) / 16.0, d.target
    np.savez(tmp_path / "train.npz", x=x[::2], y=y[::2])
    np.save(tmp_path / "test_x.npy", x[1::2])
    np.save(tmp_path / "test_y.npy", y[1::2])
    train, test = datasets.load_dataset("npz", tmp_path)
    assert train.inputs.dtype == torch.float32 and np.allclose(train.inputs.numpy(), x[::2])
    assert len(test) == len(y[1::2]) and train.class_names == [str(c) for c in range(10)]
    cfg = _config(
        tmp_path, {"dataset": "npz", "root": str(tmp_path), "n_experiences": 5}, backbone={"name": "mlp", "hidden": [64], "scale": 1.0}
    )
    code, text = _run(capsys, "run", cfg, "--out", str(tmp_path / "run"), "--set", "train.epochs=3")
    assert code == 0, text
    R = np.asarray(json.loads((tmp_path / "run" / "metrics.json").read_text())["acc_matrix"])
    assert np.diag(R).min() > 0.8  # each 2-class experience is learnt from the features


# ------------------------------------------------------------------ text


def test_jsonl_and_csv_text_with_custom_columns(tmp_path):
    rows = [{"review": f"text {i} of {lab}", "stars": lab} for lab in (10, 2, 5) for i in range(10)]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps({"text": r["review"], "label": r["stars"]}) + "\n" for r in rows)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "stars"])
        w.writeheader()
        w.writerows(rows)
    a = datasets.load_dataset("jsonl", tmp_path / "d.jsonl")
    b = datasets.load_dataset("csv", tmp_path / "d.csv", options={"text_column": "review", "label_column": "stars"})
    for train, test in (a, b):
        assert train.class_names == ["2", "5", "10"]  # numeric order, not string order
        texts = [*train.inputs.tolist(), *test.inputs.tolist()]
        labels = [*train.targets.tolist(), *test.targets.tolist()]
        assert sorted(texts) == sorted(r["review"] for r in rows)
        assert all(t.endswith(f"of {train.class_names[lab]}") for t, lab in zip(texts, labels))
        assert np.bincount(test.targets.numpy()).tolist() == [2, 2, 2]
    assert a[0].inputs.tolist() == b[0].inputs.tolist()
    scn = ClassIncremental(seed=0, dataset="jsonl", n_experiences=3, root=str(tmp_path / "d.jsonl"))
    exps = scn.experiences()
    assert scn.input_shape == () and scn.class_names == ["2", "5", "10"]
    assert [len(e.train) for e in exps] == [8, 8, 8]


# ------------------------------------------------------------------ published layouts


def test_cub_official_split_and_mini_imagenet_split_files(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_datasets.PRESET_CLASSES, "cub200", 2)
    monkeypatch.setitem(folder_datasets.PRESET_CLASSES, "mini_imagenet", 3)
    cub = tmp_path / "CUB_200_2011"
    _write_folder(cub / "images", classes=["001.Albatross", "002.Auklet"], per_class=3, fmt="jpg")
    files = [f"{c}/{i}.jpg" for c in ("001.Albatross", "002.Auklet") for i in range(3)]
    (cub / "images.txt").write_text("".join(f"{k + 1} {f}\n" for k, f in enumerate(files)))
    (cub / "train_test_split.txt").write_text("".join(f"{k + 1} {int(k % 3 != 0)}\n" for k in range(6)))
    train, test = datasets.load_dataset("cub200", tmp_path, options={"image_size": 4})
    assert train.class_names == ["001.Albatross", "002.Auklet"]
    assert (len(train), len(test)) == (4, 2) and test.targets.tolist() == [0, 1]

    mini = tmp_path / "mini-imagenet"
    _write_folder(mini / "images", classes=["n01", "n02", "n03"], per_class=6)
    for split, cls in (("train", "n01"), ("val", "n02"), ("test", "n03")):
        (mini / f"{split}.csv").write_text("filename,label\n" + "".join(f"{cls}/{i}.png,{cls}\n" for i in range(6)))
    train, test = datasets.load_dataset("mini_imagenet", tmp_path, options={"image_size": 4})
    assert train.class_names == ["n01", "n02", "n03"]
    assert np.bincount(train.targets.numpy()).tolist() == [5, 5, 5]  # 500/100 per class, scaled
    assert np.bincount(test.targets.numpy()).tolist() == [1, 1, 1]


# ------------------------------------------------------------------ bad data exits 2 naming the culprit


def _bad_empty_class(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=3)
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("no images here")
    return {"dataset": "image_folder", "root": str(root), "n_experiences": 2}, str(root / "zebra")


def _bad_unreadable_image(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=3)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return {"dataset": "image_folder", "root": str(root), "n_experiences": 2}, str(root / "dog" / "broken.png")


def _bad_truncated_image_lazy(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=3)
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "0.png").write_bytes(good[: len(good) // 2])
    return (
        {"dataset": "image_folder", "root": str(root), "n_experiences": 2, "dataset_options": {"decode": "lazy"}},
        str(root / "cat" / "0.png"),
    )


def _bad_missing_label_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "category": 1}\n')
    return {"dataset": "jsonl", "root": str(path), "n_experiences": 1}, f"{path}:2: no column 'label'"


def _bad_missing_text_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("body,label\nhello,0\nworld,1\n")
    return {"dataset": "csv", "root": str(path), "n_experiences": 1}, f"{path}:2: no column 'text'"


def _bad_too_few_classes(tmp_path):
    root = _write_folder(tmp_path / "imgs", classes=["a", "b"], per_class=3)
    return {"dataset": "image_folder", "root": str(root), "n_experiences": 3}, f"3 experiences but '{root}' has only 2 classes"


def _bad_npz_key(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 2), np.float32), y=np.arange(4))
    return {"dataset": "npz", "root": str(tmp_path / "d.npz"), "n_experiences": 1}, f"{tmp_path / 'd.npz'} has no array 'x'"


def _bad_option(tmp_path):
    return (
        {"dataset": "image_folder", "root": str(tmp_path), "n_experiences": 1, "dataset_options": {"imgsize": 3}},
        "scenario.dataset_options.imgsize",
    )


def _bad_preset_class_count(tmp_path):
    root = _write_folder(tmp_path / "imagenet-r", classes=["n1", "n2"], per_class=3)
    return ({"dataset": "imagenet_r", "root": str(tmp_path), "n_experiences": 10}, f"{root}: found 2 classes, ImageNet-R has 200")


def _bad_preset_missing(tmp_path):
    (tmp_path / "data" / "FashionMNIST").mkdir(parents=True)  # a cache folder holding other datasets
    return (
        {"dataset": "mini_imagenet", "root": str(tmp_path / "data"), "n_experiences": 10},
        f"mini-ImageNet not found: neither {tmp_path / 'data' / 'mini-imagenet'} nor {tmp_path / 'data'} holds it",
    )


@pytest.mark.parametrize(
    "case",
    [
        _bad_empty_class,
        _bad_unreadable_image,
        _bad_truncated_image_lazy,
        _bad_missing_label_column,
        _bad_missing_text_column,
        _bad_too_few_classes,
        _bad_npz_key,
        _bad_option,
        _bad_preset_class_count,
        _bad_preset_missing,
    ],
)
def test_bad_data_exits_2_naming_the_file_or_column(tmp_path, capsys, case):
    scenario, expected = case(tmp_path)
    code, text = _run(capsys, "run", _config(tmp_path, scenario), "--out", str(tmp_path / "run"))
    assert code == 2, text
    assert expected in text
    assert "Traceback" not in text


def test_domains_from_several_image_folders(tmp_path, capsys):
    """``domain_incremental`` with one image folder per domain: the same label space, each domain's
    test set made of its own folder's images (the second folder is the first, colour-inverted)."""
    first = _write_folder(tmp_path / "day")
    second = tmp_path / "night"
    for image in first.rglob("*.png"):
        target = second / image.relative_to(first)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.eval(Image.open(image), lambda v: 255 - v).save(target)
    options = {"image_size": 6, "test_fraction": 0.5}
    cfg = _config(tmp_path, {})
    data = yaml.safe_load(open(cfg))
    data["scenario"] = {
        "name": "domain_incremental",
        "domains": [
            {"dataset": "image_folder", "root": str(first), "dataset_options": options},
            {"dataset": "image_folder", "root": str(second), "dataset_options": options},
        ],
    }
    open(cfg, "w").write(yaml.safe_dump(data))
    code, text = _run(capsys, "run", cfg, "--out", str(tmp_path / "run"))
    assert code == 0, text
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["class_names"] == CLASSES and result["test_sizes"] == [20, 20]

    from clpeft import config
    from clpeft.engine import Engine

    stream = Engine(config.resolve(data), tmp_path / "scratch", device="cpu").build().stream
    day, night = (exp.test.load()[0] for exp in stream)
    assert torch.equal(night, 255 - day)  # the same files, split the same way, inverted
