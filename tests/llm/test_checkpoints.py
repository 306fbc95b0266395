"""Checkpoints of a generative_lm run hold what training changed, not the pretrained weights: they are
small, resume to the same matrix, and refuse other pretrained weights in one line."""

import shutil

import pytest
import torch
from test_seq_finetune import _config
from tiny_llama import save_tiny_llama

from clpeft.backbones.pretrained_weights import OMITTED_KEY
from clpeft.engine import Engine
from clpeft.errors import UserError


def test_checkpoints_leave_out_the_pretrained_weights_and_resume_exactly(tiny_lm, two_tasks, tmp_path):
    weights = shutil.copytree(tiny_lm, tmp_path / "model")
    cfg = _config([{"jsonl": str(p), "max_new_tokens": 4} for p in two_tasks], weights, epochs=2)
    engine = Engine(cfg, tmp_path / "run", device="cpu")
    result = engine.run()
    backbone = engine.built.strategy.backbone
    pretrained_bytes = sum(t.numel() * t.element_size() for t in backbone.net.state_dict().values() if isinstance(t, torch.Tensor))

    saved = torch.load(tmp_path / "run" / "checkpoints" / "exp_000.pt", weights_only=True)["strategy"]
    assert not any(k.endswith(("base_layer.weight", "embed_tokens.weight", "lm_head.weight")) for k in saved)
    assert saved[f"backbone.{OMITTED_KEY}"]  # each left-out tensor named with its digest
    size = (tmp_path / "run" / "checkpoints" / "exp_000.pt").stat().st_size
    assert size < pretrained_bytes / 2, (size, pretrained_bytes)  # with them it would be larger than they are

    for lost in (tmp_path / "run" / "checkpoints").glob("exp_001.pt*"):  # killed during the second task
        lost.unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    assert Engine(cfg, tmp_path / "run", device="cpu", resume=True).run()["acc_matrix"] == result["acc_matrix"]

    save_tiny_llama(weights, seed=1)  # other pretrained weights at the same path
    for lost in (tmp_path / "run" / "checkpoints").glob("exp_001.pt*"):
        lost.unlink()
    with pytest.raises(UserError, match=r"backbone.weights: the saved state was taken with other pretrained weights \(net\."):
        Engine(cfg, tmp_path / "run", device="cpu", resume=True).run()
