"""Domain-incremental streams: one label space, each domain a dataset or a transform of one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpeft import config
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.scenarios import corruptions as C
from clpeft.scenarios.datasets import load_dataset
from clpeft.scenarios.domain_incremental import DomainIncremental


@pytest.fixture(scope="module")
def digits():
    return load_dataset("sklearn_digits", "~/.cache/clpeft/data")


def test_transform_domains_are_rotations_permutations_and_corruptions_of_one_dataset(digits):
    train, test = digits
    scenario = DomainIncremental(
        seed=0,
        dataset="sklearn_digits",
        domains=[
            {},
            {"rotation": 90},
            {"permutation": True},
            {"permutation": True},
            {"corruption": "shot_noise", "severity": 2},
        ],
    )
    stream = scenario.experiences()
    assert [e.domain for e in stream] == ["clean", "rotation90", "permutation2", "permutation3", "shot_noise@2"]
    assert all(e.classes_in_this_experience == list(range(10)) == e.classes_seen_so_far for e in stream)
    assert scenario.class_names == [str(c) for c in range(10)]
    clean_x, clean_y = stream[0].test.load()
    assert torch.equal(clean_x, test.inputs) and torch.equal(clean_y, test.targets)

    rotated, y = stream[1].test.load()
    assert torch.equal(rotated, torch.rot90(test.inputs, 1, (-2, -1))) and torch.equal(y, test.targets)

    perms = []
    for exp in stream[2:4]:
        probe = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)  # reveals the permutation
        order = exp.train.parts[0][0].transform(probe, torch.arange(1)).flatten().long()
        assert sorted(order.tolist()) == list(range(64))
        for view, clean in ((exp.train, train), (exp.test, test)):  # one permutation for both splits
            assert torch.equal(view.load()[0], clean.inputs.flatten(-2)[..., order].view_as(clean.inputs))
        perms.append(order)
    assert not torch.equal(*perms)  # each permutation domain has its own

    noisy, _ = stream[4].train.load([3, 5])
    assert torch.equal(noisy, C.corrupt(train.inputs[[3, 5]], "shot_noise", 2, 0, torch.tensor([3, 5])))


def _npz(path, names, seed):
    rng = np.random.default_rng(seed)
    for split, n in (("train", 30), ("test", 12)):
        y = np.arange(n) % len(names)
        np.savez(path / f"{split}.npz", x=rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8), y=np.array(names)[y])


def test_dataset_domains_must_share_the_label_space(tmp_path):
    for name, classes in (("a", ["cat", "dog"]), ("b", ["cat", "dog"]), ("c", ["cat", "eel"])):
        (tmp_path / name).mkdir()
        _npz(tmp_path / name, classes, seed=len(name))
    domains = [{"dataset": "npz", "root": str(tmp_path / "a"), "name": "A"}, {"dataset": "npz", "root": str(tmp_path / "b")}]
    stream = DomainIncremental(seed=0, domains=domains, test_per_class=3).experiences()
    assert [e.domain for e in stream] == ["A", f"npz:{tmp_path / 'b'}"]
    assert [len(e.test) for e in stream] == [6, 6] and [len(e.train) for e in stream] == [30, 30]
    with pytest.raises(UserError, match=r"scenario.domains\[1\]: .* every domain must share one label space"):
        DomainIncremental(seed=0, domains=[domains[0], {"dataset": "npz", "root": str(tmp_path / "c")}]).experiences()


@pytest.mark.parametrize(
    "domains,message",
    [
        (
            [{"rotation": 10, "corruption": "fog"}],
            "scenario.domains\\[0\\]: value error, a domain is one of dataset, rotation, "
            "permutation or corruption, not rotation and corruption",
        ),
        ([{"corruption": "fgo"}], "unknown corruption 'fgo'; did you mean 'fog'"),
        ([], "scenario.domains: expected at least one domain"),
    ],
)
def test_config_mistakes_name_the_key(domains, message):
    cfg = {
        "scenario": {"name": "domain_incremental", "dataset": "sklearn_digits", "domains": domains},
        "backbone": {"name": "mlp"},
        "strategy": {"name": "finetune"},
    }
    with pytest.raises(UserError, match=message):
        config.resolve(cfg)
    cfg["scenario"] = {"name": "domain_incremental", "domains": [{"rotation": 10}]}
    with pytest.raises(UserError, match="scenario.domains\\[0\\]: this domain transforms the scenario's dataset"):
        config.resolve(cfg)


def test_finetune_forgets_the_first_domain_after_a_rotated_one(tmp_path, digits_run):
    digits_run["scenario"] = {"name": "domain_incremental", "dataset": "sklearn_digits", "domains": [{}, {"rotation": 180}]}
    result = Engine(config.resolve(digits_run), tmp_path / "run", device="cpu").run()
    R = np.array(result["acc_matrix"])
    assert R.shape == (2, 2) and R[0, 0] > 0.85 and R[1, 1] > 0.85
    assert R[1, 0] < R[0, 0] - 0.2  # the same labels, a new input domain: the first is overwritten
