"""The FusionBench / reading-list merge methods against their papers' formulas.

Their equality with FusionBench's own implementations is in
tests/reference/test_fusionbench_methods.py; these tests need no FusionBench: each checks a
method against a hand-worked example or an independent float64 computation of its formula
(for the spectral methods, properties that define them: a flat spectrum on the summed matrix's
singular vectors, orthonormalised stacks computed as ``A (A^T A)^(-1/2)`` by an eigendecomposition).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from clpeft.errors import UserError
from clpeft.merging import MergeRules, functional_forward, get_method, merge, merge_files
from clpeft.merging.methods.iso_cts import subspace_sizes
from clpeft.merging.methods.lines import block_index

F64 = torch.float64


def random_models(shapes: dict[str, tuple[int, ...]], tasks: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator, dtype=F64) for k, s in shapes.items()}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=generator, dtype=F64) for k, v in base.items()} for _ in range(tasks)]
    return base, tuned


def deltas(merged, base):
    return {k: merged[k] - base[k] for k in base}


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """``A (A^T A)^(-1/2)`` from an eigendecomposition: the orthogonal factor, computed without an SVD."""
    values, vectors = torch.linalg.eigh(matrix.T @ matrix)
    return matrix @ vectors @ torch.diag(values.rsqrt()) @ vectors.T


# ------------------------------------------------------------------ TSV


def test_tsv_of_task_matrices_in_orthogonal_subspaces_is_their_sum():
    """Rank-1 tasks on orthonormal vectors: the stacks are already orthonormal, so TSV-Merge adds them."""
    eye_m, eye_n = torch.eye(4, dtype=F64), torch.eye(3, dtype=F64)
    tasks = [3.0 * torch.outer(eye_m[0], eye_n[1]), 2.0 * torch.outer(eye_m[2], eye_n[0])]
    base = {"w": torch.zeros(4, 3, dtype=F64)}
    merged = merge(base, [{"w": t} for t in tasks], "tsv")
    torch.testing.assert_close(merged["w"], tasks[0] + tasks[1], rtol=0, atol=1e-12)


def test_tsv_keeps_r_over_t_singular_vectors_per_task_and_decorrelates_them():
    base, tuned = random_models({"w": (10, 6), "b": (10,)}, tasks=3)
    tau = [m["w"] - base["w"] for m in tuned]
    k = 6 // 3
    svds = [torch.linalg.svd(t, full_matrices=False) for t in tau]
    stacked_u = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    stacked_s = torch.cat([s[:k] for _, s, _ in svds])
    stacked_v = torch.cat([vh[:k].T for _, _, vh in svds], dim=1)
    expected = polar(stacked_u) @ torch.diag(stacked_s) @ polar(stacked_v).T
    merged = deltas(merge(base, tuned, "tsv", scale=0.5), base)
    torch.testing.assert_close(merged["w"], 0.5 * expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(merged["b"], 0.5 * sum(m["b"] - base["b"] for m in tuned) / 3, rtol=0, atol=1e-12)


def test_tsv_with_more_tasks_than_rank_keeps_nothing_of_a_matrix():
    base, tuned = random_models({"w": (2, 5)}, tasks=3)
    assert torch.equal(merge(base, tuned, "tsv")["w"], base["w"])


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_excluded_matrices_are_averaged(method):
    base, tuned = random_models({"proj.w": (5, 4), "blocks.0.w": (5, 4)}, tasks=2)
    merged = deltas(merge(base, tuned, method, exclude=["proj.*"], scale=2.0), base)
    torch.testing.assert_close(merged["proj.w"], (tuned[0]["proj.w"] + tuned[1]["proj.w"] - 2 * base["proj.w"]), rtol=0, atol=1e-12)
    assert not torch.allclose(merged["blocks.0.w"], (tuned[0]["blocks.0.w"] + tuned[1]["blocks.0.w"] - 2 * base["blocks.0.w"]))


# ------------------------------------------------------------------ ISO-C / ISO-CTS


def test_iso_c_has_a_flat_spectrum_on_the_summed_matrix_singular_vectors():
    base, tuned = random_models({"w": (9, 5), "b": (9,)}, tasks=4)
    total = sum(m["w"] - base["w"] for m in tuned)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    merged = deltas(merge(base, tuned, "iso_c", scale=2.0), base)
    torch.testing.assert_close(u.T @ merged["w"] @ vh.T, 2.0 * s.mean() * torch.eye(5, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.linalg.svdvals(merged["w"]), torch.full((5,), 2.0 * float(s.mean()), dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(merged["b"], 2.0 * sum(m["b"] - base["b"] for m in tuned) / 4, rtol=0, atol=1e-12)


def test_iso_cts_spans_the_common_and_each_task_subspace_with_a_flat_spectrum():
    base, tuned = random_models({"w": (12, 8)}, tasks=2)
    tau = [m["w"] - base["w"] for m in tuned]
    common, specific = subspace_sizes(8, 2, 0.5)
    assert (common, specific) == (4, 2)
    u, s, _ = torch.linalg.svd(sum(tau), full_matrices=False)
    projector = u[:, :common] @ u[:, :common].T
    own = [torch.linalg.svd(t - projector @ t, full_matrices=False) for t in tau]
    sigma_bar = torch.cat([s[:common], *(o[1][:specific] for o in own)]).mean()
    merged = deltas(merge(base, tuned, "iso_cts", common_space_fraction=0.5), base)["w"]
    torch.testing.assert_close(torch.linalg.svdvals(merged), torch.full((8,), float(sigma_bar), dtype=F64), rtol=0, atol=1e-10)
    stacked = torch.cat([*(o[0][:, :specific] for o in own), u[:, :common]], dim=1)
    column_space = polar(stacked)  # the merged matrix's left singular space
    torch.testing.assert_close(column_space @ column_space.T @ merged, merged, rtol=0, atol=1e-10)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, tuned = random_models({"w": (7, 6), "b": (7,)}, tasks=3)
    assert subspace_sizes(6, 3, 1.0) == (6, 0)
    iso_c, iso_cts = merge(base, tuned, "iso_c"), merge(base, tuned, "iso_cts", common_space_fraction=1.0)
    for k in base:
        torch.testing.assert_close(iso_cts[k], iso_c[k], rtol=0, atol=1e-10)


def test_iso_cts_subspace_sizes_round_as_the_official_code_and_never_past_the_rank():
    assert subspace_sizes(768, 8, 0.8) == (768 - 152, 19)  # ViT-B: int(614.4) = 614, round(154 / 8) = 19
    assert subspace_sizes(2, 3, 0.0) == (2, 0)  # the official rounding (round(2/3) = 1) would need 3 > 2 directions
    base, tuned = random_models({"w": (2, 4)}, tasks=3)
    assert torch.isfinite(merge(base, tuned, "iso_cts", common_space_fraction=0.0)["w"]).all()


# ------------------------------------------------------------------ consensus / TALL masks


def test_consensus_keeps_the_entries_that_at_least_k_tall_masks_keep():
    """Hand-worked: tau_MTL = [3, 0.2, 1.1, 0]; lambda 0.5."""
    taus = torch.tensor([[1.0, 0.1, 1.0, 0.0], [1.0, 0.1, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    # |tau_t| > 0.5 |tau_MTL - tau_t|:  entry 0: 1 > 1 no (x3); entry 1: 0.1 > 0.05 yes (tasks 0, 1), 0 > 0.1 no;
    # entry 2: 1 > 0.05 yes, 0.1 > 0.5 no, 0 > 0.55 no; entry 3: nothing is > 0
    base = {"w": torch.zeros(4, dtype=F64)}
    tuned = [{"w": t} for t in taus]
    merged = merge(base, tuned, "consensus", tall_mask_lambda=0.5, min_tasks=2, scale=1.0)["w"]
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.2, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12)
    merged = merge(base, tuned, "consensus", tall_mask_lambda=0.5, min_tasks=1, scale=0.5)["w"]
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.1, 0.55, 0.0], dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(merge(base, tuned, "consensus", min_tasks=0, scale=1.0)["w"], taus.sum(dim=0))  # k = 0: task arithmetic
    task_0 = merge(base, tuned, "consensus", tall_mask_lambda=0.5, task=0, scale=1.0)["w"]
    torch.testing.assert_close(task_0, torch.tensor([0.0, 0.2, 1.1, 0.0], dtype=F64), rtol=0, atol=1e-12)
    per_task = merge(base, tuned, "consensus", tall_mask_lambda=[0.5, 0.5, 0.0], min_tasks=1, scale=1.0)["w"]
    torch.testing.assert_close(per_task, torch.tensor([3.0, 0.2, 1.1, 0.0], dtype=F64), rtol=0, atol=1e-12)  # lambda 0: any update


def test_consensus_one_line_errors():
    base, tuned = random_models({"w": (3,)}, tasks=2)
    with pytest.raises(UserError, match="has 3 entries for 2 models"):
        merge(base, tuned, "consensus", tall_mask_lambda=[0.1, 0.2, 0.3])
    with pytest.raises(UserError, match="task 2 is out of range for 2 models"):
        merge(base, tuned, "consensus", task=2)


# ------------------------------------------------------------------ EMR


def test_emr_elects_masks_and_rescales_by_hand():
    """tau_1 = [1, -2, 0.5, 0], tau_2 = [3, 1, -1, 0]: sum [4, -1, -0.5, 0] elects [+, -, -, -] (zero: -);
    tau_uni = [3, -2, -1, 0]; M_1 = [1, 1, 0, 0], M_2 = [1, 0, 1, 0];
    lambda_1 = mean|tau_1| / mean|M_1 tau_uni| = 0.875 / 1.25 = 0.7, lambda_2 = 1.25 / 1 = 1.25."""
    base = {"w": torch.zeros(4, dtype=F64)}
    tuned = [{"w": torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)}, {"w": torch.tensor([3.0, 1.0, -1.0, 0.0], dtype=F64)}]
    torch.testing.assert_close(merge(base, tuned, "emr")["w"], torch.tensor([3.0, -2.0, -1.0, 0.0], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(merge(base, tuned, "emr", task=0)["w"], torch.tensor([2.1, -1.4, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(merge(base, tuned, "emr", task=1)["w"], torch.tensor([3.75, 0.0, -1.25, 0.0], dtype=F64), rtol=0, atol=1e-12)


def test_emr_rescalers_sum_each_tensors_mean_magnitude_over_the_whole_model():
    """Two tensors: lambda_t = (sum over tensors of mean|tau_t|) / (sum of mean|M_t tau_uni|), one per model."""
    base, tuned = random_models({"a": (6, 4), "b": (5,)}, tasks=3, seed=5)
    taus = [{k: m[k] - base[k] for k in base} for m in tuned]
    unified = deltas(merge(base, tuned, "emr"), base)
    for t in range(3):
        masks = {k: taus[t][k] * unified[k] > 0 for k in base}
        rescaler = sum(taus[t][k].abs().mean() for k in base) / sum((unified[k] * masks[k]).abs().mean() for k in base)
        merged = deltas(merge(base, tuned, "emr", task=t), base)
        for k in base:
            torch.testing.assert_close(merged[k], rescaler * masks[k] * unified[k], rtol=0, atol=1e-12)
    with pytest.raises(UserError, match="task 3 is out of range for 3 models"):
        merge(base, tuned, "emr", task=3)


def test_emr_task_with_an_empty_mask_is_the_base():
    base = {"w": torch.zeros(2, dtype=F64)}
    tuned = [{"w": torch.tensor([1.0, 1.0], dtype=F64)}, {"w": torch.tensor([0.0, 0.0], dtype=F64)}]
    assert torch.equal(merge(base, tuned, "emr", task=1)["w"], base["w"])


# ------------------------------------------------------------------ LiNeS


def test_lines_scales_each_block_linearly_with_its_depth():
    """Three blocks found from the names, two tasks: alpha = 1/2, blocks get 1/2 + beta * l / 2, the head 1/2."""
    shapes = {"blocks.0.w": (3,), "blocks.1.w": (3,), "blocks.2.attn.qkv.weight": (2, 3), "head.weight": (4,)}
    base, tuned = random_models(shapes, tasks=2)
    total = {k: tuned[0][k] + tuned[1][k] - 2 * base[k] for k in base}
    merged = deltas(merge(base, tuned, "lines", beta=0.4), base)
    for k, coefficient in zip(shapes, [0.5, 0.7, 0.9, 0.5]):
        torch.testing.assert_close(merged[k], coefficient * total[k], rtol=0, atol=1e-12)
    merged = deltas(merge(base, tuned, "lines", alpha=0.1, beta=1.0, num_blocks=5), base)
    for k, coefficient in zip(shapes, [0.1, 0.35, 0.6, 0.1]):
        torch.testing.assert_close(merged[k], coefficient * total[k], rtol=0, atol=1e-12)


def test_lines_block_pattern_and_errors():
    assert block_index("model.layers.11.mlp.experts.3.w1", r"\.(\d+)\.") == 11
    assert block_index("visual.transformer.resblocks.7.attn.in_proj_weight", r"resblocks\.(\d+)\.") == 7
    assert block_index("head.weight", r"\.(\d+)\.") is None
    base, tuned = random_models({"layers.0.w": (2,), "layers.3.w": (2,)}, tasks=2)
    with pytest.raises(UserError, match="tensor 'layers.3.w' is in block 3 but num_blocks is 2"):
        merge(base, tuned, "lines", num_blocks=2)
    assert get_method("lines").tensor_inputs == {"name"} and "name" not in get_method("lines").parameters


def test_model_statistic_methods_stream_as_they_merge_in_memory(tmp_path):
    """emr's rescalers and lines' block count come from the engine's whole-model pass: equal on files."""
    base, tuned = random_models({"blocks.0.w": (4, 3), "blocks.1.w": (4, 3), "norm.b": (4,)}, tasks=3, seed=7)
    base = {k: v.float() for k, v in base.items()}
    tuned = [{k: v.float() for k, v in m.items()} for m in tuned]
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(tuned):
        save_file(m, tmp_path / f"m{i}.safetensors")
    for method, params in [("emr", {"task": 1}), ("lines", {"beta": 0.3}), ("tsv", {}), ("iso_cts", {})]:
        out = tmp_path / f"{method}.safetensors"
        merge_files(
            tmp_path / "base.safetensors", [tmp_path / f"m{i}.safetensors" for i in range(3)], out, method, progress="never", **params
        )
        streamed, in_memory = load_file(out), merge(base, tuned, method, **params)
        for k in base:
            torch.testing.assert_close(streamed[k], in_memory[k], rtol=0, atol=0, msg=f"{method} {k}")


# ------------------------------------------------------------------ Fisher merging and RegMean (need data)


def tiny_classifiers(tasks: int, seed: int = 0):
    """A 4-5-3 MLP classifier, its base state dict and ``tasks`` fine-tunes, float64."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tuned = [{k: v + 0.3 * torch.randn(v.shape, generator=generator, dtype=F64) for k, v in base.items()} for _ in range(tasks)]
    return net, base, tuned


def test_fisher_is_the_expected_squared_score_per_example_and_weights_the_average():
    net, base, tuned = tiny_classifiers(2)
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(7, 4, generator=generator, dtype=F64) for _ in tuned]
    loaders = [[x[:3], x[3:6], x[6:]] for x in data]
    result = get_method("fisher").fn(base, tuned, forward=functional_forward(net, [lambda h: h] * 2), loaders=loaders, examples=5)
    for k, model in enumerate(tuned):
        expected = {name: torch.zeros_like(v) for name, v in model.items()}
        for x in data[k][:5]:  # examples=5: the first five, one at a time
            net.load_state_dict(model)
            log_p = net(x[None])[0].log_softmax(dim=-1)
            for label in range(3):
                grads = torch.autograd.grad(log_p[label], list(net.parameters()), retain_graph=True)
                for (name, _), grad in zip(net.named_parameters(), grads):
                    expected[name] += log_p[label].exp().detach() * grad.square() / 5
        for name in model:
            torch.testing.assert_close(result.fishers[k][name], expected[name], rtol=1e-10, atol=1e-14)
    for name in base:
        weights = [f[name] + 1e-6 for f in result.fishers]
        expected = (weights[0] * tuned[0][name] + weights[1] * tuned[1][name]) / (weights[0] + weights[1])
        torch.testing.assert_close(result.state_dict[name], expected, rtol=0, atol=1e-12)
    lopsided = get_method("fisher").fn(base, tuned, forward=functional_forward(net, [lambda h: h] * 2), loaders=loaders, weights=[1e9, 1.0])
    torch.testing.assert_close(lopsided.state_dict["2.bias"], tuned[0]["2.bias"], rtol=0, atol=1e-6)


def test_fisher_one_line_errors():
    net, base, tuned = tiny_classifiers(2)
    forward = functional_forward(net, [lambda h: h] * 2)
    with pytest.raises(UserError, match="got 1 data loaders for 2 models"):
        get_method("fisher").fn(base, tuned, forward=forward, loaders=[[torch.zeros(1, 4, dtype=F64)]])
    with pytest.raises(UserError, match="yields no examples"):
        get_method("fisher").fn(base, tuned, forward=forward, loaders=[[], []])


def test_regmean_solves_each_linear_layer_from_its_input_grams_and_averages_the_rest():
    net, base, tuned = tiny_classifiers(2, seed=2)
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(6, 2, 4, generator=generator, dtype=F64) for _ in tuned]  # two tokens per example
    alpha = 0.8
    result = get_method("regmean").fn(base, tuned, model=net, loaders=[[x[:4], x[4:]] for x in data], alpha=alpha)
    grams = {"0.weight": [], "2.weight": []}
    for model, x in zip(tuned, data):
        first = x.reshape(-1, 4)
        second = torch.tanh(first @ model["0.weight"].T + model["0.bias"])
        for name, inputs in (("0.weight", first), ("2.weight", second)):
            gram = inputs.T @ inputs / len(inputs)
            torch.testing.assert_close(result.grams[len(grams[name])][name], gram, rtol=0, atol=1e-12)
            grams[name].append(alpha * gram + (1 - alpha) * torch.diag(gram.diagonal()))
    for name, shrunk in grams.items():
        expected = torch.linalg.inv(sum(shrunk)) @ sum(g @ m[name].T for g, m in zip(shrunk, tuned))
        torch.testing.assert_close(result.state_dict[name], expected.T, rtol=0, atol=1e-10)
    for name in ("0.bias", "2.bias"):
        torch.testing.assert_close(result.state_dict[name], (tuned[0][name] + tuned[1][name]) / 2, rtol=0, atol=1e-15)


def test_regmean_with_one_task_s_data_for_both_is_the_average_and_a_singular_gram_is_one_line():
    net, base, tuned = tiny_classifiers(2, seed=4)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    result = get_method("regmean").fn(base, tuned, model=net, loaders=[[x], [x]], rules=MergeRules(skip=["2.*"]))
    torch.testing.assert_close(result.state_dict["0.weight"], (tuned[0]["0.weight"] + tuned[1]["0.weight"]) / 2, rtol=0, atol=1e-12)
    assert "2.weight" not in result.state_dict and set(result.grams[0]) == {"0.weight"}
    centred = x - x.mean(dim=1, keepdim=True)  # rows summing to 0, as after a LayerNorm without bias: rank 3 of 4
    for inputs in (centred, x.index_fill(1, torch.tensor([0]), 0.0)):  # and a feature no example uses
        with pytest.raises(UserError, match="summed input Gram matrix of '0.weight' is singular"):
            merge(base, tuned, "regmean", model=net, loaders=[[inputs], [inputs]], rules={"skip": ["2.*"]})
    assert torch.isfinite(merge(base, tuned, "regmean", model=net, loaders=[[centred], [centred]], alpha=0.9)["0.weight"]).all()
