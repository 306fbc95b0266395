"""Consensus TIES and LiNeS on TIES (``merge: ties``) against hand-worked examples.

Their equality with the official code (nik-dim/tall_masks, wang-kee/LiNeS) is in
tests/reference/test_ties_variants.py; these tests need no reference: each example's result is
worked out by hand below (TIES: keep each task's top ``floor(density N)`` magnitudes, elect the
sign of each entry's trimmed sum, add or average the agreeing entries), and two identities tie
the variants to ``ties`` itself on a multi-tensor model (trim over the whole model).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from clpeft.errors import UserError
from clpeft.merging import merge, merge_files

F64 = torch.float64


def random_models(shapes: dict[str, tuple[int, ...]], tasks: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator, dtype=F64) for k, s in shapes.items()}
    sizes = [0.02, 0.1, 0.3]  # per tensor, so that trimming over the whole model and per tensor differ
    tuned = [
        {k: v + sizes[i % 3] * torch.randn(v.shape, generator=generator, dtype=F64) for i, (k, v) in enumerate(base.items())}
        for _ in range(tasks)
    ]
    return base, tuned


SHAPES = {"blocks.0.w": (6, 4), "blocks.1.w": (5,), "blocks.2.w": (3, 3), "head.w": (7,)}


# ------------------------------------------------------------------ consensus TIES

TAUS = torch.tensor([[-0.8, 0.0, -0.2, 0.4], [-0.8, 0.5, -0.1, 0.6], [-0.5, -0.6, 0.2, 0.1]], dtype=F64)


def test_consensus_ties_by_hand():
    """density 0.5 keeps 2 of 4 entries per task: [-.8, 0, 0, .4], [-.8, 0, 0, .6], [-.5, -.6, 0, 0].
    Elected signs (trimmed sums -2.1, -0.6, 0, 1.0): -, -, +, +; disjoint sum tau_TIES = [-2.1, -0.6, 0, 1.0].
    TALL masks at lambda 0.5, |tau_t| > 0.5 |tau_TIES - tau_t| with the untrimmed tau_t:
      task 0: .8 > .65 yes, 0 > .3 no, .2 > .1 yes, .4 > .3 yes
      task 1: .8 > .65 yes, .5 > .55 no, .1 > .05 yes, .6 > .2 yes
      task 2: .5 > .8 no, .6 > 0 yes, .2 > .1 yes, .1 > .45 no
    counts [2, 1, 3, 2]: k = 2 keeps entries 0, 2, 3."""
    base = {"w": torch.zeros(4, dtype=F64)}
    tuned = [{"w": t} for t in TAUS]
    ties = {"merge": "ties", "density": 0.5, "tall_mask_lambda": 0.5}
    merged = merge(base, tuned, "consensus", **ties, min_tasks=2, scale=0.5)["w"]
    torch.testing.assert_close(merged, torch.tensor([-1.05, 0.0, 0.0, 0.5], dtype=F64), rtol=0, atol=1e-12)
    merged = merge(base, tuned, "consensus", **ties, min_tasks=1, scale=1.0)["w"]
    torch.testing.assert_close(merged, torch.tensor([-2.1, -0.6, 0.0, 1.0], dtype=F64), rtol=0, atol=1e-12)
    task_2 = merge(base, tuned, "consensus", **ties, task=2, scale=1.0)["w"]
    torch.testing.assert_close(task_2, torch.tensor([0.0, -0.6, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12)
    # disjoint mean: tau_TIES = [-0.7, -0.6, 0, 0.5]; masks: task 0 .8 > .05 yes, 0 > .3 no, .2 > .1 yes, .4 > .05 yes;
    # task 1 yes, .5 > .55 no, yes, .6 > .05 yes; task 2 .5 > .1 yes, .6 > 0 yes, yes, .1 > .2 no: counts [3, 1, 3, 2]
    merged = merge(base, tuned, "consensus", **ties, disjoint="mean", min_tasks=3, scale=1.0)["w"]
    torch.testing.assert_close(merged, torch.tensor([-0.7, 0.0, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12)
    # task arithmetic's tau_MTL = [-2.1, -0.1, -0.1, 1.1]: masks count [2, 2, 3, 2], k = 2 keeps everything
    plain = merge(base, tuned, "consensus", tall_mask_lambda=0.5, min_tasks=2, scale=0.5)["w"]
    torch.testing.assert_close(plain, torch.tensor([-1.05, -0.05, -0.05, 0.55], dtype=F64), rtol=0, atol=1e-12)


def test_consensus_ties_without_masking_is_ties_over_the_whole_model():
    """k = 0 keeps every entry: consensus TIES is TIES (disjoint sum) at the same scale, trimmed over the whole model."""
    base, tuned = random_models(SHAPES, tasks=3)
    ours = merge(base, tuned, "consensus", merge="ties", min_tasks=0, scale=0.7)
    expected = merge(base, tuned, "ties", disjoint="sum", scale=0.7)
    per_tensor = merge(base, tuned, "ties", disjoint="sum", scale=0.7, trim_scope="tensor")
    for k in base:
        torch.testing.assert_close(ours[k], expected[k], rtol=0, atol=1e-12)
    assert any(not torch.allclose(ours[k], per_tensor[k]) for k in base)
    ours = merge(base, tuned, "consensus", merge="ties", trim_scope="tensor", min_tasks=0, scale=0.7)
    for k in base:
        torch.testing.assert_close(ours[k], per_tensor[k], rtol=0, atol=1e-12)


# ------------------------------------------------------------------ LiNeS on TIES

LINES_TAUS = [
    {"blocks.0.w": [0.9, -0.1], "blocks.1.w": [0.3, 0.5], "head.w": [-0.2, 0.05]},
    {"blocks.0.w": [-0.4, 0.6], "blocks.1.w": [0.2, -0.7], "head.w": [0.8, 0.1]},
]


def test_lines_ties_by_hand():
    """N = 6, density 0.5 keeps 3 entries per task over the whole model:
    task 0 keeps .9, .5, .3 (blocks.0 [.9, 0], blocks.1 [.3, .5], head [0, 0]);
    task 1 keeps .8, .7, .6 (blocks.0 [0, .6], blocks.1 [0, -.7], head [.8, 0]).
    Signs of the trimmed sums: blocks.0 +, +; blocks.1 +, -; head +, + (zero);
    disjoint mean tau_TIES: blocks.0 [.9, .6], blocks.1 [.3, -.7], head [.8, 0]: L1 3.3.
    Untrimmed sum: [.5, .5], [.5, -.2], [.6, .15]: L1 2.45. alpha = (2.45 / 3.3) / 2; L = 2:
    blocks.0 and head get alpha, blocks.1 alpha + beta."""
    base = {k: torch.zeros(2, dtype=F64) for k in LINES_TAUS[0]}
    tuned = [{k: torch.tensor(v, dtype=F64) for k, v in t.items()} for t in LINES_TAUS]
    alpha = 2.45 / 3.3 / 2
    tau = {"blocks.0.w": [0.9, 0.6], "blocks.1.w": [0.3, -0.7], "head.w": [0.8, 0.0]}
    coefficient = {"blocks.0.w": alpha, "blocks.1.w": alpha + 0.4, "head.w": alpha}
    merged = merge(base, tuned, "lines", merge="ties", density=0.5, beta=0.4)
    for k, v in tau.items():
        torch.testing.assert_close(merged[k], coefficient[k] * torch.tensor(v, dtype=F64), rtol=0, atol=1e-12, msg=k)
    # a given alpha is used as it is (no norm sweep)
    merged = merge(base, tuned, "lines", merge="ties", density=0.5, alpha=0.2, beta=0.4)
    torch.testing.assert_close(merged["blocks.1.w"], 0.6 * torch.tensor(tau["blocks.1.w"], dtype=F64), rtol=0, atol=1e-12)


def test_lines_ties_at_zero_beta_is_ties_scaled_by_alpha():
    """beta 0 scales every tensor by alpha: TIES at scale alpha (trim over the whole model, disjoint mean)."""
    base, tuned = random_models(SHAPES, tasks=3, seed=1)
    for trim_scope in ("model", "tensor"):
        ours = merge(base, tuned, "lines", merge="ties", alpha=0.4, beta=0.0, trim_scope=trim_scope)
        expected = merge(base, tuned, "ties", scale=0.4, trim_scope=trim_scope)
        for k in base:
            torch.testing.assert_close(ours[k], expected[k], rtol=0, atol=1e-12, msg=f"{trim_scope} {k}")


def test_ties_variants_stream_as_they_merge_in_memory(tmp_path):
    """The engine's sweeps (thresholds, then LiNeS' norms) give the same model from files."""
    base, tuned = random_models(SHAPES, tasks=3, seed=2)
    base = {k: v.float() for k, v in base.items()}
    tuned = [{k: v.float() for k, v in m.items()} for m in tuned]
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(tuned):
        save_file(m, tmp_path / f"m{i}.safetensors")
    models = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for method, params in [("consensus", {"merge": "ties"}), ("lines", {"merge": "ties"}), ("consensus", {"merge": "ties", "task": 1})]:
        out = tmp_path / f"{method}.safetensors"
        merge_files(tmp_path / "base.safetensors", models, out, method, progress="never", **params)
        streamed, in_memory = load_file(out), merge(base, tuned, method, **params)
        for k in base:
            torch.testing.assert_close(streamed[k], in_memory[k], rtol=0, atol=0, msg=f"{method} {k}")


def test_ties_variants_refuse_topk_over_the_whole_model():
    base, tuned = random_models({"w": (4,)}, tasks=2)
    for method in ("consensus", "lines"):
        with pytest.raises(UserError, match="trim: topk keeps exactly k entries"):
            merge(base, tuned, method, merge="ties", trim="topk")
