"""The one-pass GPU kernel for linear merges, run on the CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` has to be set before the kernel is defined, so each check runs in a
fresh interpreter. On a GPU machine ``tests/merging/test_merge_devices.py`` runs the kernel
natively through the engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _run_interpreted(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_kernel_equals_a_float64_computation_over_several_blocks_and_dtypes():
    _run_interpreted(
        """
        import torch
        from clpeft.merging import fused

        generator = torch.Generator().manual_seed(0)
        n = 2 * fused._BLOCK + 77  # two full blocks and a partial one
        coefficients = torch.tensor([0.3, -0.5, 1.0])
        for base_dtype, source_dtype, out_dtype in [
            (torch.float32, torch.float32, torch.float32),
            (torch.float32, torch.bfloat16, torch.float32),
            (torch.bfloat16, torch.bfloat16, torch.bfloat16),
            (torch.float16, torch.float16, torch.float32),
        ]:
            base = torch.randn(n, generator=generator).to(base_dtype)
            sources = [(base.float() + 0.1 * torch.randn(n, generator=generator)).to(source_dtype) for _ in range(3)]
            sources[1][5:9] = base[5:9].to(source_dtype)  # equal entries: zero task-vector entries
            out = torch.empty(n, dtype=out_dtype)
            sums = fused.linear_merge(base, sources, coefficients, out)
            task_vectors = torch.stack([s.double() - base.double() for s in sources])
            delta = coefficients.double() @ task_vectors
            expected = (base.double() + delta).to(out_dtype)
            ulp = torch.finfo(out_dtype).eps * expected.double().abs().clamp(min=1)
            assert ((out.double() - expected.double()).abs() <= ulp).all(), (base_dtype, source_dtype, out_dtype)
            reference = torch.stack([base.double().square().sum(), delta.square().sum(), *task_vectors.square().sum(dim=1)])
            torch.testing.assert_close(sums[[0, 1, *range(3, 6)]], reference, rtol=1e-5, atol=0)
            # float32 sums cancel to exactly 0 at a few entries where float64 leaves ~1e-9
            assert abs(sums[2].item() - (delta != 0).sum().item()) <= 1e-3 * n, (sums[2], (delta != 0).sum())
        print("ok")
        """
    )


def test_engine_uses_the_kernel_for_linear_methods_with_the_op_by_op_results():
    """The engine's device path with the kernel (forced on for the CPU; bf16 fine-tunes of an fp32
    base) gives the op-by-op path's merged tensors (to float rounding) and report, and still
    names a non-finite input."""
    _run_interpreted(
        """
        import sys
        import torch
        sys.path.insert(0, "tests/merging")
        from conftest import finetune, tiny_vit
        from clpeft.errors import UserError
        from clpeft.merging import fused
        from clpeft.merging.engine import MergeEngine
        from clpeft.merging.io import StateDictSource
        from clpeft.merging.registry import get_method
        from clpeft.merging.rules import MergeRules, plan

        supports = fused.supports
        generator = torch.Generator().manual_seed(0)
        base = tiny_vit(generator)
        finetuned = [finetune(base, generator) for _ in range(3)]
        finetuned = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in m.items()} for m in finetuned]
        calls = []
        linear_merge = fused.linear_merge
        fused.linear_merge = lambda *args: calls.append(1) or linear_merge(*args)

        def run(method, params, use_kernel, models=finetuned):
            # the kernel's own conditions, with the CPU standing in for CUDA
            fused.supports = (lambda device, b, s: supports(torch.device("cuda"), b, s)) if use_kernel else (lambda *_: False)
            spec = get_method(method)
            sources = [StateDictSource(m, f"model {i}") for i, m in enumerate(models)]
            base_source = StateDictSource(base, "base")
            engine = MergeEngine(spec, spec.validate(params), base_source, sources)
            engine._transfer = True  # the device path, on the CPU
            out = {}
            reports = engine.run(plan(base_source, sources, MergeRules()), lambda job, t: out.__setitem__(job.name, t.clone()))
            return out, {r.name: r for r in reports}

        for method, params in [("task_arithmetic", {"scale": 0.4, "weights": [1.0, 0.5, 2.0]}), ("mean", {})]:
            calls.clear()
            (kernel, kernel_reports), (ops, ops_reports) = run(method, params, True), run(method, params, False)
            assert len(calls) == sum(r.merged for r in ops_reports.values()) > 10, len(calls)  # every merged tensor
            for name, tensor in ops.items():
                torch.testing.assert_close(kernel[name], tensor, rtol=0, atol=1e-6)
                a, b = kernel_reports[name], ops_reports[name]
                if b.merged:
                    torch.testing.assert_close(a.task_vector_norms, b.task_vector_norms, rtol=1e-5, atol=0)
                    assert a.sign_conflict == b.sign_conflict and a.density == b.density
                    assert abs(a.merged_norm - b.merged_norm) <= 1e-5 * b.merged_norm
        finetuned[1]["blocks.1.attn.proj.weight"][3, 4] = float("nan")
        try:
            run("task_arithmetic", {}, True)
        except UserError as error:
            assert "'blocks.1.attn.proj.weight' of model 1 holds NaN" in str(error), error
        else:
            raise AssertionError("NaN input not reported")
        print("ok")
        """
    )
