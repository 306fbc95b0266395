"""What produced a run's numbers: versions, code commits, device and threads (``metrics.json``).

A number can only be trusted, or reproduced, with the software and machine that gave it. The
record holds the versions of clpeft and of the libraries that change results (read from the
installed packages' metadata, without importing them), the git commit of the working directory
(the experiment's own repository, usually) and of clpeft's source when it is a checkout, each
with a ``dirty`` flag for uncommitted changes, and the device and CPU threads the run used.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["provenance"]

PACKAGES = ("clpeft", "torch", "torchvision", "timm", "transformers", "numpy", "scikit-learn", "avalanche-lib", "peft")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(directory: Path) -> dict | None:
    """``{"commit", "dirty", "root"}`` of the repository holding ``directory``; None outside one."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        root = git("rev-parse", "--show-toplevel")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "root": root}
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: torch.device) -> dict:
    """The record written under ``"provenance"`` in ``metrics.json``."""
    repos = {"working_directory": _git(Path.cwd()), "clpeft": _git(Path(__file__).resolve().parent)}
    if repos["clpeft"] and repos["working_directory"] and repos["clpeft"]["root"] == repos["working_directory"]["root"]:
        repos["clpeft"] = None  # one repository: said once
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "git": {k: v for k, v in repos.items() if v is not None},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
