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

``slices`` build the output layer by layer as mergekit does (:mod:`~clpeft.merging.slices`):
layer stacking ("frankenmerges") with ``merge_method: passthrough`` (one source per slice, its
``scale`` parameter included), or a per-slice merge of sources whose ``layer_range`` s hold the
same number of layers, with any method above; a slice may name its own ``base_model``.
``config.json`` then gets the new ``num_hidden_layers``. ``passthrough`` with ``models:`` copies
its one model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clpeft.errors import UserError
from clpeft.merging.api import merge_files
from clpeft.merging.io import open_checkpoint
from clpeft.merging.output import atomic_output
from clpeft.merging.report import MergeReport
from clpeft.merging.sharded import ShardedOptions
from clpeft.merging.slices import OutputSlice, SliceLayout, SliceSource, merge_slices, plan_slices, sliced_config

if TYPE_CHECKING:
    from typing_extensions import Unpack

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
    "nearswap": _Method("nearswap", {"t": None}, {}, "required", _renamed({"t": "t"})),
    "ram": _Method("ram", {"epsilon": 1e-5}, {}, "required", _renamed({"epsilon": "epsilon"})),
    "ramplus_tl": _Method(
        "ramplus_tl",
        {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        {},
        "required",
        _renamed({"r": "r", "alpha": "alpha", "epsilon": "epsilon"}),
    ),
    "arcee_fusion": _Method("arcee_fusion", {}, {}, "required", _renamed({})),
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
    layout: SliceLayout | None = None
    input_dtype: str | None = None


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


def _sources(data: Mapping[str, Any]) -> tuple[list[_Source], list[OutputSlice]]:
    """The models of ``models:``, or the slices of ``slices:``."""
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
    top_base = _model_path(data["base_model"], "base_model") if data.get("base_model") else None
    layout = []
    for s, entry in enumerate(slices):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sources"), list):
            raise UserError("a slice is {sources: [{model, layer_range}, ...], parameters, base_model}", key=f"slices[{s}]")
        _check_keys(entry, ("sources", "parameters", "base_model"), f"slices[{s}].")
        own_base = entry.get("base_model")
        base = _model_path(own_base, f"slices[{s}].base_model") if own_base else top_base
        parts = []
        for m, source in enumerate(entry["sources"]):
            where = f"slices[{s}].sources[{m}]"
            _check_keys(source, ("model", "layer_range", "parameters"), where + ".")
            layer_range = source.get("layer_range")
            if not (isinstance(layer_range, list) and len(layer_range) == 2 and all(type(v) is int for v in layer_range)):
                raise UserError(f"layer_range is [first, end) as two integers, got {layer_range!r}", key=f"{where}.layer_range")
            path = _model_path(source.get("model"), f"{where}.model")
            parts.append(SliceSource(path, *layer_range, source.get("parameters") or {}))
        layout.append(OutputSlice(tuple(parts), entry.get("parameters") or {}, base))
    return [], layout


def plan_mergekit(data: Mapping[str, Any]) -> MergekitPlan:
    """Translate a mergekit configuration (see the module docstring).

    Raises:
        UserError: one line naming the first unsupported key or value.
    """
    _check_keys(data, _TOP_KEYS, "")
    name = data["merge_method"]
    if name not in METHODS and name != "passthrough":
        supported = ", ".join([*METHODS, "passthrough"])
        raise UserError(f"mergekit merge_method '{name}' is not supported by clpeft (supported: {supported})", key="merge_method")
    sources, slices = _sources(data)
    base_path = _model_path(data["base_model"], "base_model") if data.get("base_model") else None
    shared_top = dict(data.get("parameters") or {})
    if name == "passthrough" and sources:  # models: with one model is one slice of all its layers
        if len(sources) != 1 or (base_path is not None and base_path.resolve() != sources[0].path.resolve()):
            count = len(sources) + (base_path is not None and all(s.path.resolve() != base_path.resolve() for s in sources))
            raise UserError(
                f"merge_method 'passthrough' is not supported with {count} models: it copies one model per slice; "
                "give slices: with one source each",
                key="models",
            )
        slices = [OutputSlice((SliceSource(sources[0].path, 0, _layer_count(sources[0].path), sources[0].parameters),))]
    method = METHODS.get(name)
    allowed = {"scale"} if method is None else set(method.shared) | set(method.per_model)
    scopes = [("parameters", shared_top), *((f"models[{i}].parameters", s.parameters) for i, s in enumerate(sources))]
    for i, out_slice in enumerate(slices):
        scopes += [(f"slices[{i}].parameters", out_slice.parameters)]
        scopes += [(f"slices[{i}].sources[{m}].parameters", p.parameters) for m, p in enumerate(out_slice.sources)]
    for where, params in scopes:
        for key in params:
            if key not in allowed:
                raise UserError(
                    f"mergekit parameter '{key}' is not supported for merge_method {name} (supported: {', '.join(sorted(allowed)) or 'none'})",
                    key=f"{where}.{key}",
                )
    missing = [k for k, v in (method.shared if method else {}).items() if v is None and k not in shared_top]
    if missing and not (slices and all(missing[0] in sl.parameters for sl in slices)):
        raise UserError(f"mergekit's {name} needs the parameter {missing[0]}", key=f"parameters.{missing[0]}")
    if slices:
        return _plan_sliced(data, name, slices, base_path, shared_top)
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
    out_dtype, tokenizer_path = _outputs(data, base_path)
    layers = _layer_count(base_path)

    def parameters_of(tensor: str) -> Settings:
        match = _LAYER.search(tensor)
        layer = int(match.group(1)) if match else None
        t = 0.0 if layer is None else layer / (layers - 1) if layers > 1 else 1.0
        shared = {k: _resolve(k, d, [shared_top], tensor, t) for k, d in method.shared.items()}

        def model_settings(source: _Source) -> Settings:
            return {k: _resolve(k, d, [source.parameters, shared_top], tensor, t) for k, d in method.per_model.items()}

        base_settings = model_settings(base_source) if base_source is not None else None
        return method.translate(shared, [model_settings(s) for s in others], base_settings)

    models = [s.path for s in others]
    return MergekitPlan(method.clpeft, base_path, models, parameters_of, out_dtype, tokenizer_path, base_path)


def _plan_sliced(
    data: Mapping[str, Any], name: str, slices: list[OutputSlice], base_path: Path | None, shared_top: Settings
) -> MergekitPlan:
    """A ``slices:`` config (or passthrough): the layout and its per-tensor parameters, mergekit's
    precedence (the source's, the slice's, the top-level parameters) at the slice's ``t``."""
    method = METHODS.get(name)
    if method is not None and method.base == "required" and any(sl.base is None for sl in slices):
        raise UserError(f"mergekit's {name} needs a base_model", key="base_model")
    layout = plan_slices(slices, "single" if method is None else method.base)
    config_path = base_path or slices[0].sources[0].path  # mergekit: the base, else a referenced model
    out_dtype, tokenizer_path = _outputs(data, config_path)

    def parameters_of(tensor: str) -> Settings:
        index, t = layout.place(tensor)
        scopes = [layout.slices[index].parameters, shared_top]
        base, others = layout.roles[index]
        if method is None:
            return {"scale": _first("scale", [base.parameters, *scopes], tensor, t)}
        shared = {k: _resolve(k, d, scopes, tensor, t) for k, d in method.shared.items()}

        def settings(source: SliceSource) -> Settings:
            return {k: _resolve(k, d, [source.parameters, *scopes], tensor, t) for k, d in method.per_model.items()}

        return method.translate(shared, [settings(s) for s in others], settings(base) if base is not None else None)

    clpeft = "passthrough" if method is None else method.clpeft
    input_dtype = _DTYPES.get(data.get("dtype"))
    return MergekitPlan(clpeft, config_path, layout.models, parameters_of, out_dtype, tokenizer_path, config_path, layout, input_dtype)


def _outputs(data: Mapping[str, Any], base_path: Path) -> tuple[str | None, Path]:
    """The output dtype (``out_dtype``, else ``dtype``) and the tokenizer's directory."""
    out_dtype = data.get("out_dtype") or data.get("dtype")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in _DTYPES:
            raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got {data[key]!r}", key=key)
    tokenizer = data.get("tokenizer_source")
    if tokenizer == "union":
        raise UserError("tokenizer_source: union (a merged vocabulary) is not supported; use base or a model", key="tokenizer_source")
    tokenizer_path = base_path if tokenizer in (None, "base") else _model_path(tokenizer, "tokenizer_source")
    return _DTYPES.get(out_dtype), tokenizer_path


def _first(key: str, scopes: Sequence[Mapping[str, Any]], tensor: str, t: float) -> Any:
    """The first value of ``key`` that applies to ``tensor`` (None: none does)."""
    for scope in scopes:
        if key in scope:
            value = _evaluate(scope[key], tensor, t, f"parameters.{key}")
            if value is not None:
                return value
    return None


def _resolve(key: str, default: Any, scopes: Sequence[Mapping[str, Any]], tensor: str, t: float) -> Any:
    value = _first(key, scopes, tensor, t)
    if value is not None:
        return value
    if default is None:
        raise UserError(f"no value of the parameter {key} applies to tensor '{tensor}' (add one without a filter)", key=f"parameters.{key}")
    return default


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
    data: Mapping[str, Any] | None = None,
    **options: Unpack[ShardedOptions],
) -> MergeReport:
    """Run a mergekit YAML into the transformers directory ``out`` (see the module docstring).

    Args:
        config: the YAML file (read with clpeft's safe loader unless ``data`` is given).
        out: the output directory.
        data: the YAML's mapping, when the caller has read it already.
        **options: ``device``, ``seed``, ``shard_size``, ``resume``, ``progress``, ``on_shard``, as in
            :func:`~clpeft.merging.merge_files` (:class:`~clpeft.merging.sharded.ShardedOptions`).

    Returns:
        The merge report (also written as ``clpeft_merge_report.json`` in ``out``).
    """
    from clpeft.config import read_yaml

    unknown = sorted(set(options) - set(ShardedOptions.__annotations__))
    if unknown:  # a typo would otherwise reach merge_files as a method parameter
        raise TypeError(f"run_mergekit() got unexpected keyword arguments: {', '.join(unknown)}")
    config, out = Path(config), Path(out)
    data = read_yaml(config) if data is None else data
    plan = plan_mergekit(data)
    if plan.layout is not None:
        report = merge_slices(plan.layout, out, plan.method, plan.parameters_of, dtype=plan.input_dtype, out_dtype=plan.dtype, **options)
    else:
        first = _first_tensor(plan.base)
        report = merge_files(
            plan.base,
            plan.models,
            out,
            plan.method,
            dtype=plan.dtype,
            tensor_parameters=plan.parameters_of,
            **options,
            **plan.parameters_of(first),
        )
    _copy_config(plan.config_source / "config.json", out / "config.json", plan.dtype, plan.layout)
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


def _copy_config(source: Path, target: Path, dtype: str | None, layout: SliceLayout | None) -> None:
    """The base's config.json with the output dtype and, for slices, the output's layers (:func:`sliced_config`)."""
    if not source.is_file():
        raise UserError(f"the base {source.parent} has no config.json; a transformers directory needs one")
    config = json.loads(source.read_text())
    if layout is not None:
        config = sliced_config(config, layout)
    if dtype is not None:  # transformers 5 reads "dtype", earlier versions "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = dtype
    with atomic_output(target) as f:
        f.write(json.dumps(config, indent=2).encode())
