"""Layer slices: mergekit's ``slices:`` (layer stacking, "frankenmerges") and its ``passthrough``.

Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models", EMNLP 2024
Industry Track, https://arxiv.org/abs/2403.13257 (section 3, "passthrough" / frankenmerging);
depth up-scaling by stacking overlapping layer ranges of one model is Kim et al., "SOLAR 10.7B:
Scaling Large Language Models with Simple yet Effective Depth Up-Scaling", NAACL 2024 Industry,
https://arxiv.org/abs/2312.15166.

The output is built as mergekit builds it (``MergePlanner.plan_module`` / ``plan_slice`` in
``mergekit/plan.py``): every slice lists sources, each a model and a ``layer_range [a, b)``, all
of the same length ``n``; the slices, in order, give the output's layers, renumbered from 0, so
output layer ``j`` is the merge of layer ``a_k + i`` of every source ``k`` of its slice (``i``
its offset in the slice), and ``num_hidden_layers`` is the sum of the ``n``. A layer tensor's
gradient position is ``t = i / (n - 1)`` (1 for a one-layer slice). Tensors outside the layers
come, with ``t = 0``, from the first slice's sources (and parameters) when they are on the input
side (mergekit's ``pre_weights``: names holding ``embed``, except GPT-NeoX's ``embed_out`` head)
and from the last slice's otherwise (``post_weights``: the final norm, ``lm_head``). Layers are
the tensors named ``...layers.N....`` (Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX).

``passthrough`` takes one source per slice and copies its tensors, each multiplied by ``scale``
where one applies (``mergekit/merge_methods/passthrough.py``), in the input ``dtype`` when one is
given (mergekit converts its inputs to ``dtype`` first). It is not a registered merge method:
those map the task vectors of ``K >= 1`` fine-tunes to a merged task vector added back to a
base (:mod:`~clpeft.merging.registry`), and ``base + (scale - 1) base`` would neither read one
model nor equal mergekit's ``scale * x`` bit for bit. It runs here instead, as copies of a
:class:`ComposedSource` that renames (and scales) the sources' tensors; a slice merged with any
other method runs the :class:`~clpeft.merging.engine.MergeEngine` on such views. Both write
through :func:`~clpeft.merging.sharded.write_sharded` (resumable); passthrough holds one
tensor at a time (its mapped input, a converted or scaled copy and the cast output: ``3 L`` at
most), and a sliced merge with a method has the bound of :func:`~clpeft.merging.sharded.rss_bound`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from clpeft.errors import UserError
from clpeft.merging.engine import MergeEngine
from clpeft.merging.io import TensorInfo, TensorSource, open_checkpoint
from clpeft.merging.output import check_outputs
from clpeft.merging.registry import get_method
from clpeft.merging.report import MergeReport, TensorReport
from clpeft.merging.rules import MergeRules, TensorJob, plan
from clpeft.merging.sharded import INDEX_NAME, PROGRESS_NAME, ShardRecord, fingerprint, parse_size, progress_bar, write_sharded_report

__all__ = ["ComposedSource", "OutputSlice", "SliceLayout", "SliceSource", "merge_slices", "plan_slices", "sliced_config"]

Policy = Literal["single", "required", "optional", "weighted"]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_INPUT_SIDE = re.compile(r"embed(?!_out)")  # token / position embeddings; GPT-NeoX's head is embed_out


@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: a model directory, its layers ``[start, stop)`` and its parameters."""

    path: Path
    start: int
    stop: int
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """One slice: its sources, its parameters and its base model (its own or the top-level one)."""

    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    base: Path | None = None


@dataclass
class SliceLayout:
    """The output of a sliced merge, planned from the checkpoints' headers.

    Attributes:
        slices: the slices, in order.
        roles: per slice, its base source (None: a base-free method, whose reference point is
            the first source) and the sources merged onto it, in order (empty for passthrough).
        layers: the output's number of layers.
        origins: per output layer, the model and layer its first input comes from.
        tensors: output name -> (slice index, ``t``, per input ``(model, input name)``: the base
            view's first, then each merged model's).
    """

    slices: list[OutputSlice]
    roles: list[tuple[SliceSource | None, list[SliceSource]]]
    layers: int
    origins: list[tuple[Path, int]]
    tensors: dict[str, tuple[int, float, list[tuple[Path, str]]]]

    def place(self, name: str) -> tuple[int, float]:
        """The slice whose sources and parameters make output tensor ``name``, and its ``t``."""
        slice_index, t, _ = self.tensors[name]
        return slice_index, t

    @property
    def models(self) -> list[Path]:
        """Every model read, in order of first use."""
        return list(dict.fromkeys(path for _, _, inputs in self.tensors.values() for path, _ in inputs))


def _renumber(name: str, layer: int) -> str:
    match = _LAYER.search(name)
    return f"{name[: match.start(1)]}{layer}{name[match.end(1) :]}"


def _roles(out_slice: OutputSlice, index: int, policy: Policy) -> tuple[SliceSource | None, list[SliceSource]]:
    """A slice's base and merged sources, as mergekit's method of that base policy reads them."""
    sources = list(out_slice.sources)
    if policy == "single":
        if len(sources) != 1:
            raise UserError(f"passthrough copies one source per slice, slice {index} lists {len(sources)}", key=f"slices[{index}].sources")
        return sources[0], []
    listed = [s for s in sources if out_slice.base is not None and s.path.resolve() == out_slice.base.resolve()]
    if policy == "weighted":  # linear: a listed base is weighted, else the first source is
        base = listed[0] if listed else sources[0]
        return base, [s for s in sources if s is not base]
    if out_slice.base is not None and not listed:
        raise UserError(f"slice {index} does not list the base_model {out_slice.base} among its sources", key=f"slices[{index}].sources")
    if not listed:
        if policy == "required":
            raise UserError(f"slice {index} needs a base_model (the merge method requires one)", key="base_model")
        return None, sources  # base-free: the first source is only the reference point
    others = [s for s in sources if s is not listed[0]]
    if not others:
        raise UserError(
            f"slice {index} lists only its base model; the merge needs at least one other source", key=f"slices[{index}].sources"
        )
    return listed[0], others


def plan_slices(slices: Sequence[OutputSlice], policy: Policy) -> SliceLayout:
    """Check the slices against the checkpoints' headers and name every output tensor.

    Raises:
        UserError: one line for a slice whose sources hold different numbers of layers, a
            ``layer_range`` outside its model, a model listed twice in a slice, a different
            number of merged models between slices, or a tensor one source lacks or holds in
            another shape.
    """
    headers: dict[Path, dict[str, TensorInfo]] = {}

    def header(path: Path) -> dict[str, TensorInfo]:
        if path not in headers:
            with open_checkpoint(path) as source:
                headers[path] = {name: source.info(name) for name in source.keys()}
        return headers[path]

    for i, out_slice in enumerate(slices):
        _check_ranges(out_slice, i, header)
    roles = [_roles(s, i, policy) for i, s in enumerate(slices)]
    widths = {len(others) for _, others in roles}
    if len(widths) > 1:
        raise UserError(
            f"the slices merge different numbers of models ({sorted(widths)}); clpeft needs the same number in every slice", key="slices"
        )
    inputs = [[base or others[0], *others] for base, others in roles]
    tensors: dict[str, tuple[int, float, list[tuple[Path, str]]]] = {}

    def add(out_name: str, index: int, t: float, names: Sequence[str]) -> None:
        template = header(inputs[index][0].path)[names[0]]
        for source, name in zip(inputs[index], names):
            info = header(source.path).get(name)
            if info is None or info.shape != template.shape:
                found = "lacks it" if info is None else f"holds it with shape {list(info.shape)}"
                raise UserError(
                    f"tensor '{name}' (output '{out_name}'): {source.path} {found}, {inputs[index][0].path} has shape "
                    f"{list(template.shape)}; the sources of a slice must share their architecture",
                    key=f"slices[{index}]",
                )
        tensors[out_name] = (index, t, [(s.path, n) for s, n in zip(inputs[index], names)])

    outside = [(i, n) for i in (0, len(slices) - 1) for n in header(inputs[i][0].path) if not _LAYER.search(n)]
    for name in (n for i, n in outside if i == 0 and _INPUT_SIDE.search(n)):
        add(name, 0, 0.0, [name] * len(inputs[0]))
    origins: list[tuple[Path, int]] = []
    for index, sources in enumerate(inputs):
        first = sources[0]
        length = first.stop - first.start
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            own = [n for n in header(first.path) if (m := _LAYER.search(n)) and int(m.group(1)) == first.start + offset]
            for name in own:
                add(_renumber(name, len(origins)), index, t, [_renumber(name, s.start + offset) for s in sources])
            origins.append((first.path, first.start + offset))
    for name in (n for i, n in outside if i == len(slices) - 1 and not _INPUT_SIDE.search(n)):
        add(name, len(slices) - 1, 0.0, [name] * len(inputs[-1]))
    return SliceLayout(list(slices), roles, len(origins), origins, tensors)


def sliced_config(config: Mapping[str, Any], layout: SliceLayout) -> dict[str, Any]:
    """A transformers config for the output: ``num_hidden_layers`` is the output's (as mergekit
    sets it), and a per-layer ``layer_types`` list (Gemma 3, Qwen 3: sliding or full attention)
    follows the layers, each output layer taking its origin layer's type from that model's
    config.json. mergekit leaves ``layer_types`` as it was, which transformers then refuses
    (``num_hidden_layers`` must equal the number of ``layer_types``).

    Raises:
        UserError: a source model's config.json lacks the type of a layer it contributes.
    """
    config = {**config, "num_hidden_layers": layout.layers}
    if isinstance(config.get("layer_types"), list):
        types = {}
        for path, layer in layout.origins:
            if path not in types:
                own = path / "config.json"
                types[path] = json.loads(own.read_text()).get("layer_types") if own.is_file() else None
            if not isinstance(types[path], list) or layer >= len(types[path]):
                raise UserError(f"{path}/config.json gives no layer_types entry for its layer {layer}, which the output takes")
        config["layer_types"] = [types[path][layer] for path, layer in layout.origins]
    return config


def _check_ranges(out_slice: OutputSlice, index: int, header: Callable[[Path], dict[str, TensorInfo]]) -> None:
    if not out_slice.sources:
        raise UserError("a slice needs at least one source", key=f"slices[{index}].sources")
    lengths = [s.stop - s.start for s in out_slice.sources]
    if len(set(lengths)) > 1:
        raise UserError(
            f"the sources' layer_ranges hold {' and '.join(map(str, lengths))} layers; every source of a slice needs the same number",
            key=f"slices[{index}]",
        )
    seen: set[Path] = set()
    for position, source in enumerate(out_slice.sources):
        where = f"slices[{index}].sources[{position}]"
        if source.path.resolve() in seen:
            raise UserError(f"{source.path} is listed twice in one slice; give each model once per slice", key=where)
        seen.add(source.path.resolve())
        count = max((int(match.group(1)) + 1 for n in header(source.path) if (match := _LAYER.search(n))), default=0)
        if count == 0:
            raise UserError(f"{source.path} has no tensors named '...layers.N...': slices need a model with numbered layers", key=where)
        if not 0 <= source.start < source.stop <= count:
            raise UserError(
                f"layer_range [{source.start}, {source.stop}] is out of bounds: {source.path} has {count} layers "
                f"(give 0 <= a < b <= {count})",
                key=f"{where}.layer_range",
            )


class ComposedSource:
    """A :class:`~clpeft.merging.io.TensorSource` whose tensors are other sources' tensors under
    new names; ``transform`` gives a tensor's dtype to convert to and factor to multiply by
    (passthrough's ``dtype`` and ``scale``: (None, None) reads the bytes in place)."""

    def __init__(
        self,
        entries: Mapping[str, tuple[TensorSource, str]],
        description: str,
        transform: Callable[[str], tuple[torch.dtype | None, float | None]] | None = None,
    ):
        self._entries = dict(entries)
        self._transform = transform
        self._held: dict[str, torch.Tensor] = {}
        self.description = description

    def keys(self) -> list[str]:
        return list(self._entries)

    def _how(self, key: str) -> tuple[torch.dtype | None, float | None]:
        source, name = self._entries[key]
        if self._transform is None or not source.info(name).dtype.is_floating_point:
            return None, None
        return self._transform(key)

    def info(self, key: str) -> TensorInfo:
        source, name = self._entries[key]
        info = source.info(name)
        dtype, _ = self._how(key)
        return info if dtype is None else TensorInfo(dtype, info.shape)

    def view(self, key: str) -> torch.Tensor:
        source, name = self._entries[key]
        dtype, scale = self._how(key)
        raw = source.view(name)
        if dtype is None and scale is None:
            return raw
        info = source.info(name)
        tensor = raw.view(info.dtype).view(info.shape).to(dtype or info.dtype)
        self._held[key] = (tensor if scale is None else tensor * scale).reshape(-1).view(torch.uint8)
        return self._held[key]

    def flat(self, key: str) -> torch.Tensor:
        return self.view(key).view(self.info(key).dtype)

    def release(self, key: str) -> None:
        self._held.pop(key, None)
        source, name = self._entries[key]
        source.release(name)

    def read(self, key: str) -> torch.Tensor:
        info = self.info(key)
        return self.view(key).clone().view(info.dtype).view(info.shape)

    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self._held.clear()


class _Copy:
    """passthrough's engine: hands each tensor of a source to the sink unmerged."""

    def __init__(self, source: TensorSource):
        self.source = source

    def run(self, jobs: Sequence[TensorJob], sink, *, start: int = 0) -> list[TensorReport]:
        reports = []
        for job in jobs[start:]:
            sink(job, self.source.view(job.name).view(job.info.dtype).view(job.info.shape))
            self.source.release(job.name)
            reports.append(TensorReport(job.name, list(job.info.shape), merged=False))
        return reports


def merge_slices(
    layout: SliceLayout,
    out: Path,
    method: str,
    parameters_of: Callable[[str], Mapping[str, Any]],
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    shard_size: int | str = "5G",
    resume: bool = False,
    progress: str = "auto",
    on_shard: Callable[[ShardRecord], None] | None = None,
) -> MergeReport:
    """Write the sliced merge of ``layout`` as a sharded checkpoint in ``out`` (see the module docstring).

    Args:
        layout: from :func:`plan_slices`.
        out: the output directory.
        method: ``passthrough`` or a registered tensor merge method.
        parameters_of: output tensor name -> its parameters (passthrough: ``{"scale": s or None}``).
        dtype: passthrough converts its inputs to this dtype before scaling (mergekit's ``dtype``).
        out_dtype: cast floating outputs to this dtype (None: as computed).
        device, seed, shard_size, resume, progress, on_shard: as in :func:`~clpeft.merging.merge_files`.

    Returns:
        The merge report, also written as ``clpeft_merge_report.json`` in ``out``.
    """
    out, shard_bytes = Path(out), parse_size(shard_size)
    passthrough = method == "passthrough"
    spec = None if passthrough else get_method(method)
    report_path = out / "clpeft_merge_report.json"
    with ExitStack() as stack:
        opened = {path: stack.enter_context(open_checkpoint(path)) for path in layout.models}
        read = [*opened, *(p for s in opened.values() for p in s.paths)]
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} is not a directory; give a directory for the merged model", key="out")
        check_outputs({"out": out / INDEX_NAME, "progress": out / PROGRESS_NAME, "report": report_path}, read)

        def transform(name: str) -> tuple[torch.dtype | None, float | None]:
            return (getattr(torch, dtype) if dtype else None), parameters_of(name)["scale"]

        views = []
        for k in range(len(next(iter(layout.tensors.values()))[2])):
            entries = {name: (opened[inputs[k][0]], inputs[k][1]) for name, (_, _, inputs) in layout.tensors.items()}
            role = "the slices' base" if k == 0 else f"merged model {k} of the slices"
            views.append(ComposedSource(entries, role, transform if passthrough else None))
        base, models = views[0], views[1:]
        if passthrough:
            jobs = [TensorJob(name, base.info(name), merge=False) for name in base.keys()]
        else:
            jobs = plan(base, models, MergeRules())
        cache: dict[str, Mapping[str, Any]] = {}

        def validated(job: TensorJob) -> Mapping[str, Any]:
            """A job's validated method parameters (passthrough: none; its scale is in the view)."""
            if passthrough:
                return {}
            key = json.dumps(parameters_of(job.name), sort_keys=True, default=str)
            if key not in cache:
                cache[key] = spec.validate(parameters_of(job.name))
            return cache[key]

        def engine_for(parameters: Mapping[str, Any]):
            if passthrough:
                return _Copy(base)
            return MergeEngine(spec, parameters, base, models, device=torch.device(device), seed=seed, overlap_writes=True)

        table = [[name, index, t, [[str(p), n] for p, n in inputs]] for name, (index, t, inputs) in layout.tensors.items()]
        settings = {
            "method": method,
            "layout": hashlib.sha256(json.dumps(table).encode()).hexdigest(),
            "tensor_parameters": hashlib.sha256(json.dumps([parameters_of(j.name) for j in jobs], default=str).encode()).hexdigest(),
            "seed": seed,
            "device": torch.device(device).type,
            "dtype": [dtype, out_dtype],
            "shard_size": shard_bytes,
        }
        first = parameters_of(jobs[0].name)
        result = MergeReport(method, dict(first), str(layout.models[0]), [str(p) for p in layout.models], str(device), seed)
        bar = progress_bar(jobs, f"{method} slices", progress)
        stack.callback(bar.close)
        return write_sharded_report(
            out,
            jobs,
            engine_for,
            validated,
            report=result,
            report_path=report_path,
            bar=bar,
            start=time.perf_counter(),
            dtype=getattr(torch, out_dtype) if out_dtype else None,
            shard_bytes=shard_bytes,
            metadata={"format": "pt", "clpeft_merge": json.dumps({"method": method, "slices": len(layout.slices)})},
            stamp=fingerprint({str(path): source.paths for path, source in opened.items()}, settings),
            resume=resume,
            on_shard=on_shard,
            inputs=read,
        )
