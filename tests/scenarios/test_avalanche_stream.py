"""An Avalanche benchmark runs as a clpeft stream with its experiences and class split kept."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from clpeft import config
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.registry import scenarios

BENCH = textwrap.dedent("""
    import numpy as np, torch
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset
    from avalanche.benchmarks import nc_benchmark

    def make(n_experiences, seed=0, fixed_class_order=None):
        d = load_digits()
        x = torch.from_numpy(np.rint(d.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
        y = torch.from_numpy(d.target)
        tr = TensorDataset(x[::2], y[::2]); tr.targets = y[::2].tolist()
        te = TensorDataset(x[1::2], y[1::2]); te.targets = y[1::2].tolist()
        return nc_benchmark(tr, te, n_experiences=n_experiences, task_labels=False, seed=seed,
                            fixed_class_order=fixed_class_order)
""")


@pytest.fixture
def bench_module(tmp_path, monkeypatch):
    (tmp_path / "digits_bench.py").write_text(BENCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "digits_bench:make"


def test_stream_keeps_avalanches_split_and_renumbers_in_order(bench_module):
    order = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    scenario = scenarios.get("avalanche")(seed=0, benchmark=bench_module, kwargs={"n_experiences": 5, "fixed_class_order": order})
    stream = scenario.experiences()
    assert [e.classes_in_this_experience for e in stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # Experience 0 holds the original classes {3, 1} (Avalanche sorts within an experience: 1 -> 0, 3 -> 1).
    x, y = stream[0].train.load()
    from sklearn.datasets import load_digits

    d = load_digits()
    original = d.target[::2]
    assert sorted(set(original[np.isin(original, [1, 3])])) == [1, 3]
    assert len(y) == int(np.isin(original, [1, 3]).sum())
    assert x.dtype == torch.uint8 and scenario.input_shape == (1, 8, 8)
    assert scenario.class_names[:2] == ["1", "3"]


def test_joint_training_over_the_stream_learns_every_experience(bench_module, tmp_path, digits_run):
    # High accuracy on every test set at the end is only possible if train and test labels
    # agree across all experiences.
    digits_run["scenario"] = {"name": "avalanche", "benchmark": bench_module, "kwargs": {"n_experiences": 5}}
    digits_run["strategy"] = {"name": "joint"}
    result = Engine(config.resolve(digits_run), tmp_path / "run", device="cpu").run()
    R = np.array(result["acc_matrix"])
    assert R.shape == (5, 5) and np.all(np.triu(R, 1) == 0) and np.all(R[-1] > 0.8)
    assert sum(result["test_sizes"]) == len(range(1, 1797, 2))


def test_bad_benchmark_path_is_a_user_error():
    with pytest.raises(UserError, match="scenario.benchmark: cannot import module 'no_such_mod_q'"):
        scenarios.get("avalanche")(seed=0, benchmark="no_such_mod_q:make").experiences()
