"""``clpeft merge``: YAML, flags, --set, and one-line errors with exit status 2."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clpeft.errors import UserError
from clpeft.merging import merge
from clpeft.tools import merge_cli as cli


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return cli.run(parser.parse_args(list(argv)))


def test_yaml_config_with_relative_paths(tmp_path, models, model_files, monkeypatch, capsys):
    base, finetuned = models
    config = {
        "base": "base.safetensors",
        "models": [p.name for p in model_files[1]],
        "method": "ties",
        "parameters": {"density": 0.3},
        "rules": {"skip": ["head.*"]},
        "out": "merged/out.safetensors",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path.parent)  # paths in the file are relative to the file, not to the working directory
    assert run(str(tmp_path / "merge.yaml"), "--set", "scale=0.5") == 0
    assert "merged 3 models with ties" in capsys.readouterr().out
    merged = load_file(tmp_path / "merged" / "out.safetensors")
    expected = merge(base, finetuned, "ties", density=0.3, scale=0.5, rules={"skip": ["head.*"]})
    assert merged.keys() == expected.keys() and "head.weight" not in merged
    assert all(torch.equal(merged[n], expected[n]) for n in expected)
    assert (tmp_path / "merged" / "out.report.json").is_file()


def test_flags_only(tmp_path, models, model_files):
    base, finetuned = models
    base_path, paths = model_files
    out = tmp_path / "flags.safetensors"
    assert (
        run(
            "--base",
            str(base_path),
            "--models",
            *map(str, paths),
            "--method",
            "task_arithmetic",
            "--out",
            str(out),
            "--set",
            "parameters.scale=0.3",
        )
        == 0
    )
    expected = merge(base, finetuned, "task_arithmetic", scale=0.3)
    assert all(torch.equal(t, expected[n]) for n, t in load_file(out).items())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "tiez"], "method: unknown merge method 'tiez'; did you mean 'ties'"),
        (["--set", "densty=0.2"], "parameters.densty: unknown parameter"),
        (["--set", "modles=[a]"], "modles: unknown key; did you mean 'models'"),
        (["--set", "rules.skp=[x]"], "rules.skp: unknown key; did you mean 'skip'"),
        (["--set", "density=2"], "parameters.density: input should be less than or equal to 1"),
    ],
)
def test_mistakes_are_user_errors(tmp_path, model_files, extra, message):
    base_path, paths = model_files
    args = [
        "--base",
        str(base_path),
        "--models",
        *map(str, paths),
        "--method",
        "ties",
        "--out",
        str(tmp_path / "o.safetensors"),
    ]
    with pytest.raises(UserError, match=message):
        run(*args, *extra)
    with pytest.raises(UserError, match="out: missing required value"):
        run("--base", str(base_path), "--models", str(paths[0]), "--method", "ties")
    assert not (tmp_path / "o.safetensors").exists()


def test_main_cli_prints_one_line_and_exits_2(tmp_path, model_files, capsys):
    main = pytest.importorskip("clpeft.cli").main
    base_path, paths = model_files
    status = main(
        [
            "merge",
            "--base",
            str(base_path),
            "--models",
            str(paths[0]),
            "--method",
            "ties",
            "--out",
            str(tmp_path / "o.safetensors"),
            "--set",
            "density=-1",
        ]
    )
    assert status == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_clpeft_list_names_every_merge_method_with_its_description(capsys):
    from clpeft.cli import main
    from clpeft.merging.registry import list_methods

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    section = out.split("merge methods", 1)[1].split("offline weights", 1)[0]
    listed = {line.split()[0]: line.split(None, 1)[1] for line in section.splitlines()[1:] if line.strip()}
    assert listed == {m.name: m.description for m in list_methods()}
