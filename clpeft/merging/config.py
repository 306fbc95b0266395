"""The ``clpeft merge`` configuration: a YAML file, flags and ``--set`` overrides.

Example::

    base: checkpoints/vit_base.safetensors
    models: [runs/task_a, runs/task_b, adapters/task_c]   # files, shard indexes or run directories
    method: ties
    parameters: {density: 0.2, scale: 1.0}
    rules: {skip: ["head.*"]}
    out: merged/vit_ties.safetensors
    device: cpu

Relative paths in a YAML file are resolved against the file's directory; paths given as
flags, against the working directory.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clpeft.errors import UserError
from clpeft.merging.rules import MergeRules
from clpeft.registry import close_matches

__all__ = ["MergeConfig", "anchor_paths", "resolve_config"]


class MergeConfig(BaseModel):
    """A validated merge job."""

    model_config = ConfigDict(extra="forbid")

    base: Path = Field(description="the pretrained checkpoint theta_0 the models were fine-tuned from")
    models: list[Path] = Field(min_length=1, description="fine-tuned checkpoints, LoRA adapters or run directories")
    method: str = Field(description="merge method: task_arithmetic, ties, dare, mean")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    out: Path = Field(description="the merged .safetensors file")
    report: Path | None = Field(None, description="JSON merge report (default: <out stem>.report.json)")
    device: str = Field("cpu", description="cpu or cuda")
    seed: int = Field(0, description="seed of random methods (DARE)")
    rules: MergeRules = Field(default_factory=MergeRules, description="tensors to skip or copy from the base")
    progress: Literal["auto", "always", "never"] = Field("auto", description="progress bar on stderr (auto: on a terminal)")


def anchor_paths(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``data`` with its relative paths (base, models, out, report) resolved against ``directory``."""
    data = dict(data)
    for key in ("base", "out", "report"):
        if isinstance(data.get(key), str):
            data[key] = str(directory / data[key])
    if isinstance(data.get("models"), list):
        data["models"] = [str(directory / m) if isinstance(m, str) else m for m in data["models"]]
    return data


def resolve_config(data: dict[str, Any]) -> MergeConfig:
    """Validate a merge configuration; other top-level keys are method parameters.

    ``--set density=0.3`` is thus the same as ``--set parameters.density=0.3``. A key close to
    a config field's name (``modles``) is reported as a misspelling instead.

    Raises:
        UserError: naming the key path of the first problem.
    """
    data = dict(data)
    parameters = dict(data.get("parameters") or {})
    for key in [k for k in data if k not in MergeConfig.model_fields]:
        hint = close_matches(key, MergeConfig.model_fields)
        if hint:  # a misspelled config key rather than a method parameter
            raise UserError(f"unknown key{hint}", key=key)
        parameters[key] = data.pop(key)
    data["parameters"] = parameters
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "missing":
            raise UserError("missing required value (in the YAML file or as a flag)", key=where) from None
        if error["type"] == "extra_forbidden":
            fields = list(MergeRules.model_fields)
            raise UserError(f"unknown key{close_matches(where.split('.')[-1], fields)} (known: {', '.join(fields)})", key=where) from None
        got = reprlib.repr(error.get("input"))  # bounded: a YAML alias can make the value enormous
        raise UserError(f"{error['msg'].lower()}, got {got}", key=where) from None
