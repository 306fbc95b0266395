"""Consensus TIES and LiNeS on TIES against their papers' official code (``shared/refs``).

* ``tall-masks`` (nik-dim/tall_masks, MIT, the ICML 2024 paper's code): ``create_task_vector`` of
  ``src/eval/aggregation.py`` with ``method: tall_mask`` / ``consensus`` and ``use_ties: true``
  (TIES ``dis-sum`` at ``reset_thresh=20``, the TALL masks of ``construct_tall_mask`` and the
  consensus mask of ``construct_consensus_mask``), run as published;
* ``lines`` (wang-kee/LiNeS, MIT, the ICLR 2025 paper's code): ``create_task_vector`` with
  ``method: ties`` (its ``config/method/ties.yaml``: ``k`` 20, ``agg`` mean), which records the L1
  norms ``norm_mtv`` and ``norm_summed_tvs``, then ``evaluate`` of ``src/eval/eval.py`` with
  ``apply_lines: true``: its ``alpha`` from those norms and ``LiNeS_scaling`` over ViT-B's 12 blocks.

The official code's checkpoint loading, CLIP encoder, data sets and stored mask files are replaced
from the test side (a ``get_all_checkpoints`` returning the state dicts, a task-vector class that
applies itself as the official ``apply_to`` does, ``load_tall_mask`` returning the masks
``construct_tall_mask`` built); every merging step is the official code's. Without the two folders
(they are not in every ``shared/refs``; see tests/reference/conftest.py) the tests skip with one
line, also under ``CI=true``.

Inputs: float64 state dicts whose tensors each move by their own amount, with all magnitudes of
each flattened task vector distinct. clpeft runs at the density that keeps the official
``floor(0.2 N) + 1`` entries per task (TIES' deliberate difference, tests/reference/test_merging.py).
Tolerance 1e-12 absolute on float64 weights.

Mutations checked once (each made a test here fail, then was restored): consensus TALL masks on
the trimmed task vectors (no clone before TIES); LiNeS ``alpha`` 1 / T on TIES (norm ratio dropped);
consensus ``disjoint`` default ``mean``.
"""

from __future__ import annotations

import ast
import importlib

import pytest
import torch

from clpeft.merging import get_method, merge

from .conftest import refs_root

omegaconf = pytest.importorskip("omegaconf", reason="the official code's configs need omegaconf")

ATOL = 1e-12
TASKS = 3
LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)  # construct_tall_mask's grid


def _require(folder: str) -> None:
    root = refs_root()
    if root is None or not (root / folder).is_dir():
        pytest.skip(f"reference code {folder!r} not found in shared/refs (set CLPEFT_REFS to a folder that holds it)")


class _TaskVector:
    """The official ``NonLinearTaskVector`` without CLIP: ``vector`` and ``apply_to`` (theta_0 + coef * tau)."""

    applied: list[dict[str, torch.Tensor]] = []  # a class attribute: survives LiNeS_scaling's deepcopy

    def __init__(self, model_name=None, vector=None):
        self.vector = vector

    def norm(self) -> float:
        return float(torch.cat([v.reshape(-1) for v in self.vector.values()]).norm())

    def apply_to(self, pretrained: dict[str, torch.Tensor], scaling_coef: float = 1.0) -> dict[str, torch.Tensor]:
        model = {k: pretrained[k] + scaling_coef * self.vector[k] for k in pretrained}
        _TaskVector.applied.append(model)
        return model


def _stubs(stub_module):
    return {
        "wandb": stub_module("wandb", log=lambda *args, **kwargs: None),
        "src.models.task_vectors": stub_module(
            "src.models.task_vectors", ImageEncoder=None, NonLinearTaskVector=_TaskVector, _Checkpoint=object, _TaskVector=object
        ),
        "src.models.heads": stub_module("src.models.heads", get_classification_head=None),
        "src.models.modeling": stub_module("src.models.modeling", ImageClassifier=None),
        "src.datasets.common": stub_module("src.datasets.common", get_dataloader=None, maybe_dictionarize=None),
        "src.datasets.registry": stub_module("src.datasets.registry", get_dataset=None),
    }


def state_dicts(shapes: dict[str, tuple[int, ...]], seed: int = 0):
    """float64 base and three fine-tunes; each task moves each tensor by its own amount."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator, dtype=torch.float64) for k, s in shapes.items()}
    finetuned = []
    for _ in range(TASKS):
        sizes = torch.rand(len(base), generator=generator, dtype=torch.float64) * 0.1 + 1e-3
        finetuned.append(
            {k: v + s * torch.randn(v.shape, generator=generator, dtype=torch.float64) for (k, v), s in zip(base.items(), sizes)}
        )
    flat = torch.stack([torch.cat([(m[k] - base[k]).reshape(-1) for k in sorted(base)]) for m in finetuned])
    assert all(row.abs().unique().numel() == row.numel() for row in flat), "magnitude ties"
    return base, finetuned, flat.shape[1]


def _one_more(density: float, n: int) -> float:
    """The density at which clpeft keeps ``floor(density n) + 1`` entries, as the official code does at ``density``."""
    return (int(density * n) + 1.5) / n


def _config(**method):
    datasets = [f"Task{t}" for t in range(TASKS)]
    return omegaconf.OmegaConf.create({"model": "ViT-B-32", "num_tasks": TASKS, "DATASETS": datasets, "method": method})


def _assert_close(ours: dict, expected: dict) -> None:
    assert set(ours) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=ATOL, msg=name)


# ------------------------------------------------------------------ consensus TIES (tall-masks)

CONSENSUS_SHAPES = {"a.weight": (12, 7), "a.bias": (12,), "b.weight": (5, 3, 2, 2), "c.weight": (9,)}


def _official_tall_masks(load_reference, stub_module, monkeypatch, base, finetuned, prun_thre_k):
    """TIES' task vector, the TALL masks per lambda and each lambda's consensus task vector, as published."""
    with load_reference("tall-masks", "src.eval.aggregation", stubs=_stubs(stub_module)) as aggregation:
        monkeypatch.setattr(aggregation, "get_all_checkpoints", lambda config: (finetuned, base))
        tall = _config(name="tall_mask", k=100, use_ties=True, ties_agg="sum", load_mask=False)
        ties_vector, masks = aggregation.create_task_vector(tall)
        consensus = {}
        tallmask_utils = importlib.import_module("src.utils.tallmask_utils")
        for lam in LAMBDAS:
            monkeypatch.setattr(tallmask_utils, "load_tall_mask", lambda remove_keys, ptm, config, lam=lam: masks[lam])
            config = _config(name="consensus", k=100, prun_thre_k=prun_thre_k, use_ties=True, ties_agg="sum")
            consensus[lam] = aggregation.create_task_vector(config)[0].vector
    return ties_vector.vector, masks, consensus


@pytest.mark.parametrize("prun_thre_k", [1, 2, 3])
def test_consensus_ties_equals_the_official_code(load_reference, stub_module, monkeypatch, prun_thre_k):
    """``method: consensus, use_ties: true`` at each lambda of the official grid equals clpeft's
    ``merge: ties`` (its defaults: density 0.2 over the whole model, disjoint sum), at a scale."""
    _require("tall-masks")
    base, finetuned, n = state_dicts(CONSENSUS_SHAPES)
    ties_vector, _, consensus = _official_tall_masks(load_reference, stub_module, monkeypatch, base, finetuned, prun_thre_k)
    density = _one_more(0.2, n)
    for lam in LAMBDAS:
        expected = {k: base[k] + 0.7 * consensus[lam][k] for k in base}
        ours = merge(base, finetuned, "consensus", merge="ties", density=density, tall_mask_lambda=lam, min_tasks=prun_thre_k, scale=0.7)
        _assert_close(ours, expected)
    removed = {lam: sum(int(((consensus[lam][k] == 0) & (ties_vector[k] != 0)).sum()) for k in base) for lam in LAMBDAS}
    if prun_thre_k == 2:  # the paper's k: the consensus mask removes entries of tau_TIES, more as lambda grows
        assert 0 < removed[0.2] < removed[0.6]


def test_tall_masks_on_ties_equal_the_official_reconstruction(load_reference, stub_module, monkeypatch):
    """``method: tall_mask, use_ties: true``: task t's model is theta_0 + m_t * tau_TIES (the
    official ``evaluate`` with ``eval_masks`` at coefficient 1) = clpeft's ``task: t, scale: 1``."""
    _require("tall-masks")
    base, finetuned, n = state_dicts(CONSENSUS_SHAPES, seed=1)
    ties_vector, masks, _ = _official_tall_masks(load_reference, stub_module, monkeypatch, base, finetuned, 2)
    for lam in (0.2, 0.5):
        for t in range(TASKS):
            mask = masks[lam][f"Task{t}"]
            expected = {k: base[k] + ties_vector[k] * mask[k].bool() for k in base}
            ours = merge(base, finetuned, "consensus", merge="ties", density=_one_more(0.2, n), tall_mask_lambda=lam, task=t, scale=1.0)
            _assert_close(ours, expected)


def _literal(node: ast.expr):
    """A constant, or an f-string without fields (``f"dis-sum"``); None otherwise."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
        return "".join(v.value for v in node.values)
    return None


def test_consensus_ties_defaults_are_the_official_calls():
    """The ``use_ties`` calls of ``ties_merging`` (TALL masks and consensus) pass ``reset_thresh=20,
    merge_func="dis-sum"``: clpeft's defaults density 0.2, disjoint sum."""
    _require("tall-masks")
    tree = ast.parse((refs_root() / "tall-masks" / "src" / "eval" / "aggregation.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ties_merging"]
    arguments = [{kw.arg: _literal(kw.value) for kw in call.keywords} for call in calls]
    fixed = [a for a in arguments if a["reset_thresh"] is not None]  # the plain ties method reads config.method.k
    assert len(fixed) == 2 and all(a == {"reset_thresh": 20, "merge_func": "dis-sum"} for a in fixed)
    defaults = get_method("consensus").validate({})
    assert (defaults["density"], defaults["disjoint"], defaults["trim_scope"]) == (0.2, "sum", "model")


# ------------------------------------------------------------------ LiNeS on TIES (lines)

LINES_SHAPES = {
    "embed.weight": (6, 4),
    **{f"resblocks.{i}.attn.weight": (3, 2 + i % 3) for i in range(12)},
    **{f"resblocks.{i}.ln.bias": (3,) for i in range(0, 12, 4)},
    "ln_post.weight": (5,),
}


def _official_lines(load_reference, stub_module, monkeypatch, base, finetuned, beta):
    """``create_task_vector`` (method ties) then ``evaluate`` with ``apply_lines``: the model it applies."""
    with load_reference("lines", "src.eval.aggregation", stubs=_stubs(stub_module)) as aggregation:
        monkeypatch.setattr(aggregation, "get_all_checkpoints", lambda config: (finetuned, base))
        config = _config(name="ties", k=20, agg="mean", apply_lines=True)
        task_vector, _ = aggregation.create_task_vector(config)
        omegaconf.OmegaConf.set_struct(config, False)
        config.update({"eval_datasets": [], "control_dataset": None})  # no data: evaluate only builds the model
        _TaskVector.applied.clear()
        importlib.import_module("src.eval.eval").evaluate(base, task_vector, config, beta)
    (model,) = _TaskVector.applied
    return model, config.norm_summed_tvs / config.norm_mtv


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_lines_on_ties_equals_the_official_code(load_reference, stub_module, monkeypatch, beta):
    """LiNeS on TIES (``alpha`` from the L1 norms, 12 blocks, ``beta`` the searched coefficient)
    equals clpeft's ``lines`` with ``merge: ties`` (defaults density 0.2 over the whole model, disjoint mean)."""
    _require("lines")
    base, finetuned, n = state_dicts(LINES_SHAPES, seed=2)
    expected, ratio = _official_lines(load_reference, stub_module, monkeypatch, base, finetuned, beta)
    assert abs(ratio - 1.0) > 0.1  # alpha differs from task arithmetic's 1 / T here
    _assert_close(merge(base, finetuned, "lines", merge="ties", density=_one_more(0.2, n), beta=beta), expected)
    defaults = get_method("lines").validate({})
    assert (defaults["density"], defaults["disjoint"], defaults["trim_scope"]) == (0.2, "mean", "model")
