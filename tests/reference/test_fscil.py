"""The FSCIL protocol and baseline against CEC (icoz69/CEC-CVPR2021, ``shared/refs/cec``).

The reference folder holds CEC's ``data/index_list`` (the TOPIC/CEC session lists behind the
published CIFAR-100, mini-ImageNet and CUB-200-2011 numbers). These tests check that

* clpeft ships those lists unmodified (byte for byte), with CEC's MIT licence and a NOTICE;
* ``few_shot_class_incremental`` with ``session_lists: cec`` builds exactly CEC's sessions, read
  as CEC's loaders read them (``dataloader/data_utils.py`` and the per-dataset loaders at commit
  3a5d335): the base session is every training sample of the first ``n_base`` classes (equal, as
  a set, to ``session_1``), session ``t`` trains on ``session_<t+1>.txt``'s samples in the file's
  order, every session is tested on all test samples of the classes seen. Without the images:
  CIFAR-100 through a stand-in dataset of its size whose labels agree with the lists; mini-ImageNet
  through clpeft's real loader with ``split: cec`` (CEC's ``train.csv``/``test.csv``: paths,
  labels by first appearance as CEC numbers them) with the image decoding stubbed; CUB through the
  real loader on a stand-in release (``images.txt``, ``train_test_split.txt``, empty image files)
  that holds every path the lists name plus others;
* ``fscil_proto`` trains its base session as CEC's decoupled-cosine baseline (``-project base
  -base_mode ft_cos -new_mode avg_cos -temperature 16``): the training loss is CEC's
  ``MYNET.forward_metric`` in ``models/base/Network.py`` -- ``16 * cos(encode(x), fc.weight)`` over
  the base classes, no bias -- restated here (the reference folder has CEC's lists only, not its
  code), and after each session its logits are ``16 * cos`` against the class means of the
  session's training data (``replace_base_fc``, ``update_fc_avg``).

Tolerances: indices, classes and paths exactly; parameters after the base session
``rtol=1e-5, atol=1e-6``, logits ``rtol=1e-4, atol=1e-4`` (float32 in another order).

Mutations checked (each fails a test here): mini-ImageNet lines keyed by WordNet id
(``split('/')[2]``) instead of file name; session ``t`` reading ``session_<t>.txt`` instead of
``session_<t+1>.txt``; the test data including one class beyond those seen; ``fscil_proto``'s
base head linear again (``base_head`` default ``linear``); the cosine scale 16 -> 10.
"""

from __future__ import annotations

import copy
import csv
import filecmp
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from clpeft.data import ArrayDataset
from clpeft.errors import UserError
from clpeft.scenarios import cec_sessions, datasets, folder_datasets
from clpeft.scenarios.few_shot_class_incremental import FewShotClassIncremental

PACKAGED = cec_sessions.FOLDER


@pytest.fixture(scope="module")
def cec() -> Path:
    from .conftest import ref_dir

    return ref_dir("cec") / "data" / "index_list"


def _lines(folder: Path, dataset: str, session: int) -> list[str]:
    return (folder / dataset / f"session_{session}.txt").read_text().splitlines()


def _indices(exp) -> list[int]:
    ((_, idx),) = exp.train.parts
    return idx.tolist()


# --------------------------------------------------------------------------------------------
# the shipped lists
# --------------------------------------------------------------------------------------------


def test_the_shipped_lists_are_cecs_files_with_its_licence(cec):
    for dataset, n in (("cifar100", 9), ("mini_imagenet", 9), ("cub200", 11)):
        assert sorted(p.name for p in (cec / dataset).glob("session_*.txt")) == sorted(f"session_{t}.txt" for t in range(1, n + 1))
        for t in range(1, n + 1):
            assert filecmp.cmp(cec / dataset / f"session_{t}.txt", PACKAGED / dataset / f"session_{t}.txt", shallow=False)
    for part in ("train", "test"):
        assert filecmp.cmp(cec / "mini_imagenet" / f"{part}.csv", PACKAGED / "mini_imagenet" / f"{part}.csv", shallow=False)
        # CEC's {train,test}.txt (not shipped) say the same as the CSVs: MINI-ImageNet/<part>/<wnid>/<file>
        rows = list(csv.DictReader((cec / "mini_imagenet" / f"{part}.csv").open()))
        assert (cec / "mini_imagenet" / f"{part}.txt").read_text().splitlines() == [
            f"MINI-ImageNet/{part}/{r['label']}/{r['filename']}" for r in rows
        ]
    assert filecmp.cmp(cec.parents[1] / "LICENSE", PACKAGED / "LICENSE", shallow=False)
    notice = (PACKAGED / "NOTICE").read_text()
    assert "icoz69/CEC-CVPR2021" in notice and "MIT" in notice


# --------------------------------------------------------------------------------------------
# CIFAR-100: indices into the training split
# --------------------------------------------------------------------------------------------


def _cifar_labels(cec) -> tuple[np.ndarray, np.ndarray]:
    """Labels of a CIFAR-100 stand-in (50,000 / 10,000, 500 / 100 per class) that agree with the
    lists: session_1's samples hold the 60 base classes, session t's 25 lines are 5 classes x 5
    shots (CEC's NewClassSelector reshapes them to (5, 5), one row per class), the rest fill the
    novel classes up to 500."""
    y = np.full(50000, -1)
    base = np.asarray(_lines(cec, "cifar100", 1), dtype=int)
    y[base] = np.arange(len(base)) % 60
    for t in range(2, 10):
        rows = np.asarray(_lines(cec, "cifar100", t), dtype=int).reshape(5, 5)
        for j, row in enumerate(rows):
            y[row] = 60 + 5 * (t - 2) + j
    rest = np.flatnonzero(y < 0)
    y[rest] = 60 + np.arange(len(rest)) % 40
    assert np.bincount(y).tolist() == [500] * 100
    return y, np.arange(10000) % 100


def _stand_in(monkeypatch, train_y, test_y, expect_options=None):
    """``datasets.load_dataset`` answering with arrays of these labels (inputs: the sample ids)."""
    calls = []

    def load(name, root, download=False, options=None):
        calls.append(options)
        return (
            ArrayDataset(torch.arange(len(train_y)), torch.as_tensor(train_y), f"{name}/train"),
            ArrayDataset(torch.arange(len(test_y)), torch.as_tensor(test_y), f"{name}/test"),
        )

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


def _check_stream(stream, train_y, test_y, n_base, n_way, expected_sessions):
    """The stream's sessions are ``expected_sessions`` (training indices per session, in order)
    and test every sample of the classes seen."""
    assert len(stream) == len(expected_sessions)
    base = stream[0]
    assert base.classes_in_this_experience == list(range(n_base)) and base.k_shot is None
    assert sorted(_indices(base)) == sorted(expected_sessions[0])  # CEC selects the base data by class
    for s, exp in enumerate(stream[1:], start=1):
        classes = list(range(n_base + (s - 1) * n_way, n_base + s * n_way))
        assert exp.classes_in_this_experience == classes and exp.k_shot == 5
        assert _indices(exp) == expected_sessions[s]  # CEC's list, in its order
        assert sorted(set(train_y[_indices(exp)].tolist())) == classes
    for s, exp in enumerate(stream):
        ((_, idx),) = exp.test.parts
        seen = n_base + s * n_way
        # session s tests on everything seen so far: the union of its and the earlier test views
        union = sorted(i for e in stream[: s + 1] for i in e.test.parts[0][1].tolist())
        assert union == np.flatnonzero(test_y < seen).tolist()


def test_cifar100_sessions_are_cecs_indices(cec, monkeypatch):
    train_y, test_y = _cifar_labels(cec)
    _stand_in(monkeypatch, train_y, test_y)
    scenario = FewShotClassIncremental(seed=0, dataset="cifar100", n_base=60, n_way=5, k_shot=5)
    assert scenario.session_lists == "cec"  # the default for CIFAR-100
    stream = scenario.experiences()
    expected = [list(map(int, _lines(cec, "cifar100", t))) for t in range(1, 10)]
    _check_stream(stream, train_y, test_y, 60, 5, expected)
    assert scenario.plan["session_lists"] == "cec" and scenario.plan["class_order"] == list(range(100))


def test_cifar100_data_that_disagrees_with_the_lists_is_refused(cec, monkeypatch):
    train_y, test_y = _cifar_labels(cec)
    shot = int(_lines(cec, "cifar100", 4)[0])
    train_y[shot] = 0 if train_y[shot] != 0 else 1
    _stand_in(monkeypatch, train_y, test_y)
    scenario = FewShotClassIncremental(seed=0, dataset="cifar100", n_base=60, n_way=5, k_shot=5)
    with pytest.raises(UserError, match="scenario.session_lists"):
        scenario.experiences()


def test_fewer_sessions_take_the_first_lists(cec, monkeypatch):
    train_y, test_y = _cifar_labels(cec)
    _stand_in(monkeypatch, train_y, test_y)
    scenario = FewShotClassIncremental(seed=0, dataset="cifar100", n_base=60, n_way=5, k_shot=5, n_sessions=2)
    stream = scenario.experiences()
    expected = [list(map(int, _lines(cec, "cifar100", t))) for t in range(1, 4)]
    _check_stream(stream, train_y, test_y, 60, 5, expected)
    # the recorded plan (fscil_sessions.json) lists the test samples of the 70 classes used, no more
    assert scenario.plan["test_indices"] == np.flatnonzero(test_y < 70).tolist()


# --------------------------------------------------------------------------------------------
# mini-ImageNet: CEC's split files and file names
# --------------------------------------------------------------------------------------------


def _capture_images(monkeypatch):
    """Replace image decoding: each split becomes ids 0..N-1 with the loader's labels, and the
    paths the loader chose are kept in ``captured``."""
    captured = {}

    def build(splits, classes, name, image_size, mode, decode):
        out = []
        for part, items in splits.items():
            captured[part] = [p for p, _ in items]
            out.append(ArrayDataset(torch.arange(len(items)), torch.tensor([y for _, y in items]), f"{name}/{part}", list(classes)))
        return tuple(out)

    monkeypatch.setattr(folder_datasets, "_build_images", build)
    return captured


def test_mini_imagenet_split_and_sessions_are_cecs(cec, monkeypatch, tmp_path):
    images = tmp_path / "miniimagenet" / "images"  # CEC's layout: data/miniimagenet/images
    images.mkdir(parents=True)
    captured = _capture_images(monkeypatch)
    # the 60,000 image files are not needed: only their existence is checked
    monkeypatch.setattr(folder_datasets, "os", types.SimpleNamespace(path=types.SimpleNamespace(isfile=lambda p: True)))
    scenario = FewShotClassIncremental(seed=0, dataset="mini_imagenet", n_base=60, n_way=5, k_shot=5, root=str(tmp_path))
    stream = scenario.experiences()

    # CEC's MiniImageNet: path = IMAGE_PATH/filename per CSV row, label = order of first appearance
    def cec_split(part):
        rows = list(csv.DictReader((cec / "mini_imagenet" / f"{part}.csv").open()))
        wnids = list(dict.fromkeys(r["label"] for r in rows))
        return [str(images / r["filename"]) for r in rows], np.array([wnids.index(r["label"]) for r in rows])

    (train_paths, train_y), (test_paths, test_y) = cec_split("train"), cec_split("test")
    assert captured["train"] == train_paths and captured["test"] == test_paths
    assert stream[0].train.parts[0][0].targets.tolist() == train_y.tolist()
    # sessions: CEC's SelectfromTxt takes line.split('/')[3] under IMAGE_PATH
    where = {p: i for i, p in enumerate(train_paths)}
    expected = [[where[str(images / line.split("/")[3])] for line in _lines(cec, "mini_imagenet", t)] for t in range(1, 10)]
    _check_stream(stream, train_y, test_y, 60, 5, expected)


def test_mini_imagenet_pooled_split_cannot_take_cecs_lists():
    with pytest.raises(UserError, match="scenario.dataset_options.split"):
        FewShotClassIncremental(seed=0, dataset="mini_imagenet", n_base=60, n_way=5, k_shot=5, dataset_options={"split": "pooled"})


# --------------------------------------------------------------------------------------------
# CUB-200-2011: paths into the release's training split
# --------------------------------------------------------------------------------------------


def test_cub200_sessions_are_cecs_paths(cec, monkeypatch, tmp_path):
    """A stand-in release: every image CEC's lists name is a training image, each novel class has
    two more training images the lists do not name, each class one test image; image ids are
    shuffled so that id order differs from path order."""
    listed = [line.split("/", 2)[2] for t in range(1, 12) for line in _lines(cec, "cub200", t)]  # images/<class>/<file>
    classes = sorted({p.split("/")[0] for p in listed})
    assert len(classes) == 200
    extra = [f"{c}/extra_{k}.jpg" for c in classes[100:] for k in range(2)]
    tests = [f"{c}/test_0.jpg" for c in classes]
    files = [(p, 1) for p in listed + extra] + [(p, 0) for p in tests]
    order = np.random.default_rng(0).permutation(len(files))
    root = tmp_path / "CUB_200_2011"
    for rel, _ in files:
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / rel).touch()
    (root / "images.txt").write_text("".join(f"{k + 1} {files[i][0]}\n" for k, i in enumerate(order)))
    (root / "train_test_split.txt").write_text("".join(f"{k + 1} {files[i][1]}\n" for k, i in enumerate(order)))
    captured = _capture_images(monkeypatch)
    scenario = FewShotClassIncremental(seed=0, dataset="cub200", n_base=100, n_way=10, k_shot=5, root=str(tmp_path))
    stream = scenario.experiences()

    # CEC's CUB200: a line is a path under root; its label is its class id - 1
    train_paths = captured["train"]
    train_y = np.array([int(Path(p).parent.name[:3]) - 1 for p in train_paths])
    test_y = np.array([int(Path(p).parent.name[:3]) - 1 for p in captured["test"]])
    where = {p: i for i, p in enumerate(train_paths)}
    expected = [[where[str(tmp_path / line)] for line in _lines(cec, "cub200", t)] for t in range(1, 12)]
    assert stream[0].train.parts[0][0].targets.tolist() == train_y.tolist()
    _check_stream(stream, train_y, test_y, 100, 10, expected)


# --------------------------------------------------------------------------------------------
# fscil_proto: CEC's decoupled-cosine baseline
# --------------------------------------------------------------------------------------------


def _cec_forward_metric(backbone, fc_weight, x, temperature=16.0):
    """CEC ``MYNET.forward_metric`` with ``mode='ft_cos'``:
    ``temperature * F.linear(F.normalize(encode(x)), F.normalize(fc.weight))``."""
    f = torch.nn.functional
    return temperature * f.linear(f.normalize(backbone(x), p=2, dim=-1), f.normalize(fc_weight, p=2, dim=-1))


def test_fscil_proto_is_cecs_cosine_baseline(tmp_path, monkeypatch):
    import clpeft.config
    import clpeft.engine
    from clpeft.strategies.fscil_proto import FSCILPrototypes

    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))
    record = {"batches": [], "strategy": None}
    before, step, after = FSCILPrototypes.before_experience, FSCILPrototypes.training_step, FSCILPrototypes.after_experience

    def spy_before(self, exp):
        if exp.index == 0:
            record["backbone"] = copy.deepcopy(self.backbone)
        before(self, exp)
        if exp.index == 0:
            record["fc"] = self.adapt_head.weight.detach().clone()
        record["strategy"] = self

    def spy_step(self, batch):
        record["batches"].append((batch.x.clone(), batch.y.clone()))
        return step(self, batch)

    def spy_after(self, exp):
        if exp.index == 0:
            record["trained"] = {n: p.detach().clone() for n, p in self.backbone.named_parameters()}
        after(self, exp)
        record.setdefault("sessions", []).append((exp.train.load(), exp.test.load()))
        with torch.no_grad():  # predict() on raw inputs (the engine hands it cached features once frozen)
            record.setdefault("logits", []).append(self.head(self.backbone(exp.test.load()[0])))

    monkeypatch.setattr(FSCILPrototypes, "before_experience", spy_before)
    monkeypatch.setattr(FSCILPrototypes, "training_step", spy_step)
    monkeypatch.setattr(FSCILPrototypes, "after_experience", spy_after)
    cfg = {
        "seed": 0,
        "scenario": {
            "name": "few_shot_class_incremental",
            "dataset": "sklearn_digits",
            "n_base": 4,
            "n_way": 2,
            "k_shot": 5,
            "base_per_class": 20,
            "test_per_class": 10,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "fscil_proto"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.1, "momentum": 0.0},
        "eval": {"batch_size": 64, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    clpeft.engine.Engine(clpeft.config.resolve(cfg), tmp_path / "run", device="cpu").run()

    # CEC's base_train on the same batches: cross-entropy of forward_metric over the base classes, SGD
    backbone, fc = record["backbone"], torch.nn.Parameter(record["fc"].clone())
    assert fc.shape[0] == 4  # CEC's fc has all 100 rows but trains on logits[:, :base_class]: the same
    optimizer = torch.optim.SGD([*backbone.parameters(), fc], lr=0.1, momentum=0.0)
    backbone.train()
    for x, y in record["batches"]:
        loss = torch.nn.functional.cross_entropy(_cec_forward_metric(backbone, fc, x)[:, :4], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for n, p in backbone.named_parameters():
        torch.testing.assert_close(record["trained"][n], p.detach(), rtol=1e-5, atol=1e-6)

    # replace_base_fc / update_fc_avg: class means of each session's training data (eval mode),
    # then avg_cos: 16 * cos(encode(x), prototypes) over the classes seen
    backbone.eval()
    prototypes = []
    with torch.no_grad():
        for ((x, y), (x_test, _)), logits in zip(record["sessions"], record["logits"]):
            features = backbone(x)
            prototypes += [features[y == c].mean(0) for c in torch.unique(y)]
            expected = _cec_forward_metric(backbone, torch.stack(prototypes), x_test)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert len(prototypes) == 10
