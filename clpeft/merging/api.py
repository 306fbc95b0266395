"""The two entry points: merge state dicts in memory, or stream checkpoints from disk to disk."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from clpeft.errors import UserError
from clpeft.merging.engine import MergeEngine
from clpeft.merging.io import SafetensorsWriter, StateDictSource, open_checkpoint
from clpeft.merging.lora import LoraAdapter, open_model
from clpeft.merging.output import atomic_output, check_outputs
from clpeft.merging.registry import get_method
from clpeft.merging.report import MergeReport
from clpeft.merging.rules import MergeRules, TensorJob, plan
from clpeft.merging.sharded import INDEX_NAME, PROGRESS_NAME, ShardRecord, fingerprint, parse_size, progress_bar, write_sharded_report

__all__ = ["merge", "merge_files"]

# An in-memory merge on the CPU copies nothing into batches (CPU tensors): a batch is only the group
# of tensors the torch threads share (fused_cpu.linear_merges: one even span each), and larger groups
# wait for the threads less often (benchmarks/RESULTS.md: task arithmetic of a 134M Llama at two
# threads, 1.2-1.4x faster than with the 8 MiB read batches, and 3-5% faster again than with 64 MiB).
_HOST_BATCH_BYTES = 256 << 20

StateDict = Mapping[str, torch.Tensor]


def merge(
    base: StateDict,
    finetuned: Sequence[StateDict | LoraAdapter],
    method: str,
    *,
    rules: MergeRules | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    fused: bool = True,
    out: Mapping[str, torch.Tensor] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge fine-tuned state dicts (or LoRA adapters) into their base, in memory.

    Task vectors are ``finetuned[k] - base``; the method combines them tensor by tensor and
    the result is ``base + merged task vector``, in the base's dtypes. It lives on ``device``
    when every tensor of ``base`` is already there (state dicts on the GPU merge without
    crossing to the host), else on the CPU.

    Args:
        base: the pretrained state dict ``theta_0``.
        finetuned: fine-tuned state dicts ``theta_k`` of the same architecture, or
            :class:`~clpeft.merging.lora.LoraAdapter` objects (not mixed).
        method: a registered merge method: ``task_arithmetic``, ``ties``, ``dare``, ``mean``,
            ``adamerging`` (see :func:`~clpeft.merging.registry.list_methods`).
        rules: which tensors to skip or copy from the base (:class:`MergeRules` or a dict).
        device: where the arithmetic of tensor methods runs (``"cuda"`` keeps it on the GPU);
            AdaMerging runs where the tensors and the forward function are.
        seed: seed of random methods (DARE's drop masks).
        fused: merge linear methods with the one-pass kernels: Triton on CUDA, a compiled C loop
            on the CPU (``False``: op by op, for side-by-side timings; the bits are the same on the CPU).
        out: CPU tensors to write the result into, by name (e.g. an earlier merge's result, to
            search a coefficient): each of the output's shape and dtype, contiguous, sharing no
            memory with the inputs. New tensors cost the kernel's zeroing of their pages on
            first write, often more than the merge itself; with ``out`` a linear merge runs at
            the machine's copy bandwidth (benchmarks/RESULTS.md).
        **params: the method's parameters, e.g. ``scale=0.3`` or ``density=0.2``.

    Returns:
        The merged state dict (``out``'s tensors when given). Tensors matched by ``rules.skip``
        are left out.

    Raises:
        UserError: for an unknown method or parameter, mismatched or missing tensors,
            or non-finite values; the message names the tensor and the model.

    Example:
        >>> merged = merge(base, [ft_a, ft_b], "ties", density=0.2, scale=1.0)
    """
    spec = get_method(method)
    params = spec.validate(params)
    rules = _rules(rules)
    if spec.scope == "model":
        if out is not None:
            raise UserError(f"{method} merges the whole model and returns new tensors: leave out= unset", key="out")
        return spec.fn(base, finetuned, rules=rules, **params).state_dict
    device = _device(device)
    base_source = StateDictSource(base, "the base state dict")
    models = [m if isinstance(m, LoraAdapter) else StateDictSource(m, f"model {i}") for i, m in enumerate(finetuned)]
    merged: dict[str, torch.Tensor] = {}
    resident = device.type != "cpu" and all(t.device == device for t in base.values())
    jobs = plan(base_source, models, rules)
    if out is not None:
        _check_destinations(out, jobs, device, [base, *[m for m in finetuned if not isinstance(m, LoraAdapter)]])
    engine = MergeEngine(
        spec,
        params,
        base_source,
        models,
        device=device,
        seed=seed,
        keep_on_device=resident,
        keep_outputs=True,
        fused=fused,
        outputs=out,
        **({"batch_bytes": _HOST_BATCH_BYTES} if device.type == "cpu" else {}),
    )

    def keep(job: TensorJob, tensor: torch.Tensor) -> None:
        """Merged tensors are the engine's outputs (``out``'s own); copied ones view the caller's base."""
        if job.merge:
            merged[job.name] = tensor
        else:
            merged[job.name] = tensor.clone() if out is None else out[job.name].copy_(tensor)

    engine.run(jobs, keep)
    return merged


def _check_destinations(
    out: Mapping[str, torch.Tensor], jobs: Sequence[TensorJob], device: torch.device, inputs: Sequence[Mapping]
) -> None:
    """``merge(out=...)``: a contiguous CPU tensor of each output's shape and dtype, apart from the inputs."""
    if device.type != "cpu":
        raise UserError(f"out= takes CPU tensors and this merge runs on {device}: leave out= unset", key="out")
    taken = {t.untyped_storage().data_ptr() for state in inputs for t in state.values() if isinstance(t, torch.Tensor) and t.numel()}
    for job in jobs:
        tensor = out.get(job.name)
        expected = f"a contiguous CPU tensor of shape {tuple(job.info.shape)} and dtype {job.info.dtype}"
        if tensor is None:
            raise UserError(f"has no tensor {job.name!r}: give {expected} for every output (e.g. an earlier merge's result)", key="out")
        if (
            tuple(tensor.shape) != tuple(job.info.shape)
            or tensor.dtype != job.info.dtype
            or tensor.device.type != "cpu"
            or not tensor.is_contiguous()
        ):
            raise UserError(
                f"{job.name!r} is a {tensor.device.type} tensor of shape {tuple(tensor.shape)} and dtype {tensor.dtype}: give {expected}",
                key="out",
            )
        if tensor.numel() and tensor.untyped_storage().data_ptr() in taken:
            raise UserError(f"{job.name!r} shares memory with an input of the merge: give tensors of their own (e.g. clones)", key="out")


def merge_files(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str,
    *,
    rules: MergeRules | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    report: str | os.PathLike | None = None,
    progress: Literal["auto", "always", "never"] = "auto",
    fused: bool = True,
    shard_size: int | str = "5G",
    resume: bool = False,
    dtype: str | torch.dtype | None = None,
    tensor_parameters: Callable[[str], Mapping[str, Any]] | None = None,
    on_shard: Callable[[ShardRecord], None] | None = None,
    **params: Any,
) -> MergeReport:
    """Merge checkpoints on disk into one safetensors file or a sharded directory, streaming.

    Peak memory stays near ``K + 2`` times the largest tensor, not ``K`` models: inputs are
    read one tensor at a time with positioned reads, and the output is written as it is
    computed. The output and the JSON report appear only when the whole merge succeeded, and
    never replace an input or land inside an input directory
    (:func:`~clpeft.merging.output.check_outputs`).

    A directory ``out`` (any path not ending in ``.safetensors``) receives a transformers-style
    sharded checkpoint, written shard by shard, with its index, and can be resumed after a kill
    (:mod:`~clpeft.merging.sharded`: memory bound, progress file, what a resume checks).

    Args:
        base: the base checkpoint (file, shard index, directory or run directory).
        models: fine-tuned checkpoints or LoRA adapters (peft adapter directories, or clpeft
            adapter files); see :func:`~clpeft.merging.lora.open_model`.
        out: the merged ``.safetensors`` file, or a directory for a sharded checkpoint.
        method: a merge method with tensor scope (``adamerging`` needs the model and data;
            call :func:`clpeft.merging.adamerging` instead).
        rules, device, seed, fused, **params: as in :func:`merge`.
        report: where to write the JSON merge report (default ``<out stem>.report.json``, or
            ``clpeft_merge_report.json`` in a directory ``out``).
        progress: a progress bar in bytes written, on stderr: ``auto`` when it is a terminal.
        shard_size: (directory ``out``) the largest shard, in bytes or as ``"5G"``, ``"500MB"``.
        resume: (directory ``out``) keep the verified shards of an interrupted merge into ``out``
            and merge the rest; a changed input or setting is an error.
        dtype: (directory ``out``) cast floating outputs to this dtype (``"bfloat16"``, ...);
            default the base's. Merging computes in float32 and rounds to the base's dtype first.
        tensor_parameters: (directory ``out``) tensor name -> parameters that override
            ``params`` for that tensor (mergekit's filters and layer gradients).
        on_shard: (directory ``out``) called with each shard's record once it is in place.

    Returns:
        The :class:`MergeReport` that was written.
    """
    spec = get_method(method)
    if spec.scope != "tensor":
        raise UserError(
            f"'{method}' learns from the model's predictions, so it needs the model and data: call clpeft.merging.{method}() from Python",
            key="method",
        )
    params = spec.validate(params)
    rules = _rules(rules)
    device = _device(device)
    out = Path(out)
    sharded = out.suffix != ".safetensors"
    if not sharded and (resume or dtype is not None or tensor_parameters is not None or on_shard is not None):
        raise UserError(f"resume, dtype and per-tensor parameters need a directory as out, not the file {out}", key="out")
    default_report = out / "clpeft_merge_report.json" if sharded else out.with_name(f"{out.stem}.report.json")
    report_path = Path(report) if report is not None else default_report
    with ExitStack() as stack:
        base_source = stack.enter_context(open_checkpoint(base))
        sources = []
        for path in models:
            model = open_model(path)
            stack.callback((model.source if isinstance(model, LoraAdapter) else model).close)
            sources.append(model)
        read = [Path(base), *map(Path, models), *base_source.paths]
        read += [path for m in sources for path in (m.source if isinstance(m, LoraAdapter) else m).paths]
        if sharded:
            if out.exists() and not out.is_dir():
                kind = "a file" if out.is_file() else "not a regular file (a device, pipe or socket)"
                raise UserError(f"{out} is {kind}; give a directory for a sharded checkpoint, or a .safetensors file", key="out")
            check_outputs({"out": out / INDEX_NAME, "progress": out / PROGRESS_NAME, "report": report_path}, read)
        else:
            check_outputs({"out": out, "report": report_path}, read)
        jobs = plan(base_source, sources, rules)
        result = MergeReport(method, params, str(base), [str(m) for m in models], str(device), seed)
        metadata = {**base_source.metadata(), "clpeft_merge": json.dumps({"method": method, "parameters": params})}
        start = time.perf_counter()
        bar = progress_bar(jobs, f"{method} merge", progress)
        stack.callback(bar.close)

        def write(job: TensorJob, tensor: torch.Tensor) -> None:
            writer.write(job.name, tensor)
            bar.update(job.info.nbytes)

        if sharded:
            shard_bytes = parse_size(shard_size)
            per_tensor = _per_tensor_parameters(spec, params, tensor_parameters)
            settings = {
                "method": method,
                "parameters": params,
                "tensor_parameters": hashlib.sha256(json.dumps([per_tensor(j) for j in jobs], default=str).encode()).hexdigest(),
                "rules": rules.model_dump(),
                "seed": seed,
                "device": device.type,
                "dtype": str(_dtype(dtype)),
                "shard_size": shard_bytes,
            }
            inputs = {f"the base {base}": base_source.paths}
            for i, (path, model) in enumerate(zip(models, sources)):
                inputs[f"model {i} ({path})"] = (model.source if isinstance(model, LoraAdapter) else model).paths

            def engine_for(parameters: Mapping[str, Any]) -> MergeEngine:
                return MergeEngine(spec, parameters, base_source, sources, device=device, seed=seed, overlap_writes=True, fused=fused)

            return write_sharded_report(
                out,
                jobs,
                engine_for,
                per_tensor,
                report=result,
                report_path=report_path,
                bar=bar,
                start=start,
                dtype=_dtype(dtype),
                shard_bytes=shard_bytes,
                metadata={**metadata, "format": "pt"},
                stamp=fingerprint(inputs, settings),
                resume=resume,
                on_shard=on_shard,
                inputs=read,
            )
        with atomic_output(out) as f:
            writer = SafetensorsWriter(f, [(job.name, job.info) for job in jobs], metadata)
            engine = MergeEngine(spec, params, base_source, sources, device=device, seed=seed, overlap_writes=True, fused=fused)
            result.tensors = engine.run(jobs, write)
            writer.finish()
            result.seconds = time.perf_counter() - start
            with atomic_output(report_path) as r:
                r.write(result.to_json().encode())
    return result


def _per_tensor_parameters(spec, params: dict[str, Any], overrides: Callable[[str], Mapping[str, Any]] | None):
    """job -> the validated parameters of its tensor (``params`` updated by ``overrides``)."""
    cache: dict[str, dict[str, Any]] = {}

    def of(job: TensorJob) -> dict[str, Any]:
        extra = dict(overrides(job.name)) if overrides is not None else {}
        if not extra:
            return params
        key = json.dumps(extra, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = spec.validate({**params, **extra})
        return cache[key]

    return of


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"not a floating dtype: {dtype!r} (e.g. float32, bfloat16, float16)", key="dtype")
    return value


def _rules(rules: MergeRules | Mapping[str, Any] | None) -> MergeRules:
    if rules is None:
        return MergeRules()
    if isinstance(rules, MergeRules):
        return rules
    try:
        return MergeRules.model_validate(dict(rules))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise UserError(f"{error['msg'].lower()} (rules: {', '.join(MergeRules.model_fields)})", key=f"rules.{where}") from None


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"not a device: {device!r} ({exc})", key="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine; use device: cpu", key="device")
    if device.type == "cuda" and device.index is None:  # "cuda" means the current GPU, as tensors name it
        device = torch.device("cuda", torch.cuda.current_device())
    return device
