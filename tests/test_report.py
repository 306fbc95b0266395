"""``clpeft report``: PNG plots, and a self-contained HTML page whose images load in a browser,
for a class-incremental, a test-time-adaptation and a few-shot class-incremental run.

Independent references: the PNG sizes read with PIL, the forgetting curve worked by hand and
against ``metrics.json``'s ``forgetting``, and Chromium (headless) decoding every embedded image.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from clpeft.cli import main
from clpeft.tools.report import forgetting_curve

DIGITS = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 3, "init_classes": 4},
    "backbone": {"name": "mlp", "hidden": [64]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "logging": {"tensorboard": False, "progress": "never"},
}
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Writes "<complete>:<naturalWidth>x<naturalHeight>" of every <img> into the DOM once the page has loaded.
PROBE = """<script>window.addEventListener('load', function () {
  var out = Array.from(document.images).map(function (im) {
    return im.complete + ':' + im.naturalWidth + 'x' + im.naturalHeight; });
  var p = document.createElement('pre'); p.id = 'probe'; p.textContent = out.join(' ');
  document.body.appendChild(p); });</script>"""
BROKEN_IMAGE = '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">'


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(DIGITS))
    assert main(["run", str(cfg), "--out", str(tmp / "ft")]) == 0
    assert main(["run", str(cfg), "--out", str(tmp / "ms"), "--seeds", "0,1", "--set", "train.lr=0.01"]) == 0
    return tmp


def test_forgetting_curve_by_hand_and_against_the_metric(runs):
    R = [[0.9, 0.0, 0.0], [0.5, 0.8, 0.1], [0.3, 0.6, 0.7]]
    # F_1 = 0.9 - 0.5; F_2 = ((0.9 - 0.3) + (0.8 - 0.6)) / 2
    assert forgetting_curve(R) == pytest.approx([0.4, 0.4])
    run = json.loads((runs / "ft" / "metrics.json").read_text())
    assert forgetting_curve(run["acc_matrix"])[-1] == pytest.approx(run["metrics"]["forgetting"])


def test_single_run_report_writes_plots_in_the_run_directory(runs, capsys):
    assert main(["report", str(runs / "ft")]) == 0
    text = capsys.readouterr().out
    assert "acc_final" in text and "after \\ on" in text
    for name in ("acc_matrix", "acc_seen", "forgetting"):
        with Image.open(runs / "ft" / f"{name}.png") as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert (runs / "ft" / "report.html").is_file()


def test_several_runs_need_an_output_folder(runs, capsys):
    assert main(["report", str(runs / "ft"), str(runs / "ms")]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.skipif(BROWSER is None, reason="no Chromium: apt-get install chromium (Debian package) to run this test")
def test_html_report_renders_with_every_image_loaded(runs, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(runs / "ft"), str(runs / "ms"), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "<link" not in page and 'src="http' not in page
    pngs = {p.name: Image.open(p).size for p in out.glob("*.png")}
    assert set(pngs) == {
        "acc_matrix_ft.png",
        "acc_matrix_ms.png",
        "acc_seen.png",
        "forgetting.png",
        "old_new.png",
        "confusion_ft.png",
        "confusion_ms.png",
        "per_class.png",
    }
    _assert_every_image_decodes(page, pngs, tmp_path)
    # the comparison table holds both runs with their numbers
    ms = [json.loads((runs / "ms" / f"seed_{s}" / "metrics.json").read_text())["metrics"]["acc_final"] for s in (0, 1)]
    assert f"{100 * np.mean(ms):.2f} ± {100 * np.std(ms, ddof=1):.2f}" in page


def _assert_every_image_decodes(page: str, pngs: dict, tmp_path) -> None:
    """Chromium loads ``page``: every plot decodes at its PNG size (and a broken image, added, does not)."""
    probe_page = tmp_path / "probe.html"  # the page as it is, plus one broken image: the probe must tell them apart
    probe_page.write_text(page.replace("</body>", BROKEN_IMAGE + PROBE + "</body>"))
    dom = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe_page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # the probe, not the exit code, says what loaded
    ).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    sizes = [tuple(map(int, item.split(":")[1].split("x"))) for item in found.group(1).split()]
    assert len(sizes) == len(pngs) + 1
    assert sorted(sizes[:-1]) == sorted(pngs.values())  # every plot decoded at its PNG size
    assert sizes[-1] == (0, 0)  # the broken one did not


@pytest.mark.skipif(BROWSER is None, reason="no Chromium: apt-get install chromium (Debian package) to run this test")
def test_tta_and_fscil_reports_render_with_every_image_loaded(tmp_path):
    tta = {
        **DIGITS,
        "backbone": {"name": "cnn", "widths": [8, 16]},
        "strategy": {"name": "tent"},
        "scenario": {
            "name": "test_time_adaptation",
            "dataset": "sklearn_digits",
            "corruptions": ["fog", "contrast"],
            "severity": 3,
            "train_per_class": 16,
            "test_per_class": 8,
        },
    }
    fscil = {
        **DIGITS,
        "scenario": {"name": "few_shot_class_incremental", "dataset": "sklearn_digits", "n_base": 4, "n_way": 3, "k_shot": 5},
    }
    for name, cfg in (("tta", tta), ("fscil", fscil)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
        assert main(["report", str(tmp_path / name)]) == 0
        page = (tmp_path / name / "report.html").read_text()
        pngs = {p.name: Image.open(p).size for p in (tmp_path / name).glob("*.png")}
        expected = {
            "tta": {"domain_errors.png"},
            "fscil": {"acc_matrix.png", "forgetting.png", "sessions.png", "base_novel.png", "confusion.png", "per_class.png"},
        }[name]
        assert set(pngs) == expected
        _assert_every_image_decodes(page, pngs, tmp_path)
        section = {"tta": "Online error per domain (%)", "fscil": "Few-shot sessions (%)"}[name]
        assert f"<h2>{section}</h2>" in page
