"""README.md stays true: it links the YAML reference, and its plug-in and merging examples run."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from clpeft import config
from clpeft.engine import Engine

README = Path(__file__).resolve().parents[1] / "README.md"


def _between(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README.read_text(), re.S)
    assert match, f"README.md lost its {name} markers"
    return match.group(1)


def test_the_yaml_reference_is_linked():
    assert "](docs/config_reference.md)" in README.read_text()
    assert (README.parent / "docs" / "config_reference.md").is_file()


def test_plugin_example_runs_from_a_file_path_and_beats_finetune(tmp_path, monkeypatch, digits_run):
    code = re.search(r"```python\n(.*?)```", _between("plugin-example"), re.S).group(1)
    (tmp_path / "my_method.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    digits_run["backbone"]["freeze"] = True  # the head-bias effect the example fixes, on cached features
    digits_run["train"]["epochs"] = 5
    base = Engine(config.resolve(digits_run), tmp_path / "finetune", device="cpu").run()["metrics"]
    digits_run["strategy"] = {"name": "my_method.py:MaskedFinetune", "label_smoothing": 0.1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(digits_run))
    cfg = config.load(tmp_path / "run.yaml")
    assert cfg.strategy.cls.__name__ == "MaskedFinetune" and cfg.strategy.params == {"label_smoothing": 0.1}
    masked = Engine(cfg, tmp_path / "masked", device="cpu").run()["metrics"]
    # Masking old-class logits removes the head's bias towards the newest classes.
    assert masked["acc_last"] > base["acc_last"] + 0.2


def test_merging_example_runs_on_real_files(tmp_path, monkeypatch):
    import json

    import torch
    from safetensors.torch import save_file

    code = re.search(r"```python\n(.*?)```", _between("merge-example"), re.S).group(1)
    generator = torch.Generator().manual_seed(0)
    base = {"blocks.0.weight": torch.randn(8, 4, generator=generator), "head.weight": torch.randn(3, 4, generator=generator)}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(2)]
    for name, state in [("base", base), ("a", tuned[0]), ("b", tuned[1])]:
        save_file(state, tmp_path / f"{name}.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace = {"base": base, "finetuned_a": tuned[0], "finetuned_b": tuned[1]}
    exec(code, namespace)

    assert namespace["merged"].keys() == base.keys()
    from clpeft.merging import merge

    again = merge(base, tuned, "ties", density=0.2, scale=1.5)  # what out= received: the second merge's result
    assert all(torch.equal(namespace["merged"][name], again[name]) for name in base)
    report = json.loads((tmp_path / "merged.report.json").read_text())
    assert [t["name"] for t in report["tensors"]] == ["blocks.0.weight"]  # the head is skipped
    expected = base["blocks.0.weight"] + 0.3 * sum(t["blocks.0.weight"] - base["blocks.0.weight"] for t in tuned)
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(tmp_path / "merged.safetensors")["blocks.0.weight"], expected, rtol=0, atol=1e-6)
