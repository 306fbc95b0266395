"""README.md stays true: its YAML reference is current and its plug-in example runs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from clpeft import config
from clpeft.docs import config_reference
from clpeft.engine import Engine

README = Path(__file__).resolve().parents[1] / "README.md"


def _between(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README.read_text(), re.S)
    assert match, f"README.md lost its {name} markers"
    return match.group(1)


def test_yaml_reference_matches_the_schemas():
    assert _between("config-reference") == config_reference(), "regenerate with: clpeft list --markdown"


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


def test_reference_types_read_as_written_in_yaml():
    """Bounds of nested types stay readable (no pydantic reprs): lists of bounded numbers, pairs, models."""
    from typing import Annotated

    from pydantic import BaseModel, Field

    from clpeft.docs import _type_name

    class Domain(BaseModel):
        name: str = ""

    positive = Annotated[float, Field(gt=0, le=1)]
    assert _type_name(list[Annotated[int, Field(ge=0)]]) == "list[int >= 0]"
    assert _type_name(positive | tuple[positive, positive]) == "float > 0 <= 1 \\| [float > 0 <= 1, float > 0 <= 1]"
    assert _type_name(list[Domain] | None) == "list[Domain] \\| None"
    assert _type_name(dict[str, int]) == "dict[str, int]"
