"""``clpeft reproduce [NAME ...|all] --data-root DIR``: published setups, paper against clpeft.

``configs/published_setups.yaml`` lists every config that mirrors a paper: the number the paper
(or its official code's README) reports, where that number comes from, the official repository
and command, the tests that prove clpeft's components equal to that code, and each known
remaining difference. ``docs/published_setups.md`` is rendered from it (:func:`render_markdown`;
``tests/test_reproduce.py`` keeps the two equal).

Reproducing needs a GPU, the dataset and the pretrained weights. Each setup is checked first;
one that cannot run here is one line saying exactly what is missing (no GPU, weights not in
the local Hugging Face cache while offline, the dataset not under ``--data-root``). The others
run as ordinary run directories under ``--out`` (an interrupted one resumes), and the table
shows paper and clpeft side by side with their difference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from clpeft.config import load as load_config
from clpeft.config import read_yaml
from clpeft.errors import UserError

__all__ = ["Outcome", "PublishedSetup", "load_setups", "render_markdown", "reproduce"]

REGISTRY = "published_setups.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Reported(_Strict):
    """A number to compare with: clpeft's ``metric`` key, its value as a fraction, and its source."""

    metric: str = Field(description="the clpeft metric it corresponds to (acc_last, acc_avg_incremental, error_mean, ...)")
    value: float = Field(ge=0, le=1)
    source: str = Field(description="where the number is printed: a README line or the paper's table, with its address")


class Official(_Strict):
    repository: str
    command: str


class PublishedSetup(_Strict):
    """One config that mirrors a paper's setup."""

    config: str = Field(description="path under configs/, e.g. l2p/cifar100_10t.yaml")
    paper: str
    reported: Reported | None = None
    official: Official
    proven_equal: list[str] = Field(default_factory=list, description="tests comparing clpeft with the official code")
    differences: list[str] = Field(default_factory=list)
    status: str

    @property
    def name(self) -> str:
        return self.config.removesuffix(".yaml")


def configs_dir(explicit: str | Path | None = None) -> Path:
    """``--configs``, else ``configs/`` in the working directory, else beside the clpeft checkout."""
    candidates = [Path(explicit)] if explicit else [Path("configs"), Path(__file__).resolve().parents[1] / "configs"]
    for candidate in candidates:
        if (candidate / REGISTRY).is_file():
            return candidate
    raise UserError(
        f"no {REGISTRY} under {' or '.join(str(c) for c in candidates)}; run clpeft reproduce from a "
        f"clone of the repository or pass --configs DIR"
    )


def load_setups(directory: Path) -> list[PublishedSetup]:
    """The registry, every entry validated and its config present."""
    from pydantic import TypeAdapter, ValidationError

    raw = read_yaml(directory / REGISTRY).get("setups")
    try:
        setups = TypeAdapter(list[PublishedSetup]).validate_python(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"{directory / REGISTRY}: setups.{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    for setup in setups:
        if not (directory / setup.config).is_file():
            raise UserError(f"{directory / REGISTRY}: {setup.name}: no config {directory / setup.config}")
    return setups


@dataclass
class Outcome:
    """What happened to one setup: its clpeft value, or why it could not run here."""

    setup: PublishedSetup
    value: float | None = None
    missing: str | None = None

    @property
    def difference(self) -> float | None:
        reported = self.setup.reported
        return None if self.value is None or reported is None else self.value - reported.value


def _missing_weights(backbone: dict) -> str | None:
    """Why a timm backbone's pretrained weights cannot load here, or None."""
    if backbone.get("name") != "timm" or not backbone.get("pretrained") or backbone.get("weights"):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        return None  # timm downloads them
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(backbone["model"])
    hub = getattr(cfg, "hf_hub_id", None)
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    if hub and any(isinstance(try_to_load_from_cache(hub, f), str) for f in files):
        return None
    return f"weights {backbone['model']} are not in the local Hugging Face cache and HF_HUB_OFFLINE is set"


def reproduce(setups: list[PublishedSetup], directory: Path, data_root: Path, out: Path, device: str = "auto") -> list[Outcome]:
    """Check each setup, run those that can run here, and read off the metric each paper reports."""
    from clpeft.engine import Engine

    outcomes = []
    for setup in setups:
        cfg = load_config(directory / setup.config, [f"scenario.root={data_root}"])
        params = cfg.backbone.params
        missing = None
        if device == "auto" and not torch.cuda.is_available():
            missing = "needs a GPU (none here); --device cpu runs it anyway, slowly"
        missing = missing or _missing_weights({"name": cfg.backbone.name, **params})
        if missing is None:
            run_dir = out / setup.name
            try:
                result = Engine(cfg, run_dir, device=device, resume=(run_dir / "config.yaml").is_file()).run()
            except UserError as exc:  # the dataset is not under --data-root, ...
                missing = str(exc)
            else:
                metric = setup.reported.metric if setup.reported else "acc_last"
                outcomes.append(Outcome(setup, value=result["metrics"].get(metric)))
                continue
        outcomes.append(Outcome(setup, missing=missing))
    return outcomes


def format_outcomes(outcomes: list[Outcome]) -> str:
    """The side-by-side table ``clpeft reproduce`` prints (percent)."""
    lines = ["| setup | metric | paper | clpeft | difference |", "|---|---|---|---|---|"]
    for o in outcomes:
        reported = o.setup.reported
        metric = reported.metric if reported else "acc_last"
        paper = f"{100 * reported.value:.2f}" if reported else "–"
        if o.missing is not None:
            lines.append(f"| {o.setup.name} | {metric} | {paper} | not run: {o.missing} | |")
            continue
        diff = f"{100 * o.difference:+.2f}" if o.difference is not None else "–"
        lines.append(f"| {o.setup.name} | {metric} | {paper} | {100 * o.value:.2f} | {diff} |")
    return "\n".join(lines)


def render_markdown(setups: list[PublishedSetup]) -> str:
    """``docs/published_setups.md``."""
    parts = [
        "# Published setups\n",
        "Every config that mirrors a paper, with the number the paper or its official code reports, the official",
        "command, the tests proving clpeft's components equal to that code (`tests/reference/`, run in CI against",
        "`shared/refs`), and each difference that remains. Generated from `configs/published_setups.yaml`",
        "(`clpeft reproduce --markdown`). `clpeft reproduce NAME --data-root DIR` runs a setup (GPU, data and",
        "weights needed) and prints paper and clpeft side by side; without them it says what is missing.\n",
    ]
    for s in setups:
        reported = f"{s.reported.metric} = {100 * s.reported.value:.2f}% ({s.reported.source})" if s.reported else "not transcribed here"
        parts += [
            f"## `{s.name}`\n",
            f"- **Paper:** {s.paper}",
            f"- **Reported:** {reported}",
            f"- **Official code:** {s.official.repository}: `{s.official.command}`",
            f"- **clpeft:** `clpeft run configs/{s.config}` (or `clpeft reproduce {s.name} --data-root DIR`)",
            "- **Proven equal:** " + (", ".join(f"`{t}`" for t in s.proven_equal) or "none yet"),
            "- **Known differences:**" + ("".join(f"\n  - {d}" for d in s.differences) if s.differences else " none"),
            f"- **Status:** {s.status}\n",
        ]
    return "\n".join(parts)


def select(setups: list[PublishedSetup], names: list[str]) -> list[PublishedSetup]:
    """The setups ``names`` asks for (``all`` or names/prefixes such as ``l2p`` or ``l2p/cifar100_10t``)."""
    if not names or names == ["all"]:
        return setups
    chosen = [s for s in setups if any(s.name == n or s.name.startswith(n.rstrip("/") + "/") for n in names)]
    unknown = [n for n in names if not any(s.name == n or s.name.startswith(n.rstrip("/") + "/") for s in setups)]
    if unknown:
        from clpeft.registry import close_matches

        known = sorted({s.name for s in setups} | {s.name.partition("/")[0] for s in setups})
        raise UserError(f"no published setup {unknown[0]!r}{close_matches(unknown[0], known)}; clpeft reproduce --list shows them")
    return chosen
