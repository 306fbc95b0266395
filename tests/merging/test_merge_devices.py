"""Merging on every device this machine has: the CPU always, CUDA where present.

On a lent GPU machine ``benchmarks/device_checks.sh`` runs this file; elsewhere the CUDA cases
are skipped. Every case checks against a reference computed independently on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from clpeft.merging import merge, merge_files

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))
DEVICES = ["cpu", CUDA]


def _floating(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if t.is_floating_point()}


@pytest.mark.parametrize("device", DEVICES)
def test_task_arithmetic_on_the_device_equals_a_float64_computation(device, models):
    base, finetuned = models
    weights = [1.0, 0.5, 2.0]
    merged = merge(base, finetuned, "task_arithmetic", device=device, scale=0.4, weights=weights)
    for name, b in _floating(base).items():
        expected = b.double() + 0.4 * sum(w * (m[name].double() - b.double()) for w, m in zip(weights, finetuned))
        assert merged[name].device.type == "cpu" and merged[name].dtype == b.dtype
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trim", ["threshold", "topk"])
def test_ties_on_the_device_equals_peft_on_the_cpu(device, trim, models):
    base, finetuned = models
    weights = torch.tensor([0.5, 1.0, 1.5])
    merged = merge(
        base, finetuned, "ties", device=device, density=0.3, weights=weights.tolist(), trim=trim, trim_scope="tensor"
    )  # peft trims each tensor apart
    for name, b in _floating(base).items():
        expected = b + merge_utils.ties([m[name] - b for m in finetuned], weights, density=0.3)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_over_the_whole_model_on_the_device_equals_a_float64_computation(device, models):
    """``trim_scope: model``: pass 1's radix selection runs where the merge does (bincount on the GPU);
    the cut-off is each task's k-th largest magnitude over every merged tensor."""
    base, finetuned = models
    merged = merge(base, finetuned, "ties", device=device, density=0.2, scale=0.5)
    names = [n for n, t in base.items() if t.is_floating_point()]
    flat = torch.stack([torch.cat([(m[n] - base[n]).reshape(-1) for n in names]) for m in finetuned]).double()
    k = int(0.2 * flat.shape[1])
    trimmed = flat * (flat.abs() >= flat.abs().sort(dim=1, descending=True).values[:, k - 1 : k])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed * (torch.sign(trimmed) == sign)
    delta = (0.5 * agree.sum(0) / (agree != 0).sum(0).clamp(min=1)).split([base[n].numel() for n in names])
    for name, d in zip(names, delta):
        torch.testing.assert_close(merged[name].double(), base[name].double() + d.view(base[name].shape), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", [CUDA])  # the CPU's: test_merge_api.py, streaming equals in-memory
@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.2}), ("dare", {"drop_rate": 0.5})])
def test_streaming_on_the_device_equals_in_memory_on_the_device_bitwise(device, method, params, models, model_files, tmp_path):
    """The packed, look-ahead transfer path (files) and the in-memory path agree bit for bit,
    DARE's per-tensor drop masks included (drawn on the device from the same seeds)."""
    base, finetuned = models
    expected = merge(base, finetuned, method, device=device, seed=3, **params)
    base_path, paths = model_files
    merge_files(base_path, paths, tmp_path / "merged.safetensors", method, device=device, seed=3, **params)
    from safetensors.torch import load_file

    streamed = load_file(tmp_path / "merged.safetensors")
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name


@pytest.mark.parametrize("device", [CUDA])  # the CPU's: test_merge_methods.py, DARE keeps the expected task vector
def test_dare_keeps_the_expected_delta_on_the_device(device):
    """E[DARE(tau)] = tau (Yu et al. 2024, eq. 2): the mean over 200 seeds of one entry's merge
    is within 4 standard errors of the undropped task vector."""
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(2000)}
    finetuned = [{"w": torch.randn(2000, generator=generator)}]
    drop = 0.7
    runs = torch.stack([merge(base, finetuned, "dare", device=device, seed=s, drop_rate=drop)["w"] for s in range(200)])
    tau = finetuned[0]["w"]
    standard_error = tau.abs() * (drop / (1 - drop)) ** 0.5 / 200**0.5
    assert ((runs.mean(0) - tau).abs() <= 4 * standard_error + 1e-6).float().mean() > 0.999
    assert ((runs == 0).float().mean() - drop).abs() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_dicts_on_the_gpu_merge_there_and_stay_unchanged(models):
    """GPU-resident inputs skip the host (no packing, no copies) and give the packed path's
    result bit for bit, on the GPU; a CPU merge of them gives the CPU's result on the CPU."""
    base, finetuned = models

    def on_gpu(state):
        return {name: t.cuda() for name, t in state.items()}

    gpu_base, gpu_finetuned = on_gpu(base), [on_gpu(m) for m in finetuned]
    for device, reference in [
        ("cuda", merge(base, finetuned, "ties", device="cuda", density=0.3)),
        ("cpu", merge(base, finetuned, "ties", density=0.3)),
    ]:
        merged = merge(gpu_base, gpu_finetuned, "ties", device=device, density=0.3)
        for name, expected in reference.items():
            assert merged[name].device.type == device, name
            assert torch.equal(merged[name].cpu(), expected), name
    for original, resident in zip([base, *finetuned], [gpu_base, *gpu_finetuned]):
        assert all(torch.equal(resident[name].cpu(), t) for name, t in original.items())
