"""Half-precision inputs (bf16, fp16): float32 arithmetic, one conversion per block, results
within the output's rounding of a float64 merge; float32 inputs: the same bits as before."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import finetune, tiny_vit
from torch.utils._python_dispatch import TorchDispatchMode

from clpeft.merging import get_method, merge
from clpeft.merging.blocks import BLOCK_COLUMNS
from clpeft.merging.methods import sparsify
from clpeft.merging.report import sample_entries

K = 3
CASES = [
    ("task_arithmetic", {"scale": 0.3, "weights": [1.0, -0.5, 2.0]}),
    ("mean", {}),
    ("ties", {"density": 0.2}),  # trim over the whole model (two radix sweeps first)
    ("ties", {"density": 0.3, "trim_scope": "tensor", "disjoint": "sum"}),
    ("dare", {"drop_rate": 0.5, "consensus": "ties"}),
]
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def checkpoints(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The tiny ViT plus one tensor of two blocks and a partial one, K fine-tunes, in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    base = tiny_vit(generator) | {"big.weight": torch.randn(2 * BLOCK_COLUMNS + 1234, generator=generator)}
    models = [finetune(base, generator) for _ in range(K)]
    cast = lambda state: {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}  # noqa: E731
    return cast(base), [cast(m) for m in models]


def reference_merge(
    method: str, params: dict, base: dict, models: list[dict], masks: list[torch.Tensor], work: torch.dtype = torch.float64
) -> dict:
    """The merge computed op by op in ``work`` from the same inputs, with the masks DARE drew:
    whole task vectors, the registered function, ``theta_0 + tau_m`` (in ``work``)."""
    spec = get_method(method)
    params = spec.validate(params)
    names = [n for n, t in base.items() if t.is_floating_point()]
    task_vectors = {n: torch.stack([m[n].to(work).reshape(-1) - base[n].to(work).reshape(-1) for m in models]) for n in names}
    extra = {}
    if params.get("trim_scope") == "model":  # one cut-off per task over the flattened model
        flat = torch.cat([task_vectors[n] for n in names], dim=1).abs()
        extra["model_statistic"] = flat.topk(int(params["density"] * flat.shape[1]), dim=1).values[:, -1]
    replay = iter(masks)
    merged = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparsify, "random_keep_mask", lambda tv, p, g: next(replay).to(tv.dtype))
        for n in names:
            delta = spec.fn(task_vectors[n].clone(), **params, **extra)
            merged[n] = (base[n].to(work).reshape(-1) + delta).reshape(base[n].shape)
    return merged


def recorded_masks(monkeypatch) -> list[torch.Tensor]:
    """DARE's drop masks, recorded as the merge draws them."""
    masks = []
    original = sparsify.random_keep_mask

    def record(task_vectors, keep_probability, generator):
        masks.append(original(task_vectors, keep_probability, generator))
        return masks[-1]

    monkeypatch.setattr(sparsify, "random_keep_mask", record)
    return masks


def error_bound(
    method: str, params: dict, base: torch.Tensor, models: list[torch.Tensor], reference: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Half an ulp of ``dtype`` at the float64 result (the output's one rounding), plus the
    float32 work's error: a few float32 epsilons of ``|theta_0| + sum_k |c_k tau_k|``."""
    exponent = torch.frexp(reference).exponent.clamp(min=math.frexp(torch.finfo(dtype).tiny)[1])  # subnormals
    half_ulp = torch.ldexp(torch.ones_like(reference), exponent - 2 - MANTISSA_BITS[dtype])
    weights = torch.tensor(params.get("weights", [1.0] * K), dtype=torch.float64).abs()
    scale = abs(params.get("scale", 1.0)) * (2.0 if method == "dare" else 1.0)  # DARE rescales by 1 / (1 - p)
    mass = sum(w * (m.double() - base.double()).abs() for w, m in zip(weights, models)) * scale
    return half_ulp + 8 * torch.finfo(torch.float32).eps * (base.double().abs() + mass)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_every_method_is_within_output_rounding_of_float64(monkeypatch, dtype, method, params):
    """Every tensor method on bf16, fp16 and fp32 checkpoints gives the float64 merge of the same
    inputs to within the output dtype's rounding (half an ulp) plus float32's working error."""
    base, models = checkpoints(dtype)
    masks = recorded_masks(monkeypatch)
    merged = merge(base, models, method, **params)
    monkeypatch.undo()
    reference = reference_merge(method, params, base, models, masks)
    for name, expected in reference.items():
        assert merged[name].dtype == dtype
        error = (merged[name].double() - expected).abs()
        bound = error_bound(method, params, base[name], [m[name] for m in models], expected, dtype)
        assert bool((error <= bound).all()), f"{name}: {int((error > bound).sum())} entries beyond rounding"
    assert torch.equal(merged["bn.num_batches_tracked"], base["bn.num_batches_tracked"])


@pytest.mark.parametrize(("method", "params"), CASES)
def test_float32_results_equal_the_op_by_op_path_bit_for_bit(monkeypatch, method, params):
    """float32 inputs go through exactly the float32 ops they went through before half-precision
    inputs were converted per block (that path, rebuilt here op by op): linear methods block by
    block with the weighted sum as ``mv``, the others on whole task vectors, then ``theta_0 + tau_m``."""
    base, models = checkpoints(torch.float32)
    spec = get_method(method)
    masks = recorded_masks(monkeypatch)
    merged = merge(base, models, method, **params)
    monkeypatch.undo()
    if not spec.linear:
        expected = reference_merge(method, params, base, models, masks, work=torch.float32)
    else:
        coefficients = torch.tensor(spec.coefficients(K, spec.validate(params)), dtype=torch.float32)
        expected = {}
        for name, b in base.items():
            flat, delta = b.reshape(-1), torch.empty(b.numel())
            for start in range(0, b.numel() if b.is_floating_point() else 0, BLOCK_COLUMNS):
                stop = min(b.numel(), start + BLOCK_COLUMNS)
                task_vectors = torch.empty(K, stop - start)
                for row, m in zip(task_vectors, models):
                    torch.sub(m[name].reshape(-1)[start:stop], flat[start:stop], out=row)
                torch.mv(task_vectors.T, coefficients, out=delta[start:stop])
                expected[name] = (flat + delta).view(b.shape)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name


class ConversionSpy(TorchDispatchMode):
    """Counts entries converted out of half precision, and half-precision tensors that reach
    anything but a copy, a conversion or a view (arithmetic on them would run in bf16)."""

    MOVES = {
        "copy_",
        "_to_copy",
        "clone",
        "view",
        "slice",
        "select",
        "as_strided",
        "alias",
        "detach",
        "_unsafe_view",
        "unsqueeze",
        "reshape",
        "unfold",
        "t",
        "expand",
        "lift_fresh",
        "empty_like",
        "unbind",
        "split",
    }

    def __init__(self):
        super().__init__()
        self.converted = 0
        self.arithmetic: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        halves = [a for a in args if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16)]
        if halves and name not in self.MOVES:
            self.arithmetic.add(name)
        result = func(*args, **kwargs)
        if name in ("copy_", "_to_copy") and isinstance(result, torch.Tensor) and result.dtype == torch.float32:
            source = args[1] if name == "copy_" else args[0]
            if source.dtype in (torch.bfloat16, torch.float16):
                self.converted += source.numel()
        return result


def sampled(base: dict[str, torch.Tensor]) -> int:
    """Entries a linear method's sign-conflict sample converts: K + 1 samples per merged tensor."""
    return sum((K + 1) * sample_entries(t.reshape(-1), K).numel() for t in base.values() if t.is_floating_point())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("method", "params", "sweeps"),
    [
        ("task_arithmetic", {}, 1),
        ("ties", {"trim_scope": "tensor"}, 1),
        ("ties", {"trim_scope": "model"}, 3),
    ],
)
def test_half_precision_is_converted_once_per_block_and_never_computed_on(monkeypatch, dtype, method, params, sweeps):
    """Each input entry is converted to float32 exactly once per sweep over the model (the merge,
    plus TIES' two threshold sweeps), besides the samples of linear methods' sign-conflict
    statistic, and no arithmetic op ever receives a bf16 or fp16 tensor. On the ATen path
    (``CLPEFT_CPU_KERNEL=0``); the compiled CPU kernel converts in registers
    (tests/merging/test_merge_fused_cpu.py)."""
    monkeypatch.setenv("CLPEFT_CPU_KERNEL", "0")
    base, models = checkpoints(dtype)
    numel = sum(t.numel() for t in base.values() if t.is_floating_point())
    spy = ConversionSpy()
    with spy:
        merge(base, models, method, fused=False, **params)
    assert spy.arithmetic == set()
    samples = sampled(base) if get_method(method).linear else 0  # the others measure their whole task vectors
    assert spy.converted == sweeps * (K + 1) * numel + samples
