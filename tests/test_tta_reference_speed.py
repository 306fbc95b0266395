"""``benchmarks/tta_reference_speed.py`` still runs: clpeft's TTA against Döbler et al.'s benchmark code.

Two methods (Tent: parameters adapted; LAME: outputs only) x two batches of 64, one timed round:
both sides agree by the reference tests' rule, every row has positive throughputs and peak
memory, and the Markdown table has one row per method. Skips where the reference code
(``shared/refs/test-time-adaptation``) or ``yacs`` is missing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tta_reference_speed.py"


@pytest.fixture(scope="module")
def speed():
    pytest.importorskip("yacs", reason="the benchmark's configs need yacs (pip install -e .[dev])")
    spec = importlib.util.spec_from_file_location("tta_reference_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        if module.reference_root() is None:
            pytest.skip("reference code test-time-adaptation not found (set CLPEFT_REFS to the shared/refs folder)")
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_two_methods_agree_and_fill_the_table(speed):
    methods = ["tent", "lame"]
    rows = speed.measure(methods, n_batches=2, batch_size=64, repeats=1, n_source=64)
    assert [r["method"] for r in rows] == methods
    for row in rows:
        assert row["agree"], row
        assert row["compared"] == ("parameters" if row["method"] == "tent" else "outputs")
        assert row["clpeft_cpu_ips"] > 0 and row["reference_cpu_ips"] > 0
        assert row["ratio"] == pytest.approx(row["clpeft_cpu_ips"] / row["reference_cpu_ips"])
        assert row["clpeft_peak_mb"] > 0 and row["reference_peak_mb"] > 0
    lines = speed.table(rows).splitlines()
    assert len(lines) == 2 + len(methods)
    assert [line.split("|")[1].strip() for line in lines[2:]] == methods


def test_agreement_rule_catches_a_moved_parameter(speed):
    """A step of ``lr = 1e-3`` on 5 of 8 elements is a difference; float noise on one is not."""
    p = torch.linspace(-1, 1, 8)
    noise = p.clone()
    noise[0] += 1e-3
    moved = p.clone()
    moved[:5] += 1e-3
    assert speed.parameter_difference({"w": p}, {"w": noise})[1]
    assert not speed.parameter_difference({"w": p}, {"w": moved})[1]
    assert not speed.parameter_difference({"w": p}, {"v": p})[1]
