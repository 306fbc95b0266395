"""YAML -> validated, typed run configuration.

The top-level sections are fixed (``seed, seeds, scenario, backbone, strategy, train, eval,
logging, out``); ``seeds`` optionally lists several seeds to repeat the run with. ``scenario``,
``backbone`` and ``strategy`` each carry a ``name`` that picks a class through
:mod:`clpeft.registry`; their other keys are that class's parameters, validated against a
schema generated from its typed ``__init__`` signature (or a pydantic model the class declares
as ``Config``). Schemas are built and checked by :mod:`clpeft.schema`, as merge methods'
parameters are: every mistake becomes one :class:`~clpeft.errors.UserError` line naming the
key path; numbers torch cannot hold (integers beyond 64 bits, non-finite floats, floats beyond
float32) are refused anywhere in the config.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from clpeft import registry
from clpeft.errors import UserError, UserErrors
from clpeft.safe_yaml import MalformedYAML, load_yaml
from clpeft.schema import model_from_signature, validate

SECTIONS = ("seed", "seeds", "scenario", "backbone", "strategy", "train", "eval", "logging", "out")
NAMED_SECTIONS = {"scenario": registry.scenarios, "backbone": registry.backbones, "strategy": registry.strategies}
# Constructor arguments the engine supplies itself; they are not config keys.
INJECTED = {
    "scenario": {"seed"},
    "backbone": {"input_shape"},
    "strategy": {"backbone"},
}


# Numbers a config may hold: integers that fit in 64 bits, finite floats that fit in float32
# (what torch turns them into; beyond these a run would die in torch with a traceback).
INT_RANGE = (-(2**63), 2**63 - 1)
FLOAT_MAX = 3.4e38


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TrainConfig(_Section):
    """How every experience is trained (strategies may add their own keys)."""

    epochs: int = Field(
        1,
        ge=1,
        description="passes over each experience's training data (the defaults are for "
        "quick checks; published configs set the papers' values, and a run with under 10 optimizer "
        "steps in an experience says so)",
    )
    batch_size: int = Field(64, ge=1, description="training mini-batch size")
    lr: float = Field(0.01, gt=0, description="learning rate of the default optimizer")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="optimizer, rebuilt at each experience")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD with Nesterov momentum (CEC's FSCIL training; needs momentum > 0)")
    weight_decay: float = Field(0.0, ge=0, le=1e6, description="L2 weight decay")
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast: auto = on CUDA, off on CPU; bf16 = required (CUDA only)"
    )
    compile: bool = Field(False, description="torch.compile the backbone (CUDA only)")
    num_workers: int = Field(0, ge=0, description="DataLoader workers for datasets decoded from files")
    drop_last: bool = Field(
        False, description="skip each epoch's last, smaller batch (as the official loaders of CODA-Prompt and PILOT's coda_prompt do)"
    )
    feature_cache: Literal["disk", "memory", "off"] = Field(
        "disk", description="cache frozen-backbone features: on disk (shared by runs), in memory, or off"
    )
    clip_grad: float | None = Field(None, gt=0, description="clip the gradients' global L2 norm to this before each step (None: off)")
    schedule: Literal["constant", "cosine", "cosine_epoch", "quarter_cosine", "multistep"] = Field(
        "constant",
        description="learning rate within each experience: constant, cosine decay to 0 over its steps, cosine_epoch "
        "(cosine to min_lr stepped once per epoch, LAMDA-PILOT's CosineAnnealingLR), "
        "quarter_cosine (per epoch e: x cos(99 pi max(e - 1, 0) / (200 (epochs - 1))), CODA-Prompt's and "
        "InfLoRA's official schedule), or "
        "multistep (x gamma at each of milestones)",
    )
    milestones: list[int] = Field([], description="multistep: epochs (0-based) from which the lr is multiplied by gamma once more")
    augment: str | list[dict[str, Any]] = Field(
        "none",
        description="training-time augmentation of raw images: none, crop_flip (L2P, DualPrompt, PILOT), crop_flip_coda "
        "(CODA-Prompt), crop_flip_jitter (SLCA), or a list of torchvision.transforms.v2 steps such as "
        "[{name: RandomCrop, size: 32, padding: 4}, {name: RandomHorizontalFlip}] (size: auto = the backbone's input "
        "size); training batches then skip the feature cache",
    )
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: factor applied at each milestone")
    min_lr: float = Field(0.0, ge=0, description="cosine_epoch: the learning rate the cosine ends at (eta_min)")
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="under torchrun with several ranks: none = DistributedDataParallel (every rank holds the whole model); "
        "fsdp = a generative_lm backbone's parameters, gradients and optimizer state sharded across the ranks from the "
        "build on (FSDP2, per decoder layer); evaluation and generation run sharded in lockstep, checkpoints read each "
        "rank's host copy of the whole weights; seq_finetune, replay and joint, with eval.baseline: false (clpeft.fsdp)",
    )

    @field_validator("lr")
    @classmethod
    def _lr_fits_float32(cls, value: float) -> float:
        if value > 1e30:
            raise ValueError("at most 1e30 (a larger step overflows float32 in the optimizer)")
        return value

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("momentum", 0.9) == 0:
            raise ValueError("Nesterov momentum needs train.momentum > 0")
        return value

    @field_validator("milestones")
    @classmethod
    def _milestones_fit(cls, value: list[int], info: ValidationInfo) -> list[int]:
        epochs = info.data.get("epochs", 1)
        if info.data.get("schedule") == "multistep" and not value:
            raise ValueError("empty with schedule multistep; list the epochs at which the lr drops, e.g. [18]")
        if value and (sorted(set(value)) != value or value[0] < 1 or value[-1] >= epochs):
            raise ValueError(f"must increase strictly within 1..{epochs - 1} (train.epochs - 1)")
        return value

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_known(cls, value):
        from clpeft.augment import check_augment  # torchvision loads only when a config names augmentation

        value = "none" if value is False or value is None else value
        if isinstance(value, (str, list)):
            check_augment(value)
        return value

    @field_validator("amp", "feature_cache", mode="before")
    @classmethod
    def _yaml_off(cls, value, info: ValidationInfo):
        # YAML 1.1 reads a bare `off` as False and `on` as True.
        if value is False:
            return "off"
        if value is True:
            if info.field_name == "amp":
                return "auto"
            raise ValueError("YAML reads on/yes/true as a boolean; write disk, memory or off")
        return value


class EvalConfig(_Section):
    """How the accuracy matrix is measured."""

    batch_size: int = Field(256, ge=1, description="evaluation batch size")
    baseline: bool = Field(True, description="evaluate the untrained model first (needed for FWT)")


class WandbConfig(_Section):
    """A Weights & Biases run fed with the run's events (needs the ``wandb`` extra)."""

    project: str = Field(description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user (default: yours)")
    name: str | None = Field(None, description="the run's name (default: the run directory's name)")
    tags: list[str] = Field([], description="tags of the run")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="offline writes under <out>/wandb for `wandb sync` later")


class LoggingConfig(_Section):
    """Where and how a run reports."""

    tensorboard: bool = Field(True, description="write TensorBoard event files to <out>/tb")
    progress: Literal["auto", "always", "never"] = Field("auto", description="progress bars; auto = only when stderr is a terminal")
    keep_checkpoints: int = Field(2, ge=1, description="how many per-experience checkpoints to keep")
    wandb: WandbConfig | None = Field(None, description="also log to Weights & Biases: {project: ..., mode: offline}")
    export: list[Literal["adapters", "merged"]] = Field(
        [],
        description="generative_lm runs: adapters = after each task k, <out>/adapters/task_<k>/, a peft adapter directory of the "
        "whole LoRA update so far (PeftModel.from_pretrained(base, dir); a few MB); merged = at the end, <out>/merged/, the final "
        "model with its LoRA folded in and the tokenizer (AutoModelForCausalLM / AutoTokenizer.from_pretrained(dir); a full copy "
        "of the model, hence off by default)",
    )


_FIXED = {"train": TrainConfig, "eval": EvalConfig, "logging": LoggingConfig}


@dataclass
class ComponentSpec:
    """A resolved ``scenario``/``backbone``/``strategy`` section."""

    name: str
    cls: type
    params: dict[str, Any]

    def build(self, **injected):
        """The configured object; ``injected`` are the arguments the engine supplies (:data:`INJECTED`)."""
        return self.cls(**injected, **self.params)


@dataclass
class RunConfig:
    """A fully validated run configuration."""

    seed: int
    scenario: ComponentSpec
    backbone: ComponentSpec
    strategy: ComponentSpec
    train: TrainConfig
    eval: EvalConfig
    logging: LoggingConfig
    out: str | None = None
    seeds: list[int] | None = None
    source: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """The resolved config, every default filled in, as plain YAML-able data."""
        d: dict[str, Any] = {"seed": self.seed, "seeds": None if self.seeds is None else list(self.seeds)}
        for name in NAMED_SECTIONS:
            spec: ComponentSpec = getattr(self, name)
            d[name] = {"name": spec.name, **_plain(spec.params)}
        for name in _FIXED:
            d[name] = getattr(self, name).model_dump()
        d["out"] = self.out
        return d


def _plain(value):
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- schemas


def schema_of(cls: type, section: str) -> type[BaseModel]:
    """The pydantic model of a registered class's parameters.

    A class may declare ``Config`` (a pydantic model); otherwise the schema is generated from
    the typed signature of ``__init__`` (:func:`clpeft.schema.model_from_signature`: options
    blocks of :func:`~clpeft.schema.flat_options` as flat keys, built so their rules apply),
    skipping the engine-injected arguments and ``**kwargs``. Parameters without a default are
    required.
    """
    declared = getattr(cls, "Config", None)
    if isinstance(declared, type) and issubclass(declared, BaseModel):
        return declared
    cached = cls.__dict__.get("_clpeft_schema")
    if cached is not None:
        return cached
    this = next(iter(inspect.signature(cls.__init__).parameters))  # ``self``
    model = model_from_signature(f"{cls.__name__}Config", cls.__init__, skip={this, *INJECTED[section]})
    cls._clpeft_schema = model
    return model


def close(name: str, options) -> str:
    return registry.close_matches(name, options)


# ----------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; every problem with the file is one :class:`UserError` naming it.

    Malformed YAML is reported with its line and column; duplicate keys, alias bombs and
    self-referring anchors are refused (:mod:`clpeft.safe_yaml`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    data = load_yaml(read_text(path, "a YAML config"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a binary or otherwise encoded file is a one-line error."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); is it {what}?") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``0.1``, ``true``, ``[1,2]``)."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key.sub=value, got '{item}'")
        try:
            value = load_yaml(raw, f"--set {key}")
        except MalformedYAML:  # not YAML: the text itself
            value = raw
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or an empty section (`train:`)
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def resolve(data: dict, *, source: Path | None = None, switched: dict[str, str] | None = None) -> RunConfig:
    """Validate a config mapping into a :class:`RunConfig`.

    Every section is checked even after one fails, so one call reports every mistake
    (:class:`~clpeft.errors.UserErrors`). ``switched`` maps a section whose ``name`` an override
    changed to its name before: keys of that old class which the new one lacks are dropped, with
    a notice on stderr, instead of being reported as unknown.

    Raises:
        UserError: the config's mistakes, all of them.
    """
    errors: list[UserError] = []
    unknown = [k for k in data if k not in SECTIONS]
    for key in unknown:
        errors.append(UserError(f"{key}: unknown section{close(key, SECTIONS)}; sections are {', '.join(SECTIONS)}"))
    _check_numbers(data, "")
    seed, seeds = data.get("seed", 0), None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= INT_RANGE[1]:
        errors.append(UserError(f"seed: expected an integer from 0 to 2**63 - 1, got {seed!r}"))
    try:
        seeds = _check_seeds(data.get("seeds"))
    except UserError as exc:
        errors.append(exc)
    base_dir = source.parent if source else None
    specs, fixed = {}, {}
    for section, reg in NAMED_SECTIONS.items():
        try:
            specs[section] = _named_section(section, reg, data.get(section), base_dir, (switched or {}).get(section))
        except UserError as exc:
            errors.append(exc)
    for section, model in _FIXED.items():
        raw = data.get(section) or {}
        try:
            if not isinstance(raw, dict):
                raise UserError(f"{section}: expected a mapping, got {raw!r}")
            fixed[section] = validate(model, raw, section)
        except UserError as exc:
            errors.append(exc)
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        errors.append(UserError(f"out: expected a directory path, got {out!r}"))
    if errors:
        raise UserErrors.of(errors)
    return RunConfig(seed=seed, seeds=seeds, out=out, source=source, **specs, **fixed)


def _named_section(section: str, reg, raw, base_dir: Path | None, switched_from: str | None) -> ComponentSpec:
    """One ``scenario``/``backbone``/``strategy`` section: its class, its validated parameters, its checks."""
    if raw is None:
        raise UserError(f"{section}: missing section (it needs at least 'name')")
    if not isinstance(raw, dict):
        raise UserError(f"{section}: expected a mapping with 'name', got {raw!r}")
    params = dict(raw)
    if "name" not in params:
        raise UserError(f"{section}.name: missing required value")
    name = params.pop("name")
    cls = reg.get(name, key=f"{section}.name", base_dir=base_dir)
    schema = schema_of(cls, section)
    if switched_from is not None:
        params = _drop_keys_of(switched_from, reg, schema, params, section, base_dir)
    spec = ComponentSpec(name, cls, dict(validate(schema, params, section)))
    check = getattr(cls, "check_config", None)
    if callable(check):
        check(spec.params)
    return spec


def _drop_keys_of(old_name: str, reg, schema: type[BaseModel], params: dict, section: str, base_dir: Path | None) -> dict:
    """``params`` without the keys that belong to ``old_name``'s class and not to ``schema`` (a notice each)."""
    try:
        old_fields = schema_of(reg.get(old_name, key=f"{section}.name", base_dir=base_dir), section).model_fields
    except UserError:
        return params
    dropped = [k for k in params if k in old_fields and k not in schema.model_fields]
    if dropped:
        print(
            f"clpeft: note: {section}.name changed from {old_name}: dropped its keys {', '.join(dropped)} "
            f"(set the whole section to keep control: --set '{section}={{name: ...}}')",
            file=sys.stderr,
        )
    return {k: v for k, v in params.items() if k not in dropped}


def _check_numbers(value, path: str) -> None:
    """Reject, anywhere in the config, integers beyond 64 bits and non-finite or huge floats."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_numbers(v, f"{path}[{i}]")
    elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT_MAX):
        raise UserError(f"{path}: expected a finite number of magnitude at most {FLOAT_MAX:g}, got {value!r}")
    elif isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise UserError(f"{path}: {value} does not fit in a 64-bit integer")


def _check_seeds(seeds) -> list[int] | None:
    """``seeds``: absent/null, or a non-empty list of distinct non-negative integers."""
    if seeds is None:
        return None
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"seeds: expected a non-empty list of integers such as [0, 1, 2], got {seeds!r}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= INT_RANGE[1]:
            raise UserError(f"seeds[{i}]: expected an integer from 0 to 2**63 - 1, got {s!r}")
    duplicate = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if duplicate is not None:
        raise UserError(f"seeds: {duplicate} appears more than once; list each seed once")
    return list(seeds)


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config file.

    An override that changes a section's ``name`` (``--set strategy.name=finetune`` on a replay
    config) drops the old class's keys the new one lacks, with a notice (see :func:`resolve`).
    """
    path = Path(path)
    data = read_yaml(path)
    before = {s: data[s].get("name") for s in NAMED_SECTIONS if isinstance(data.get(s), dict)}
    data = apply_overrides(data, overrides or [])
    switched = {
        s: old
        for s, old in before.items()
        if isinstance(data.get(s), dict) and data[s].get("name") != old and any(o.strip().startswith(f"{s}.name=") for o in overrides or [])
    }
    return resolve(data, source=path, switched=switched)
