"""FusionBench's merge methods against clpeft's, on random state dicts.

FusionBench (tanganke/fusion_bench, ``pip install fusion-bench``) is imported at test time and
its own merging functions are called on the task vectors (the functions its algorithm classes
call, on the CPU); without it every test here skips with one line. Inputs: a float64 base of a
tall and a wide Linear weight, a bias and a conv kernel (merged as a non-matrix), and fine-tunes
that move each tensor by its own amount. Tolerance 1e-10 absolute on float64 weights (SVDs of
the same matrices computed in another order) unless a test says otherwise.

Fisher merging and RegMean need data: their statistics (diagonal Fishers, input Gram matrices)
are checked against independent autograd and hand computations in
tests/merging/test_fusionbench_methods.py, and here their merge of given statistics against
FusionBench's ``merging_with_fisher_weights`` and ``merging_with_regmean_weights``.

Deliberate differences, each shown here and explained in docs/merging.md: EMR's rescaler of a
task whose mask is empty is 0 (FusionBench divides by zero); TSV keeps ``r // T`` singular
vectors per task (FusionBench ``int(r * (1 / T))``, one fewer where the float rounds down).
FusionBench's ``TallMaskTaskArithmeticAlgorithm`` compares ``|theta_0 - tau_t|`` (pretrained
weights minus a task vector) where the paper and the official code compare ``|tau_t|``; clpeft
follows the paper and is tested against FusionBench's ``tall_mask.utils.generate_task_masks``,
which does too.
"""

from __future__ import annotations

import pytest
import torch

from clpeft.merging import functional_forward, get_method, merge

pytest.importorskip("fusion_bench", reason="fusion-bench is not installed: pip install fusion-bench")
from fusion_bench.method.emr_merging.utils import emr_merge  # noqa: E402
from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights  # noqa: E402
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: E402
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights  # noqa: E402
from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as algorithm_task_masks  # noqa: E402
from fusion_bench.method.tall_mask.utils import generate_task_masks  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction  # noqa: E402

ATOL = 1e-10
SHAPES = {
    "blocks.0.weight": (12, 8),
    "blocks.1.weight": (8, 12),
    "blocks.1.bias": (8,),
    "conv.weight": (4, 3, 2, 2),
    "text_projection": (6, 5),
}
EXCLUDED = ["text_projection"]  # averaged, not merged as a matrix (FusionBench's exclude_keys)


def state_dicts(tasks: int, seed: int = 0):
    """A float64 base and ``tasks`` fine-tunes; each fine-tune moves each tensor by its own amount."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator, dtype=torch.float64) for k, s in SHAPES.items()}
    finetuned = []
    for _ in range(tasks):
        sizes = torch.rand(len(base), generator=generator, dtype=torch.float64) * 0.1 + 1e-2
        finetuned.append(
            {k: v + s * torch.randn(v.shape, generator=generator, dtype=torch.float64) for (k, v), s in zip(base.items(), sizes)}
        )
    return base, finetuned


def task_vectors(base, finetuned):
    return [{k: m[k] - base[k] for k in base} for m in finetuned]


def assert_merged(merged, base, delta, atol=ATOL, rtol=0.0):
    assert set(merged) == set(base)
    for k in base:
        torch.testing.assert_close(merged[k] - base[k], delta[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_tsv_equals_fusionbench(tasks):
    base, finetuned = state_dicts(tasks)
    reference = compute_and_sum_svd_mem_reduction(task_vectors(base, finetuned), exclude_keys=EXCLUDED, accelerator="cpu")
    assert_merged(merge(base, finetuned, "tsv", scale=0.7, exclude=EXCLUDED), base, {k: 0.7 * v for k, v in reference.items()})


@pytest.mark.parametrize("tasks", [2, 3, 5])
def test_iso_c_equals_fusionbench(tasks):
    base, finetuned = state_dicts(tasks, seed=1)
    reference = iso_c(task_vectors(base, finetuned), exclude_keys=EXCLUDED, accelerator="cpu")
    assert_merged(merge(base, finetuned, "iso_c", scale=1.3, exclude=EXCLUDED), base, {k: 1.3 * v for k, v in reference.items()})


@pytest.mark.parametrize(("tasks", "fraction"), [(2, 0.8), (3, 0.8), (4, 0.5), (3, 0.5), (2, 0.0)])
def test_iso_cts_equals_fusionbench(tasks, fraction):
    base, finetuned = state_dicts(tasks, seed=2)
    reference = iso_cts(task_vectors(base, finetuned), common_space_fraction=fraction, exclude_keys=EXCLUDED, accelerator="cpu")
    merged = merge(base, finetuned, "iso_cts", common_space_fraction=fraction, scale=1.1, exclude=EXCLUDED)
    assert_merged(merged, base, {k: 1.1 * v for k, v in reference.items()})


@pytest.mark.parametrize("tasks", [2, 4])
def test_emr_unified_and_per_task_models_equal_fusionbench(tasks):
    """FusionBench sums the rescalers in float32 (``torch.zeros(num_tasks)``), clpeft in float64: rtol 1e-6."""
    base, finetuned = state_dicts(tasks, seed=3)
    unified, masks, rescalers = emr_merge(task_vectors(base, finetuned))
    assert_merged(merge(base, finetuned, "emr"), base, unified, atol=1e-15)
    for t in range(tasks):
        expected = {k: unified[k] * masks[k][t] * rescalers[t].item() for k in base}
        assert_merged(merge(base, finetuned, "emr", task=t), base, expected, atol=0, rtol=1e-6)


@pytest.mark.parametrize(("tall_mask_lambda", "min_tasks"), [(0.4, 2), (0.2, 1), (0.6, 3)])
def test_consensus_masks_equal_fusionbench(tall_mask_lambda, min_tasks):
    """TALL masks from FusionBench's flat-vector ``generate_task_masks``; the consensus count as the official code's."""
    base, finetuned = state_dicts(4, seed=4)
    flat_base = torch.cat([v.flatten() for v in base.values()])
    flat_tuned = torch.stack([torch.cat([m[k].flatten() for k in base]) for m in finetuned])
    masks = generate_task_masks(flat_tuned - flat_base, flat_tuned, flat_base, tall_mask_lambda=tall_mask_lambda)
    total = (flat_tuned - flat_base).sum(dim=0)
    assert 0 < masks.sum() < masks.numel()
    expected_consensus = 0.3 * total * (masks.sum(dim=0) >= min_tasks)
    merged = merge(base, finetuned, "consensus", tall_mask_lambda=tall_mask_lambda, min_tasks=min_tasks, scale=0.3)
    delta = torch.cat([(merged[k] - base[k]).flatten() for k in base])
    torch.testing.assert_close(delta, expected_consensus, rtol=0, atol=1e-12)
    for t in range(4):
        merged = merge(base, finetuned, "consensus", tall_mask_lambda=tall_mask_lambda, task=t, scale=1.0)
        delta = torch.cat([(merged[k] - base[k]).flatten() for k in base])
        torch.testing.assert_close(delta, total * masks[t], rtol=0, atol=1e-12)


def data_models(tasks: int):
    """A 4-6-3 MLP, its base state dict, ``tasks`` fine-tunes and two batches of inputs per task, float64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    tuned = [{k: v + 0.3 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in base.items()} for _ in range(tasks)]
    loaders = [[torch.randn(5, 4, generator=generator, dtype=torch.float64) for _ in range(2)] for _ in range(tasks)]
    return net, base, tuned, loaders


def test_fisher_merge_of_its_fishers_equals_fusionbench():
    """FusionBench without its (non-paper) Fisher-norm rescaling, uniform coefficients 1/K, floor 1e-6."""
    net, base, tuned, loaders = data_models(3)
    result = get_method("fisher").fn(base, tuned, forward=functional_forward(net, [lambda h: h] * 3), loaders=loaders)
    reference = merging_with_fisher_weights(
        {k: [m[k] for m in tuned] for k in base},
        result.fishers,
        torch.ones(3) / 3,
        normalize_fisher_weight=False,
        minimal_fisher_weight=1e-6,
    )
    for k in base:
        torch.testing.assert_close(result.state_dict[k], reference[k], rtol=0, atol=1e-12, msg=k)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_regmean_merge_of_its_grams_equals_fusionbench(alpha):
    """FusionBench keys the Gram matrices by module name and inverts their sum; clpeft solves. FusionBench forms
    the shrinking factors in float32 (``torch.ones(n) - ratio``), so below alpha 1 they differ by ~1e-8: rtol 1e-6."""
    net, base, tuned, loaders = data_models(2)
    result = get_method("regmean").fn(base, tuned, model=net, loaders=loaders, alpha=alpha)
    grams = [{name.removesuffix(".weight"): g for name, g in gs.items()} for gs in result.grams]
    reference = merging_with_regmean_weights({k: [m[k] for m in tuned] for k in base}, grams, reduce_non_diagonal_ratio=alpha)
    for k in base:
        torch.testing.assert_close(result.state_dict[k], reference[k], rtol=0 if alpha == 1.0 else 1e-6, atol=1e-10, msg=k)


def test_differences_from_fusionbench():
    """Each deliberate difference of the module docstring, shown on FusionBench's own functions."""
    # TSV, r = T = 49: FusionBench's int(49 * (1 / 49)) = 0 keeps no singular vector, clpeft's 49 // 49 = 1 keeps one each
    generator = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(49, 60, generator=generator, dtype=torch.float64)}
    tuned = [{"w": base["w"] + 0.1 * torch.randn(49, 60, generator=generator, dtype=torch.float64)} for _ in range(49)]
    assert torch.equal(
        compute_and_sum_svd_mem_reduction(task_vectors(base, tuned), accelerator="cpu")["w"], torch.zeros(49, 60, dtype=torch.float64)
    )
    assert torch.linalg.matrix_rank(merge(base, tuned, "tsv")["w"] - base["w"]) == 49
    # EMR, a task whose mask is empty: FusionBench's rescaler divides by zero (inf, and 0 * inf = NaN weights), clpeft's is 0
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    tuned = [{"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}, {"w": torch.tensor([-0.5, 0.0], dtype=torch.float64)}]
    _, _, rescalers = emr_merge(task_vectors(base, tuned))
    assert not rescalers[1].isfinite() and torch.equal(merge(base, tuned, "emr", task=1)["w"], base["w"])
    # TALL masks: FusionBench's TallMaskTaskArithmeticAlgorithm passes the pretrained weights where theta_0 - theta_t belongs
    base, finetuned = state_dicts(3, seed=7)
    taus = task_vectors(base, finetuned)
    total = {k: sum(t[k] for t in taus) for k in base}
    algorithm = algorithm_task_masks(total, taus[0], base, tall_mask_lambda=0.4)
    paper = {k: taus[0][k].abs() > 0.4 * (total[k] - taus[0][k]).abs() for k in base}
    clpeft = {k: merge(base, finetuned, "consensus", task=0, scale=1.0, tall_mask_lambda=0.4)[k] != base[k] for k in base}
    assert all(torch.equal(clpeft[k], paper[k]) for k in base)
    assert not all(torch.equal(algorithm[k].bool(), paper[k]) for k in base)
