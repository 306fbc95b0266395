"""The engine's test-time-adaptation loop: labels stay with the scorer, resets, exact resume,
source checkpoints; and out-of-memory errors that name the batch size."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from clpeft import Strategy, checkpoint, config
from clpeft.data import DataView
from clpeft.engine import Engine
from clpeft.errors import RunError, UserError
from clpeft.experience import Experience, Scenario
from clpeft.run import OnlineScorer
from clpeft.scenarios import corruptions
from clpeft.scenarios.datasets import load_dataset

MODULE = "engine_tta_plugins"


class LabelLeak(AssertionError):
    """Labels of a test-time stream were read by something other than the engine's scorer."""


def _scorer_is_reading() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is OnlineScorer.__init__.__code__:
            return True
        frame = frame.f_back
    return False


class _PoisonedLabels:
    """What the sentinel's ``gather`` returns beside the inputs: any use raises."""

    def __getattr__(self, name):
        raise LabelLeak(f"labels used ({name}) outside the scorer")

    def __len__(self):
        raise LabelLeak("labels used outside the scorer")

    def __iter__(self):
        raise LabelLeak("labels used outside the scorer")


class SentinelDataset(torch.utils.data.Dataset):
    """Corrupted images whose labels only :class:`OnlineScorer` may read."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, name: str):
        self.inputs, self._labels, self.name = inputs, labels, name
        self.reads = 0

    @property
    def targets(self) -> torch.Tensor:
        if not _scorer_is_reading():
            raise LabelLeak(f"{self.name}: labels read outside the scorer")
        self.reads += 1
        return self._labels

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        raise LabelLeak("item access returns labels")

    def gather(self, indices):
        return self.inputs.index_select(0, indices), _PoisonedLabels()

    @property
    def fingerprint(self):
        return self.name


class SentinelStream(Scenario):
    """Clean digits as the source, then two noisy domains whose labels are sentinels."""

    kind = "test_time_adaptation"
    domains: list[SentinelDataset] = []

    def __init__(self, seed: int):
        self.seed = seed
        self.reset_each_domain = False
        self.source_checkpoint = None

    def experiences(self):
        train, test = load_dataset("sklearn_digits", "~/.cache/clpeft/data")
        self.source, self.class_names, self.input_shape = DataView.of(train), train.class_names, (1, 8, 8)
        SentinelStream.domains = [
            SentinelDataset(corruptions.corrupt(test.inputs, name, 5, 0, torch.arange(len(test))), test.targets.clone(), name)
            for name in ("gaussian_noise", "contrast")
        ]
        all_classes = list(range(10))
        return self.link(
            [Experience(i + 1, None, DataView.of(ds), [], all_classes, domain=ds.name) for i, ds in enumerate(SentinelStream.domains)]
        )


def _probe_labels(exp: Experience) -> None:
    for e in (exp, *exp.past):
        for view in (e.test,):
            if view is not None:
                _ = view.targets  # a sentinel raises LabelLeak here


class NosyAdapter(Strategy):
    """Adapts every parameter by one SGD step of prediction entropy on a randomly jittered batch,
    records what it sees, and tries to read labels from everything it is handed."""

    supported_scenarios = ("test_time_adaptation",)
    cache_features = False
    record: dict = {}

    def __init__(self, backbone, lr: float = 0.05, kill_at: list[int] | None = None):
        super().__init__(backbone)
        self.lr, self.kill_at = lr, kill_at
        self.domain, self.batch = 0, 0
        NosyAdapter.record = {"states": [], "predictions": [], "inputs": []}

    def before_experience(self, exp):
        super().before_experience(exp)
        _probe_labels(exp)
        self.domain, self.batch = exp.index, 0
        if exp.train is None:
            NosyAdapter.record["states"].append({k: v.clone() for k, v in self.state_dict().items()})

    def adapt(self, *args, **kwargs):
        assert len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)  # inputs only
        x = args[0]
        self.batch += 1
        if self.kill_at == [self.domain, self.batch]:
            raise KeyboardInterrupt("killed")
        assert torch.is_grad_enabled()
        jittered = x.float() + torch.rand(x.shape) * 8
        logits = self.predict(jittered)
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p -= self.lr * g
        NosyAdapter.record["predictions"].append(logits.argmax(1))
        NosyAdapter.record["inputs"].append(x.clone())
        return logits.detach()


@pytest.fixture
def tta_run(digits_run, monkeypatch):
    monkeypatch.setitem(sys.modules, MODULE, sys.modules[__name__])
    digits_run["scenario"] = {
        "name": "test_time_adaptation",
        "dataset": "sklearn_digits",
        "test_per_class": 20,
        "corruptions": ["gaussian_noise", "fog", "contrast"],
        "severity": 5,
    }
    digits_run["strategy"] = {"name": f"{MODULE}:NosyAdapter"}
    digits_run["train"].update(epochs=2, batch_size=32)
    return digits_run


def _run(cfg, out, **kw):
    return Engine(config.resolve(cfg), out, device="cpu", **kw).run()


def test_labels_never_reach_the_strategy_and_the_scorer_counts_its_predictions(tmp_path, tta_run):
    tta_run["scenario"] = {"name": f"{MODULE}:SentinelStream"}
    result = _run(tta_run, tmp_path / "run")
    domains = SentinelStream.domains
    assert [d.reads for d in domains] == [1, 1]  # the scorer read each domain's labels once
    with pytest.raises(LabelLeak):
        _ = domains[0].targets  # and anyone else is refused
    with pytest.raises(LabelLeak):
        len(domains[0].gather(torch.tensor([0]))[1])
    # the strategy saw every test input once, in order, unlabeled
    seen = torch.cat(NosyAdapter.record["inputs"])
    assert torch.equal(seen, torch.cat([d.inputs for d in domains]))
    # errors: the strategy's own online predictions against the true labels, computed here
    predictions = torch.cat(NosyAdapter.record["predictions"]).split([len(d) for d in domains])
    expected = [int((p != d._labels).sum()) / len(d) for p, d in zip(predictions, domains)]
    assert result["metrics"]["error_per_domain"] == pytest.approx(expected, abs=1e-12)
    assert result["metrics"]["error_mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert result["domains"] == ["gaussian_noise", "contrast"]
    assert result["acc_matrix"] == [[pytest.approx(1 - e, abs=1e-12) for e in expected]]
    assert result["test_sizes"] == [540, 540]


def _state(path):
    return checkpoint.load_latest(path)[1]["strategy"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("reset", [True, False])
def test_reset_each_domain_restores_the_source_weights_bitwise(tmp_path, tta_run, reset):
    tta_run["scenario"]["reset_each_domain"] = reset
    result = _run(tta_run, tmp_path / "run")
    source = _state(tmp_path / "run" / "source")
    states = NosyAdapter.record["states"]
    assert len(states) == 3 and _equal(states[0], source)
    assert all(_equal(s, source) for s in states[1:]) == reset  # continual adaptation carries on instead
    final = _state(tmp_path / "run" / "checkpoints")
    assert not _equal(final, source)  # it did adapt within the domain
    assert len(result["metrics"]["error_per_domain"]) == 3


@pytest.mark.parametrize("kill_at", [[2, 3], [1, 1]], ids=["mid-second-domain", "first-batch-after-source"])
def test_a_killed_tta_run_resumes_to_the_same_result(tmp_path, tta_run, kill_at):
    reference = _run(tta_run, tmp_path / "ref")
    tta_run["strategy"]["kill_at"] = kill_at
    with pytest.raises(KeyboardInterrupt):
        _run(tta_run, tmp_path / "killed")
    assert not (tmp_path / "killed" / "metrics.json").exists()
    tta_run["strategy"]["kill_at"] = None
    resumed = _run(tta_run, tmp_path / "killed", resume=True, force=True)
    for key in ("acc_matrix", "metrics", "test_sizes", "domains"):
        assert resumed[key] == reference[key]
    from safetensors.torch import load_file

    assert _equal(load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors"))
    events = (tmp_path / "killed" / "events.jsonl").read_text()
    assert ('"event": "resumed"' in events) == (kill_at[0] > 1) and events.count('"event": "source_trained"') == 1


def test_a_source_checkpoint_from_another_run_is_the_source_model(tmp_path, tta_run, digits_run):
    source_run = {
        **digits_run,
        "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 1},
        "strategy": {"name": "finetune"},
    }
    _run(source_run, tmp_path / "clean")
    tta_run["scenario"]["source_checkpoint"] = str(tmp_path / "clean")
    _run(tta_run, tmp_path / "tta")
    assert _equal(NosyAdapter.record["states"][0], _state(tmp_path / "clean" / "checkpoints"))
    assert _equal(_state(tmp_path / "tta" / "source"), _state(tmp_path / "clean" / "checkpoints"))
    assert '"event": "source_trained"' not in (tmp_path / "tta" / "events.jsonl").read_text()

    tta_run["scenario"]["source_checkpoint"] = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="scenario.source_checkpoint: .*nowhere not found"):
        _run(tta_run, tmp_path / "missing")
    tta_run["backbone"]["hidden"] = [32]
    tta_run["scenario"]["source_checkpoint"] = str(tmp_path / "clean")
    with pytest.raises(
        UserError,
        match=r"scenario.source_checkpoint: it does not fit this backbone \(size mismatch for "
        r"backbone.net.0.weight",
    ):
        _run(tta_run, tmp_path / "other_backbone")


# ----------------------------------------------------------------------------- out of memory


def _out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_training_names_the_training_batch_size(tmp_path, digits_run, monkeypatch):
    digits_run["scenario"]["n_experiences"] = 1
    monkeypatch.setattr(Strategy, "training_step", _out_of_memory)
    digits_run["eval"] = {"baseline": False}
    with pytest.raises(
        RunError,
        match=r"CUDA out of memory while training on experience 0 with train.batch_size=32; "
        r"lower train.batch_size \(e.g. --set train.batch_size=16\)",
    ):
        _run(digits_run, tmp_path / "run")


def test_out_of_memory_in_evaluation_names_the_evaluation_batch_size(tmp_path, digits_run, monkeypatch):
    digits_run["scenario"]["n_experiences"] = 1
    monkeypatch.setattr(Strategy, "predict", _out_of_memory)
    with pytest.raises(
        RunError,
        match=r"while evaluating with eval.batch_size=256; lower eval.batch_size \(e.g. --set "
        r"eval.batch_size=128\)",
    ):
        _run(digits_run, tmp_path / "run")


def test_out_of_memory_in_adaptation_names_the_batch_size(tmp_path, tta_run, monkeypatch):
    monkeypatch.setattr(NosyAdapter, "adapt", _out_of_memory)
    with pytest.raises(RunError, match=r"while adapting to domain 1 \(gaussian_noise@5\) with train.batch_size=32"):
        _run(tta_run, tmp_path / "run")


def test_the_cli_prints_the_online_error_of_every_domain(tmp_path, tta_run, capsys):
    import yaml

    from clpeft.cli import main

    tta_run["strategy"] = {"name": "source"}
    path = tmp_path / "tta.yaml"
    path.write_text(yaml.safe_dump(tta_run))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for domain, error in zip(result["domains"], result["metrics"]["error_per_domain"]):
        assert f"{domain}  {error:.4f}" in printed
    assert f"mean  {result['metrics']['error_mean']:.4f}" in printed
    assert "accuracy matrix" not in printed


def test_eata_weighs_a_loaded_source_model_on_the_clean_source_data(tmp_path, tta_run):
    """With ``source_checkpoint`` the scenario still hands the clean training data to the source
    experience, so EATA's Fisher regulariser (Niu et al. 2022, eq. 9) works on a loaded model too,
    and both runs score the same test samples."""
    tta_run["backbone"] = {"name": "cnn", "widths": [8, 16]}
    tta_run["strategy"] = {"name": "source"}
    trained = _run(tta_run, tmp_path / "source")
    tta_run["scenario"]["source_checkpoint"] = str(tmp_path / "source")
    loaded = _run(tta_run, tmp_path / "loaded")
    assert loaded["metrics"]["error_per_domain"] == trained["metrics"]["error_per_domain"]
    tta_run["strategy"] = {"name": "eata", "fisher_alpha": 1.0}
    result = _run(tta_run, tmp_path / "eata")
    assert result["test_sizes"] == trained["test_sizes"] and len(result["metrics"]["error_per_domain"]) == 3
