"""mergekit YAML configurations, run by clpeft's streaming engine into a transformers directory.

``clpeft merge config.yml --out DIR`` reads what ``mergekit-yaml config.yml DIR`` reads
(arcee-ai/mergekit, ``MergeConfiguration`` in ``mergekit/config.py``): ``merge_method``,
``base_model``, ``models[].model``, ``models[].parameters``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source`` and ``slices``, and writes what it writes: ``config.json``
from the base (with the output dtype), the tokenizer files of ``tokenizer_source`` (default the
base), sharded safetensors with their index (:mod:`~clpeft.merging.sharded`, resumable), and the
YAML as ``mergekit_config.yml``. Every other key is a one-line error that names it.

Parameters follow mergekit's rules: a model's own ``parameters`` win over the top-level ones; a
value is a number, a list (a gradient over the layers: layer ``l`` of ``L`` reads it at
``t = l / (L - 1)``, interpolating numbers; tensors outside the layers read ``t = 0``) or a list
of ``{filter, value}`` (the first whose ``filter`` is a substring of the tensor's name, or has
none, applies). Each mergekit method runs as a configuration of a clpeft method
(:data:`METHODS`); the parameters clpeft applies to all models at once (``density``, ``gamma``,
``epsilon``) must be equal across the models of a tensor. Where clpeft's conventions differ
from mergekit's (weighted sign election, ties' divisor with unequal weights, bf16 arithmetic)
docs/merging.md says how; docs/merging_llm.md maps every key.

``slices`` are accepted when they describe a merge of whole models by layer ranges: each slice
lists the same models with one ``layer_range`` for all of them, and the slices cover layers
``0..L`` in order (per-slice parameters and gradients then apply to their layers). Slices that
repeat, reorder or mix layers (layer stacking, "frankenmerges") are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clpeft.errors import UserError
from clpeft.merging.api import merge_files
from clpeft.merging.io import open_checkpoint
from clpeft.merging.output import atomic_output
from clpeft.merging.report import MergeReport
from clpeft.merging.sharded import ShardRecord

__all__ = ["METHODS", "MergekitPlan", "is_mergekit_config", "plan_mergekit", "run_mergekit"]

_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")
_UNSUPPORTED_TOP = {
    "modules": "per-module merges (multimodal models) are not supported",
    "tokenizer": "tokenizer surgery (tokenizer: tokens) is not supported; use tokenizer_source: base or a model",
    "chat_template": "chat templates are copied with the tokenizer files of tokenizer_source; remove chat_template",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit_config(data: Mapping[str, Any]) -> bool:
    """A YAML mapping is a mergekit configuration when it names a ``merge_method``."""
    return "merge_method" in data


# ------------------------------------------------------------------ methods


Settings = dict[str, Any]


@dataclass(frozen=True)
class _Method:
    """How one mergekit method runs in clpeft.

    Attributes:
        clpeft: the clpeft method.
        shared: mergekit's shared parameters and their defaults (mergekit's).
        per_model: mergekit's per-model parameters and their defaults (``weight``: 1).
        base: ``required``, ``optional`` (absent: the first model is the reference point) or
            ``weighted`` (linear: the base is one of the averaged models when listed).
        translate: (shared values, per-model values of the non-base models, base's values) ->
            clpeft parameters.
    """

    clpeft: str
    shared: Mapping[str, Any]
    per_model: Mapping[str, Any]
    base: str
    translate: Callable[[Settings, list[Settings], Settings | None], Settings]


def _one(per_model: list[Settings], name: str) -> Any:
    """A per-model mergekit parameter that clpeft applies to all models at once."""
    values = {m[name] for m in per_model}
    if len(values) > 1:
        raise UserError(
            f"models[].parameters.{name}: clpeft applies one {name} to every model, got {sorted(values)}; give one value",
            key=f"parameters.{name}",
        )
    return values.pop()


def _task_arithmetic_family(consensus: bool, sparsify: str | None) -> Callable[..., Settings]:
    """mergekit's ``GeneralizedTaskArithmeticMerge`` (``mergekit/merge_methods/generalized_task_arithmetic.py``)."""

    def translate(shared: Settings, per_model: list[Settings], _base: Settings | None) -> Settings:
        weights = [float(m["weight"]) for m in per_model]
        params: Settings = {"scale": float(shared["lambda"])}
        if consensus:
            params["disjoint"] = "mean" if shared["normalize"] else "sum"
        elif shared["normalize"]:  # mergekit divides the weighted sum by the weights' sum
            total = sum(weights)
            weights = [w / total for w in weights] if abs(total) >= 1e-8 else weights
        params["weights"] = weights
        if sparsify is None:
            if shared["rescale"]:
                raise UserError("rescale: true has no effect without sparsification; remove it", key="parameters.rescale")
            return params
        density = float(_one(per_model, "density"))
        if sparsify == "magnitude":  # ties
            if shared["rescale"]:
                raise UserError(
                    "rescale: true (an L1 rescale after TIES' trim) is not supported by clpeft's ties", key="parameters.rescale"
                )
            return params | {"density": min(density, 1.0), "trim": "topk", "trim_scope": "tensor"}
        rescale = "l1" if shared["rescale"] else "none"
        if sparsify == "random":  # mergekit's DARE: keep with probability density, L1 rescale
            return params | {"density": density, "epsilon": 0.0, "rescale": rescale, "consensus": "ties" if consensus else "sum"}
        if sparsify == "della":
            return params | {
                "density": density,
                "epsilon": float(_one(per_model, "epsilon")),
                "rescale": rescale,
                "consensus": "ties" if consensus else "sum",
            }
        return params | {  # breadcrumbs
            "density": density,
            "gamma": float(_one(per_model, "gamma")),
            "rescale": bool(shared["rescale"]),
            "consensus": "ties" if consensus else "sum",
        }

    return translate


def _family(clpeft: str, consensus: bool, sparsify: str | None, normalize: bool, rescale: bool) -> _Method:
    per_model = {"weight": 1.0, "density": 1.0}
    if sparsify == "breadcrumbs":
        per_model["gamma"] = 0.01
    if sparsify == "della":
        per_model["epsilon"] = 0.15
    shared = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
    return _Method(clpeft, shared, per_model, "required", _task_arithmetic_family(consensus, sparsify))


def _linear(shared: Settings, per_model: list[Settings], base: Settings | None) -> Settings:
    weights = [float(m["weight"]) for m in per_model]
    base_weight = float(base["weight"]) if base is not None else 0.0
    return {"weights": weights, "base_weight": base_weight, "normalize": bool(shared["normalize"])}


def _weighted(names: Mapping[str, str]) -> Callable[..., Settings]:
    def translate(shared: Settings, per_model: list[Settings], base: Settings | None) -> Settings:
        params = {names[k]: v for k, v in shared.items()}
        return params | {"weights": [float(m["weight"]) for m in per_model], "origin": "base" if base is not None else "zero"}

    return translate


def _renamed(names: Mapping[str, str], **fixed: Any) -> Callable[..., Settings]:
    def translate(shared: Settings, _per_model: list[Settings], base: Settings | None) -> Settings:
        extra = {"include_base": base is not None} if "include_base" in fixed else {}
        return {names[k]: v for k, v in shared.items()} | extra

    return translate


METHODS: dict[str, _Method] = {
    "task_arithmetic": _family("task_arithmetic", False, None, normalize=False, rescale=False),
    "ties": _family("ties", True, "magnitude", normalize=True, rescale=False),
    "dare_ties": _family("della", True, "random", normalize=False, rescale=True),
    "dare_linear": _family("della", False, "random", normalize=False, rescale=True),
    "breadcrumbs": _family("breadcrumbs", False, "breadcrumbs", normalize=False, rescale=False),
    "breadcrumbs_ties": _family("breadcrumbs", True, "breadcrumbs", normalize=False, rescale=False),
    "della": _family("della", True, "della", normalize=True, rescale=True),
    "della_linear": _family("della", False, "della", normalize=False, rescale=True),
    "linear": _Method("linear", {"normalize": True}, {"weight": 1.0}, "weighted", _linear),
    "slerp": _Method("slerp", {"t": None}, {}, "required", _renamed({"t": "t"})),
    "multislerp": _Method(
        "multislerp",
        {"normalize_weights": True, "eps": 1e-8},
        {"weight": 1.0},
        "optional",
        _weighted({"normalize_weights": "normalize_weights", "eps": "eps"}),
    ),
    "nuslerp": _Method(
        "nuslerp",
        {"nuslerp_flatten": True, "nuslerp_row_wise": False},
        {"weight": 1.0},
        "optional",
        _weighted({"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}),
    ),
    "karcher": _Method(
        "karcher", {"max_iter": 10, "tol": 1e-5}, {}, "optional", _renamed({"max_iter": "max_iter", "tol": "tol"}, include_base=True)
    ),
    "model_stock": _Method("model_stock", {"filter_wise": False}, {}, "required", _renamed({"filter_wise": "filter_wise"})),
    "sce": _Method("sce", {"select_topk": 1.0}, {}, "required", _renamed({"select_topk": "select_topk"})),
}
"""mergekit method -> how clpeft runs it (docs/merging_llm.md has the table)."""


# ------------------------------------------------------------------ settings


def _evaluate(setting: Any, name: str, t: float, where: str) -> Any:
    """A mergekit parameter setting for tensor ``name`` at layer position ``t`` (see the module
    docstring); None when no filter matches."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list) or not setting:
        raise UserError(f"a parameter is a value, a list of values (a gradient) or a list of {{filter, value}}, got {setting!r}", key=where)
    if all(isinstance(v, Mapping) for v in setting):
        for condition in setting:
            unknown = set(condition) - {"filter", "value"}
            if unknown or "value" not in condition:
                raise UserError(f"a conditional parameter has keys filter and value, got {sorted(condition)}", key=where)
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in name:
                return _evaluate(condition["value"], name, t, where)
        return None
    if not all(isinstance(v, (bool, int, float, str)) for v in setting):
        raise UserError(f"a gradient is a list of values, got {setting!r}", key=where)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
    position = t * (len(setting) - 1)
    if not numeric:
        return setting[int(position)]
    low = int(position)
    high = min(len(setting) - 1, low + 1)
    return (1 - (position - low)) * setting[low] + (position - low) * setting[high]


@dataclass(frozen=True)
class _Source:
    """One model of the merge: its directory and its own parameters (``models[].parameters``)."""

    path: Path
    parameters: Mapping[str, Any]


@dataclass
class MergekitPlan:
    """A mergekit YAML translated: what :func:`run_mergekit` passes to :func:`~clpeft.merging.merge_files`."""

    method: str
    base: Path
    models: list[Path]
    parameters_of: Callable[[str], Settings]
    dtype: str | None
    tokenizer_source: Path
    config_source: Path


def _model_path(reference: Any, where: str) -> Path:
    """A mergekit model reference (a path, or ``{model: {path: ...}}``) as a local directory."""
    if isinstance(reference, Mapping):
        extra = set(reference) - {"model"}
        if extra:
            raise UserError(f"model references with {', '.join(sorted(extra))} (LoRA, overrides) are not supported", key=where)
        inner = reference.get("model")
        if isinstance(inner, Mapping):
            extra = set(inner) - {"path"}
            if extra:
                raise UserError(f"model references with {', '.join(sorted(extra))} (revisions) are not supported", key=where)
            inner = inner.get("path")
        reference = inner
    if not isinstance(reference, str) or not reference:
        raise UserError(f"a model is a local directory path, got {reference!r}", key=where)
    if "+" in reference:
        raise UserError(f"'{reference}': model+LoRA references are not supported; merge the adapter into its model first", key=where)
    path = Path(os.path.expanduser(reference))
    if not path.is_dir():
        raise UserError(
            f"model '{reference}' is not a local directory: clpeft merges local checkpoints only (no hub downloads); "
            f"download it first (huggingface-cli download {reference} --local-dir DIR) and give DIR",
            key=where,
        )
    return path


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key in _UNSUPPORTED_TOP and where == "":
            raise UserError(f"mergekit key '{key}' is not supported by clpeft: {_UNSUPPORTED_TOP[key]}", key=key)
        if key not in allowed:
            raise UserError(f"mergekit key '{key}' is not supported by clpeft (supported here: {', '.join(allowed)})", key=where + key)


def _sources(data: Mapping[str, Any]) -> tuple[list[_Source], list[tuple[int, int, Mapping[str, Any], list[Mapping]]]]:
    """The models and, for ``slices``, per slice ``(start, stop, slice parameters, per-model parameters)``."""
    if ("models" in data) == ("slices" in data):
        raise UserError("a mergekit config needs exactly one of models and slices", key="models")
    if "models" in data:
        if not isinstance(data["models"], list) or not data["models"]:
            raise UserError("models must be a non-empty list of {model, parameters}", key="models")
        sources = []
        for i, entry in enumerate(data["models"]):
            entry = entry if isinstance(entry, Mapping) else {"model": entry}
            _check_keys(entry, ("model", "parameters"), f"models[{i}].")
            sources.append(_Source(_model_path(entry.get("model"), f"models[{i}].model"), entry.get("parameters") or {}))
        return sources, []
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise UserError("slices must be a non-empty list of {sources: [...]}", key="slices")
    layout, sources = [], None
    position = 0
    for s, entry in enumerate(slices):
        _check_keys(entry, ("sources", "parameters", "base_model"), f"slices[{s}].")
        if "base_model" in entry and entry["base_model"] != data.get("base_model"):
            raise UserError("a per-slice base_model is not supported; give one top-level base_model", key=f"slices[{s}].base_model")
        paths, ranges, params = [], set(), []
        for m, source in enumerate(entry.get("sources") or []):
            _check_keys(source, ("model", "layer_range", "parameters"), f"slices[{s}].sources[{m}].")
            paths.append(_model_path(source.get("model"), f"slices[{s}].sources[{m}].model"))
            ranges.add(tuple(source.get("layer_range") or ()))
            params.append(source.get("parameters") or {})
        if sources is None:
            sources = [_Source(path, {}) for path in paths]
        layer_range = ranges.pop() if len(ranges) == 1 else None
        if paths != [src.path for src in sources] or layer_range is None or len(layer_range) != 2 or layer_range[0] != position:
            raise UserError(
                "slices that stack, repeat, reorder or mix layers (frankenmerges) are not supported: every slice must list "
                f"the same models with one layer_range, the slices covering layers 0..L in order (slice {s} does not)",
                key=f"slices[{s}]",
            )
        layout.append((layer_range[0], layer_range[1], entry.get("parameters") or {}, params))
        position = layer_range[1]
    return sources, layout


def plan_mergekit(data: Mapping[str, Any]) -> MergekitPlan:
    """Translate a mergekit configuration (see the module docstring).

    Raises:
        UserError: one line naming the first unsupported key or value.
    """
    _check_keys(data, _TOP_KEYS, "")
    name = data["merge_method"]
    if name not in METHODS:
        raise UserError(f"mergekit merge_method '{name}' is not supported by clpeft (supported: {', '.join(METHODS)})", key="merge_method")
    method = METHODS[name]
    sources, layout = _sources(data)
    base_path = _model_path(data["base_model"], "base_model") if data.get("base_model") else None
    if base_path is None and method.base == "required":
        raise UserError(f"mergekit's {name} needs a base_model", key="base_model")
    listed_base = next((s for s in sources if base_path is not None and s.path.resolve() == base_path.resolve()), None)
    others = [s for s in sources if s is not listed_base]
    base_source = (listed_base or _Source(base_path, {})) if base_path is not None else None
    if base_path is None:  # mergekit's base-free methods: the first model is only the reference point
        base_path = sources[0].path
        if method.base == "weighted":  # linear: the first model is the base, weighted
            base_source, others = sources[0], sources[1:]
    if not others:
        raise UserError(f"mergekit's {name} needs at least one model besides the base", key="models")
    shared_top = dict(data.get("parameters") or {})
    allowed = set(method.shared) | set(method.per_model)
    scopes = [("parameters", shared_top), *((f"models[{i}].parameters", s.parameters) for i, s in enumerate(sources))]
    for i, (_, _, slice_params, source_params) in enumerate(layout):
        scopes += [(f"slices[{i}].parameters", slice_params)]
        scopes += [(f"slices[{i}].sources[{m}].parameters", p) for m, p in enumerate(source_params)]
    for where, params in scopes:
        for key in params:
            if key not in allowed:
                raise UserError(
                    f"mergekit parameter '{key}' is not supported for merge_method {name} (supported: {', '.join(sorted(allowed)) or 'none'})",
                    key=f"{where}.{key}",
                )
    if any(v is None for v in method.shared.values()) and not all(k in shared_top for k, v in method.shared.items() if v is None):
        missing = [k for k, v in method.shared.items() if v is None and k not in shared_top]
        if not (layout and all(all(k in sl[2] for k in missing) for sl in layout)):
            raise UserError(f"mergekit's {name} needs the parameter {missing[0]}", key=f"parameters.{missing[0]}")
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise UserError(
            f"dtype must be one of {', '.join(_DTYPES)}, got {out_dtype!r}", key="out_dtype" if data.get("out_dtype") else "dtype"
        )
    tokenizer = data.get("tokenizer_source")
    if tokenizer == "union":
        raise UserError("tokenizer_source: union (a merged vocabulary) is not supported; use base or a model", key="tokenizer_source")
    tokenizer_path = base_path if tokenizer in (None, "base") else _model_path(tokenizer, "tokenizer_source")
    layers = _layer_count(base_path)
    if layout and layout[-1][1] != layers:
        raise UserError(f"the slices cover layers 0..{layout[-1][1]} but the base has {layers}", key="slices")

    def parameters_of(tensor: str) -> Settings:
        match = _LAYER.search(tensor)
        layer = int(match.group(1)) if match else None
        slice_, t = _position(layout, layer, layers)
        scopes_shared = [slice_[2], shared_top] if slice_ else [shared_top]
        shared = {k: _resolve(k, d, scopes_shared, tensor, t) for k, d in method.shared.items()}

        def model_settings(source: _Source) -> Settings:
            own = (slice_[3][sources.index(source)] if source in sources else {}) if slice_ else source.parameters
            return {k: _resolve(k, d, [own, *scopes_shared], tensor, t) for k, d in method.per_model.items()}

        base_settings = model_settings(base_source) if base_source is not None else None
        return method.translate(shared, [model_settings(s) for s in others], base_settings)

    models = [s.path for s in others]
    return MergekitPlan(method.clpeft, base_path, models, parameters_of, _DTYPES.get(out_dtype), tokenizer_path, base_path)


def _resolve(key: str, default: Any, scopes: Sequence[Mapping[str, Any]], tensor: str, t: float) -> Any:
    for scope in scopes:
        if key in scope:
            value = _evaluate(scope[key], tensor, t, f"parameters.{key}")
            if value is not None:
                return value
    if default is None:
        raise UserError(f"no value of the parameter {key} applies to tensor '{tensor}' (add one without a filter)", key=f"parameters.{key}")
    return default


def _position(layout, layer: int | None, layers: int):
    """The slice of a layer (None without slices) and mergekit's gradient position ``t``."""
    if layer is None:
        return (layout[0] if layout else None), 0.0
    if not layout:
        return None, layer / (layers - 1) if layers > 1 else 1.0
    for start, stop, *rest in layout:
        if start <= layer < stop:
            return (start, stop, *rest), (layer - start) / (stop - start - 1) if stop - start > 1 else 1.0
    return layout[-1], 0.0


def _layer_count(directory: Path) -> int:
    """The number of transformer layers: ``num_hidden_layers`` of config.json, else the tensor names."""
    config = directory / "config.json"
    if config.is_file():
        layers = json.loads(config.read_text()).get("num_hidden_layers")
        if isinstance(layers, int):
            return layers
    with open_checkpoint(directory) as source:
        found = [int(m.group(1)) for k in source.keys() if (m := _LAYER.search(k))]
    return max(found, default=-1) + 1


def run_mergekit(
    config: str | os.PathLike,
    out: str | os.PathLike,
    *,
    device: str = "cpu",
    seed: int = 0,
    shard_size: int | str = "5G",
    resume: bool = False,
    progress: str = "auto",
    on_shard: Callable[[ShardRecord], None] | None = None,
    data: Mapping[str, Any] | None = None,
) -> MergeReport:
    """Run a mergekit YAML into the transformers directory ``out`` (see the module docstring).

    Args:
        config: the YAML file (read with clpeft's safe loader unless ``data`` is given).
        out: the output directory.
        device, seed, shard_size, resume, progress, on_shard: as in :func:`~clpeft.merging.merge_files`.
        data: the YAML's mapping, when the caller has read it already.

    Returns:
        The merge report (also written as ``clpeft_merge_report.json`` in ``out``).
    """
    from clpeft.config import read_yaml

    config, out = Path(config), Path(out)
    data = read_yaml(config) if data is None else data
    plan = plan_mergekit(data)
    first = _first_tensor(plan.base)
    report = merge_files(
        plan.base,
        plan.models,
        out,
        plan.method,
        device=device,
        seed=seed,
        progress=progress,
        shard_size=shard_size,
        resume=resume,
        dtype=plan.dtype,
        tensor_parameters=plan.parameters_of,
        on_shard=on_shard,
        **plan.parameters_of(first),
    )
    _copy_config(plan.config_source / "config.json", out / "config.json", plan.dtype)
    if (plan.config_source / "generation_config.json").is_file():
        _copy(plan.config_source / "generation_config.json", out / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (plan.tokenizer_source / name).is_file():
            _copy(plan.tokenizer_source / name, out / name)
    _copy(config, out / "mergekit_config.yml")
    return report


def _first_tensor(base: Path) -> str:
    with open_checkpoint(base) as source:
        return source.keys()[0]


def _copy(source: Path, target: Path) -> None:
    with atomic_output(target) as f:
        f.write(source.read_bytes())


def _copy_config(source: Path, target: Path, dtype: str | None) -> None:
    if not source.is_file():
        raise UserError(f"the base {source.parent} has no config.json; a transformers directory needs one")
    config = json.loads(source.read_text())
    if dtype is not None:  # transformers 5 reads "dtype", earlier versions "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = dtype
    with atomic_output(target) as f:
        f.write(json.dumps(config, indent=2).encode())
