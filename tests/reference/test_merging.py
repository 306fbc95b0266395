"""Task arithmetic, TIES, DARE and AdaMerging against the official code (``shared/refs``).

* ``ties-merging`` (prateeky2806/ties-merging, ``src/utils/merge_utils.py``): TIES on the whole
  flattened model (``state_dict_to_vector``, ``topk_values_mask``, ``resolve_sign``,
  ``disjoint_merge``, then ``theta_0 + lambda * tau_m``) and task vectors (``tv_merging``);
* ``adamerging`` (EnnengYang/AdaMerging, ``src/``): ``ties_merging_utils.py`` (its TIES
  baseline, ``dis-sum``), ``task_vectors.py`` (``TaskVector.apply_to``), and the scripts whose
  constants are clpeft's defaults (read from their syntax trees) and whose AdaMerging training
  loops (``main_task_wise_adamerging.py``, ``main_layer_wise_adamerging.py``) run here as
  published: their classes, set-up statements and ``for epoch in range(epochs)`` loop are
  executed from the files, with stubs for the data sets, heads and ``.cuda(0)``;
* DARE (Yu et al., ICML 2024, "Language Models are Super Mario", Section 3; no code in refs):
  the paper's formula, ``tau_hat = (1 - m) * tau / (1 - p)``, ``m ~ Bernoulli(p)``.

Inputs: a tiny model's float64 state dict (Linear, Conv2d and LayerNorm tensors of different
shapes) and four fine-tunes whose per-tensor change sizes differ, so trimming per tensor and over
the whole model disagree; the magnitudes of each task vector are all distinct (checked), so
"the top k" needs no tie convention. Tolerances: 1e-12 absolute on float64 weights and
coefficients (the same arithmetic in another order), unless a test says otherwise. One TIES test
casts them to float32, where clpeft's CPU merge runs in its compiled loops.

Deliberate differences, each shown by a test: the official ``topk_values_mask`` keeps
``floor(k N) + 1`` entries per task where clpeft keeps ``floor(k N)`` (peft's count; one entry
of a whole model); where the trimmed task vectors' mass cancels exactly the official code
elects the model's majority sign, clpeft ``+`` (peft's).

Mutations checked once (each made a test here fail, then was restored): ``trim_scope`` default
``tensor``; skipping pass 1 in ``MergeEngine._whole_model_pass``; TIES ``disjoint`` sum <-> mean;
``task_arithmetic`` scale 0.3 -> 1.0; AdaMerging ``batches`` 2 -> 1, ``fresh_pass`` default
False, ``init`` 0.3 -> 0.31, Adam betas (0.9, 0.99), ``raw.clamp`` removed; DARE dividing by
``1 - p`` removed; the compiled election's count ``a > 0`` -> ``a >= 0`` (the float32 TIES test).
"""

from __future__ import annotations

import ast
import copy
import inspect
import logging
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from clpeft.merging import adamerging, functional_forward, fused_cpu, get_method, merge
from clpeft.merging.methods.generalized import combine
from clpeft.merging.methods.model_trim import KthLargestMagnitude
from clpeft.merging.registry import ModelShape

TASKS = 4
ATOL = 1e-12


class Tiny(nn.Module):
    """Tensors of four shapes: (12, 7), (12,), (5, 3, 2, 2), (5,), (9,)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 12)
        self.b = nn.Conv2d(3, 5, 2)
        self.c = nn.LayerNorm(9)


@pytest.fixture(scope="module")
def state_dicts() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """float64 base and four fine-tunes; each task moves each tensor by its own amount."""
    torch.manual_seed(0)
    base = {k: v.detach().double() for k, v in Tiny().state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    finetuned = []
    for _ in range(TASKS):
        sizes = torch.rand(len(base), generator=generator, dtype=torch.float64) * 0.1 + 1e-3
        finetuned.append(
            {k: v + s * torch.randn(v.shape, generator=generator, dtype=torch.float64) for (k, v), s in zip(base.items(), sizes)}
        )
    flat = torch.stack([torch.cat([(m[k] - base[k]).reshape(-1) for k in base]) for m in finetuned])
    assert all(row.abs().unique().numel() == row.numel() for row in flat), "magnitude ties"
    return base, finetuned


def _ties_reference(load_reference, stub_module):
    stubs = {
        "src.utils.analysis_utils": stub_module("src.utils.analysis_utils", logging=logging),
        "transformers": stub_module("transformers", AutoModelForSeq2SeqLM=None),
        "matplotlib": stub_module("matplotlib"),
        "matplotlib.pyplot": stub_module("matplotlib.pyplot"),
    }
    return load_reference("ties-merging", "src.utils.merge_utils", stubs=stubs)


def _adamerging_reference(load_reference, stub_module, module: str):
    stubs = {"matplotlib": stub_module("matplotlib"), "matplotlib.pyplot": stub_module("matplotlib.pyplot")}
    return load_reference("adamerging", module, subdir="src", stubs=stubs)


def _flat(ref, base, finetuned):
    """The official flattening: ``state_dict_to_vector`` (sorted names) of each model, task vectors."""
    flat_ptm = ref.state_dict_to_vector(base)
    return flat_ptm, torch.vstack([ref.state_dict_to_vector(m) for m in finetuned]) - flat_ptm


def _official_ties(ref, task_vectors: torch.Tensor) -> torch.Tensor:
    """The README's TIES: ``topk20_mass_dis-mean`` (``merge_methods``), the merged task vector."""
    return ref.merge_methods("topk", task_vectors, reset_thresh=20, resolve_method="mass", merge_func="dis-mean")


def _one_more(density: float, n: int) -> float:
    """The density at which clpeft keeps ``floor(density n) + 1`` entries, as the reference does at ``density``."""
    return (int(density * n) + 1.5) / n


def _assert_state_close(ours: dict, expected: dict, atol: float = ATOL) -> None:
    assert set(ours) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=atol, msg=name)


def _script_tree(module) -> dict[str, ast.Module]:
    """The syntax trees of AdaMerging's scripts, beside ``module``'s file."""
    folder = Path(module.__file__).parent
    names = ["main_task_arithmetic", "main_ties_merging", "main_task_wise_adamerging", "main_layer_wise_adamerging"]
    return {name: ast.parse((folder / f"{name}.py").read_text()) for name in names}


def _constant(tree: ast.Module, name: str):
    """The literal assigned to ``name`` anywhere in ``tree`` (the first assignment)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(name)


# ----------------------------------------------------------------------------------------- TIES


def test_ties_equals_the_official_flattened_model_code(load_reference, stub_module, state_dicts):
    """``topk20_mass_dis-mean`` at the README's lambdas equals clpeft's default TIES (``trim_scope: model``).

    clpeft runs at the density that keeps the reference's count (one entry more, see the next test).
    """
    base, finetuned = state_dicts
    with _ties_reference(load_reference, stub_module) as ref:
        flat_ptm, task_vectors = _flat(ref, base, finetuned)
        merged_tv = _official_ties(ref, task_vectors)
        expected = {lam: dict(ref.vector_to_state_dict(flat_ptm + lam * merged_tv, base)) for lam in (0.8, 1.0, 2.5)}
    density = _one_more(0.2, task_vectors.shape[1])
    for lam, state in expected.items():
        _assert_state_close(merge(base, finetuned, "ties", density=density, scale=lam), state)


def test_ties_in_float32_through_the_compiled_loops_equals_the_official_code(load_reference, stub_module, state_dicts, monkeypatch):
    """The same comparison in float32, where a CPU merge runs every step in the compiled loops
    (``clpeft.merging.fused_cpu``: task vectors and their norms, the whole model's trim sweeps, the
    election with the trim fused in, the output and its statistics): at lambda 1 the official code's
    bits; at 0.8 and 2.5 within a float32 rounding (clpeft scales each task vector by lambda before
    the disjoint mean, the official code the merged vector after it)."""
    if not fused_cpu.available():
        pytest.skip("no C compiler: the compiled loops are not built")
    base = {k: v.float() for k, v in state_dicts[0].items()}
    finetuned = [{k: v.float() for k, v in m.items()} for m in state_dicts[1]]
    calls = []
    for name in ("ties_elect", "finish", "count_difference_digits"):
        kernel = getattr(fused_cpu, name)
        monkeypatch.setattr(fused_cpu, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    with _ties_reference(load_reference, stub_module) as ref:
        flat_ptm, task_vectors = _flat(ref, base, finetuned)
        assert all(row.abs().unique().numel() == row.numel() for row in task_vectors), "magnitude ties"
        merged_tv = _official_ties(ref, task_vectors)
        expected = {lam: dict(ref.vector_to_state_dict(flat_ptm + lam * merged_tv, base)) for lam in (0.8, 1.0, 2.5)}
    density = _one_more(0.2, task_vectors.shape[1])
    for lam, state in expected.items():
        calls.clear()
        ours = merge(base, finetuned, "ties", density=density, scale=lam)
        assert sorted(set(calls)) == ["count_difference_digits", "finish", "ties_elect"] and calls.count("finish") == len(base)
        if lam == 1.0:
            assert all(torch.equal(ours[name].view(torch.int32), state[name].view(torch.int32)) for name in state)
        else:
            _assert_state_close(ours, state, atol=4e-7)


def test_ties_keeps_floor_k_n_entries_the_reference_one_more(load_reference, stub_module, state_dicts):
    """Deliberate difference: ``topk_values_mask`` cuts at the ``(N - floor(kN))``-th smallest magnitude,
    so it keeps ``floor(kN) + 1`` entries; clpeft (and peft) keep ``floor(kN)``. At the same density
    the merges differ only at each task's ``floor(kN) + 1``-th largest entry."""
    base, finetuned = state_dicts
    with _ties_reference(load_reference, stub_module) as ref:
        flat_ptm, task_vectors = _flat(ref, base, finetuned)
        _, _, mask = ref.topk_values_mask(task_vectors.clone(), K=0.2, return_mask=True)
        merged_tv = _official_ties(ref, task_vectors)
    n = task_vectors.shape[1]
    assert mask.sum(dim=1).tolist() == [int(0.2 * n) + 1] * TASKS
    statistic = KthLargestMagnitude(int(0.2 * n), ModelShape(n, TASKS, torch.float64, torch.device("cpu")))
    while statistic.wants_sweep():
        statistic.observe(task_vectors.clone())
        statistic.end_sweep()
    kept = task_vectors.abs() >= statistic.result()[:, None]
    assert kept.sum(dim=1).tolist() == [int(0.2 * n)] * TASKS
    ours = merge(base, finetuned, "ties", density=0.2)
    with _ties_reference(load_reference, stub_module) as ref:
        differing = ref.state_dict_to_vector(ours) != flat_ptm + merged_tv
    assert 0 < int(differing.sum()) <= TASKS
    assert differing.logical_and((mask & ~kept).any(dim=0).logical_not()).sum() == 0  # only where a (k+1)-th entry sits


def test_ties_per_tensor_is_not_the_official_trim(load_reference, stub_module, state_dicts):
    """peft's per-tensor trim (``trim_scope: tensor``) gives another model than the official code."""
    base, finetuned = state_dicts
    with _ties_reference(load_reference, stub_module) as ref:
        flat_ptm, task_vectors = _flat(ref, base, finetuned)
        merged_tv = _official_ties(ref, task_vectors)
        expected = dict(ref.vector_to_state_dict(flat_ptm + merged_tv, base))
    per_tensor = merge(base, finetuned, "ties", density=_one_more(0.2, task_vectors.shape[1]), trim_scope="tensor")
    assert max(float((per_tensor[k] - expected[k]).abs().max()) for k in base) > 1e-3


def test_zero_mass_elects_plus_where_the_reference_elects_the_majority_sign(load_reference, stub_module):
    """Deliberate difference (peft's convention; the reference's needs one more pass over the model):
    entry 0 holds +2 and -2, a zero mass. The reference elects the sign most entries of the model
    elected (here -), keeping -2; clpeft elects +, keeping +2. Every other entry agrees."""
    task_vectors = torch.tensor(
        [[2.0, -1.0, -3.0, 0.5, -2.0], [-2.0, -2.0, 1.0, -1.0, -1.0], [0.0, 0.5, -1.0, -2.0, 1.0]], dtype=torch.float64
    )
    with _ties_reference(load_reference, stub_module) as ref:
        signs = ref.resolve_sign(task_vectors.clone(), "mass")
        expected = ref.disjoint_merge(task_vectors.clone(), "dis-mean", signs)
    ours = combine(task_vectors.clone(), torch.ones(3, dtype=torch.float64), "ties")
    assert expected[0].item() == -2.0 and ours[0].item() == 2.0
    assert torch.equal(ours[1:], expected[1:])


def test_adamerging_ties_baseline_is_disjoint_sum_at_lambda_0_3(load_reference, stub_module, state_dicts):
    """AdaMerging's TIES row: ``ties_merging(K=20, merge_func="dis-sum")`` and ``scaling_coef_ = 0.3``
    (read from ``main_ties_merging.py``) equal ``ties`` with ``disjoint: sum, scale: 0.3``."""
    base, finetuned = state_dicts
    with _adamerging_reference(load_reference, stub_module, "ties_merging_utils") as ref:
        trees = _script_tree(ref)
        k, merge_func, lam = (_constant(trees["main_ties_merging"], n) for n in ("K", "merge_func", "scaling_coef_"))
        flat_ptm, task_vectors = _flat(ref, base, finetuned)
        merged_tv = ref.ties_merging(task_vectors, reset_thresh=k, merge_func=merge_func)
        expected = dict(ref.vector_to_state_dict(flat_ptm + lam * merged_tv, base))
    assert (k, merge_func, lam) == (20, "dis-sum", 0.3)
    assert get_method("ties").validate({})["density"] == k / 100  # the default density is the official topk20
    ours = merge(base, finetuned, "ties", density=_one_more(k / 100, task_vectors.shape[1]), scale=lam, disjoint="sum")
    _assert_state_close(ours, expected)


# -------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_equals_both_references_and_defaults_to_their_0_3(load_reference, stub_module, state_dicts, monkeypatch):
    """``tv_merging`` (ties-merging) and ``sum(TaskVector).apply_to(scaling_coef=0.3)`` (AdaMerging's
    ``main_task_arithmetic.py``, whose constant is read from the file) equal ``task_arithmetic`` with
    its default scale."""
    base, finetuned = state_dicts
    with _ties_reference(load_reference, stub_module) as ref:
        flat_ptm, task_vectors = _flat(ref, base, finetuned)
        flat_expected = {lam: dict(ref.vector_to_state_dict(flat_ptm + lam * ref.tv_merging(task_vectors), base)) for lam in (0.3, 0.7)}
    for lam, expected in flat_expected.items():
        _assert_state_close(merge(base, finetuned, "task_arithmetic", scale=lam), expected)

    with _adamerging_reference(load_reference, stub_module, "task_vectors") as ref:
        scaling_coef = _constant(_script_tree(ref)["main_task_arithmetic"], "scaling_coef_")
        vectors = [ref.TaskVector(vector={k: m[k] - base[k] for k in base}) for m in finetuned]
        model = Tiny().double()
        model.load_state_dict(base)
        monkeypatch.setattr(torch, "load", lambda path: model)  # apply_to loads the pretrained model object
        expected = sum(vectors).apply_to("zeroshot.pt", scaling_coef=scaling_coef).state_dict()
    assert scaling_coef == 0.3 == get_method("task_arithmetic").validate({})["scale"]
    _assert_state_close(merge(base, finetuned, "task_arithmetic"), dict(expected))


# ------------------------------------------------------------------------------------------ DARE


def test_dare_keeps_survivors_rescaled_by_1_over_1_minus_p_and_drops_at_rate_p():
    """Survivors are exactly ``tau / (1 - p)``, dropped entries 0; the number dropped is within 5
    standard deviations of Binomial(N, p) (fixed seed)."""
    p, n = 0.9, 200_000
    tau = torch.randn(1, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = get_method("dare").fn(tau.clone(), drop_rate=p, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert torch.equal(out[kept], tau[0][kept] / (1 - p))
    dropped = n - int(kept.sum())
    assert abs(dropped - n * p) < 5 * (n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_preserves_the_expected_task_vector(rescale):
    """E[tau_hat] = tau (with the rescale; (1 - p) tau without): over S = 400 seeds the per-entry means
    give sum z^2 within 5 sqrt(2N) of N, z = (mean - E) / sd, sd^2 = tau^2 p (1 - p) / ((1 - p)^2 S)
    (with the rescale; tau^2 p (1 - p) / S without). Fixed seeds."""
    p, n, draws = 0.7, 500, 400
    tau = torch.randn(1, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for seed in range(draws):
        total += get_method("dare").fn(tau.clone(), drop_rate=p, rescale=rescale, generator=torch.Generator().manual_seed(seed))
    factor = 1 / (1 - p) if rescale else 1.0
    expected = tau[0] * factor * (1 - p)
    sd = tau[0].abs() * factor * (p * (1 - p) / draws) ** 0.5
    chi2 = float((((total / draws) - expected) / sd).square().sum())
    assert abs(chi2 - n) < 5 * (2 * n) ** 0.5


# ------------------------------------------------------------------------------------ AdaMerging


class ShuffledBatches:
    """A shuffling loader of ``(inputs, labels)`` batches: each pass draws a new permutation from
    its own generator, so two copies with one seed give both sides the same batches."""

    def __init__(self, inputs: torch.Tensor, batch_size: int, seed: int):
        self.inputs, self.batch_size = inputs, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.inputs), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.inputs[index], torch.zeros(len(index), dtype=torch.long)


def _torch_with_adam_lr(lr: float | None) -> types.ModuleType:
    """``torch`` for the reference's namespace; with ``lr``, its ``torch.optim.Adam`` uses that rate."""
    if lr is None:
        return torch
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.optim = types.SimpleNamespace(Adam=lambda params, **kw: torch.optim.Adam(params, **{**kw, "lr": lr}))
    return proxy


def _run_reference_loop(tree: ast.Module, namespace: dict, steps: int) -> None:
    """Execute the script's functions and classes, then its statements from the model set-up to the
    training loop (imports, evaluation loops and the checkpoint load left out), with ``epochs = steps``."""
    body = tree.body
    start = next(
        i
        for i, node in enumerate(body)
        if isinstance(node, ast.Assign) and ast.unparse(node) == "pretrained_model = torch.load(pretrained_checkpoint)"
    )
    definitions = [n for n in body[:start] if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name != "create_log_dir"]
    exec(compile(ast.Module(definitions, []), "<reference definitions>", "exec"), namespace)
    for node in body[start + 1 :]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.For) and ast.unparse(node.target) == "dataset_name":  # the initial evaluation
            continue
        exec(compile(ast.Module([node], []), "<reference statement>", "exec"), namespace)
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "epochs":
            namespace["epochs"] = steps


def _adamerging_problem():
    """A tiny MLP encoder, three fine-tunes, one head per task, 40 unlabeled inputs per task."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    finetuned = [{k: v + 0.3 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in base.items()} for _ in range(3)]
    heads = {name: nn.Linear(8, classes).double() for name, classes in zip("ABC", (3, 4, 5))}
    inputs = {name: torch.randn(40, 6, generator=generator, dtype=torch.float64) for name in heads}
    return model, base, finetuned, heads, inputs


@pytest.mark.parametrize("lr", [None, 0.1], ids=["official-lr", "lr-0.1-reaches-the-clamp"])
@pytest.mark.parametrize(("script", "granularity"), [("main_task_wise_adamerging", "task"), ("main_layer_wise_adamerging", "layer")])
def test_adamerging_coefficients_equal_the_reference_training_loop(load_reference, stub_module, monkeypatch, script, granularity, lr):
    """The reference's own classes and loop, 6 steps (10 at lr 0.1): same initial coefficients (its prior 0.3),
    same batches (two per task and step from a fresh shuffled pass), same loss (summed mean
    entropies), Adam; the learned coefficients and merged weights equal clpeft's (float64, 1e-12;
    they agree to 1e-14, the two sides summing the merged weights in another order).
    With lr 0.1 some coefficients leave [0, 1], so the clamp's gradient is compared too."""
    steps = 6 if lr is None else 10
    model, base, finetuned, heads, inputs = _adamerging_problem()
    with _adamerging_reference(load_reference, stub_module, "task_vectors") as ref:
        tree = _script_tree(ref)[script]
        vectors = [ref.TaskVector(vector={k: m[k] - base[k] for k in base}) for m in finetuned]
    reference_model = copy.deepcopy(model)
    reference_model.val_preprocess = None
    loaders = {name: ShuffledBatches(x, 16, seed) for seed, (name, x) in enumerate(inputs.items())}
    namespace = {
        "torch": _torch_with_adam_lr(lr),
        "tqdm": types.SimpleNamespace(tqdm=lambda iterable: iterable),
        "args": types.SimpleNamespace(device="cpu", data_location=None),
        "log": types.SimpleNamespace(info=lambda message: None),
        "exam_datasets": list(heads),
        "task_vectors": vectors,
        "pretrained_model": reference_model,
        "get_classification_head": lambda args, name: heads[name],
        "get_dataset": lambda name, preprocess, location, batch_size: name,  # batch_size 16: the loaders'
        "get_dataloader_shuffle": lambda name: loaders[name],
        "maybe_dictionarize": lambda batch: {"images": batch[0], "labels": batch[1]},
    }
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # the reference moves to GPU 0
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference's coefficient tensors are created with the default dtype
    try:
        _run_reference_loop(tree, namespace, steps)
        reference = namespace["adamerging_mtl_model"].lambdas().detach()[:, 1:]
        raw = namespace["adamerging_mtl_model"].lambdas_raw.detach()
        ours = adamerging(
            base,
            finetuned,
            forward=functional_forward(model, list(heads.values())),
            loaders=[ShuffledBatches(x, 16, seed) for seed, x in enumerate(inputs.values())],
            granularity=granularity,
            steps=steps,
            **({} if lr is None else {"lr": lr}),
        )
    finally:
        torch.set_default_dtype(previous)
    assert namespace["epochs"] == steps and raw.shape == reference.shape
    if lr is not None:
        assert ((raw < 0) | (raw > 1)).any(), raw  # the clamp was active
    rows = [ours.coefficients[name] for name in base] if granularity == "layer" else [ours.coefficients["0.weight"]]
    torch.testing.assert_close(torch.tensor(rows, dtype=torch.float64), reference, rtol=0, atol=ATOL)
    assert (reference - 0.3).abs().max() > 1e-3  # the coefficients moved
    for i, name in enumerate(base):
        row = reference[i if granularity == "layer" else 0]
        expected = base[name] + sum(c * (m[name] - base[name]) for c, m in zip(row, finetuned))
        torch.testing.assert_close(ours.state_dict[name], expected, rtol=0, atol=ATOL)


def test_adamerging_defaults_are_the_scripts_constants(load_reference, stub_module):
    """prior 0.3, 500 epochs (steps), Adam(lr=1e-3, betas=(0.9, 0.999), weight_decay=0), batches of 16
    and two per task and step (``if i > 0: break``), in both scripts, are clpeft's defaults (the
    batch size is the loader's: documented)."""
    with _adamerging_reference(load_reference, stub_module, "task_vectors") as ref:
        trees = _script_tree(ref)
    defaults = {name: p.default for name, p in inspect.signature(adamerging).parameters.items()}
    for script in ("main_task_wise_adamerging", "main_layer_wise_adamerging"):
        tree = trees[script]
        assert _constant(tree, "prior") == defaults["init"] == 0.3
        assert _constant(tree, "epochs") == defaults["steps"] == 500
        adam = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.optim.Adam")
        keywords = {k.arg: ast.literal_eval(k.value) for k in adam.keywords}
        assert keywords == {"lr": defaults["lr"], "betas": (0.9, 0.999), "weight_decay": 0.0}
        dataset = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "get_dataset")
        assert [ast.literal_eval(k.value) for k in dataset.keywords if k.arg == "batch_size"] == [16]
        stop = next(n for n in ast.walk(tree) if isinstance(n, ast.If) and isinstance(n.body[0], ast.Break))
        assert ast.unparse(stop.test) == "i > 0" and defaults["batches"] == 2  # batches i = 0 and 1
        assert "softmax_entropy(outputs).mean(0)" in ast.unparse(tree) and defaults["fresh_pass"] is True
