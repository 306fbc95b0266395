"""The code on docs/adding_a_strategy.md runs: its Python blocks, its YAML config, its example file.

The Python blocks are joined in page order into one script and run in a fresh interpreter from
the repository root (so the page's ``register_strategy`` call does not leak into this process's
registry). The script's own ``assert`` lines check what the page claims (error messages, the
ordering against fine-tuning, the resume round-trip).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import clpeft.config

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "adding_a_strategy.md"
EXAMPLE = REPO / "docs" / "examples" / "replay_lwf.py"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", PAGE.read_text(), flags=re.S | re.M)


def test_the_page_shows_the_example_file_whole():
    assert _blocks("python")[0] == EXAMPLE.read_text()


def test_the_yaml_config_on_the_page_resolves(monkeypatch):
    monkeypatch.chdir(REPO)  # the plug-in path is relative to the repository root, as on the page
    (block,) = _blocks("yaml")
    cfg = clpeft.config.resolve(yaml.safe_load(block))
    assert cfg.strategy.cls.__name__ == "ReplayLwF" and cfg.strategy.params["mem_size"] == 40


def test_the_python_blocks_run_in_order(tmp_path):
    script = tmp_path / "adding_a_strategy.py"
    script.write_text("\n\n".join(_blocks("python")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CLPEFT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
