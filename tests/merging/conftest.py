"""Tiny checkpoints for the merging tests: a ViT-shaped state dict and K fine-tunes of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

WIDTH = 16


def tiny_vit(generator: torch.Generator, classes: int = 10) -> dict[str, torch.Tensor]:
    """A 2-block ViT-shaped state dict (width 16), with an integer buffer and a head."""
    shapes = {
        "cls_token": (1, 1, WIDTH),
        "pos_embed": (1, 5, WIDTH),
        "patch_embed.proj.weight": (WIDTH, 3, 4, 4),
        "patch_embed.proj.bias": (WIDTH,),
    }
    for i in range(2):
        shapes |= {
            f"blocks.{i}.norm1.weight": (WIDTH,),
            f"blocks.{i}.attn.qkv.weight": (3 * WIDTH, WIDTH),
            f"blocks.{i}.attn.qkv.bias": (3 * WIDTH,),
            f"blocks.{i}.attn.proj.weight": (WIDTH, WIDTH),
            f"blocks.{i}.mlp.fc1.weight": (4 * WIDTH, WIDTH),
            f"blocks.{i}.mlp.fc2.weight": (WIDTH, 4 * WIDTH),
        }
    shapes |= {"head.weight": (classes, WIDTH), "head.bias": (classes,)}
    state = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    state["bn.num_batches_tracked"] = torch.tensor(7)
    return state


def finetune(base: dict[str, torch.Tensor], generator: torch.Generator, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """``base`` plus Gaussian noise on every float tensor; integer buffers change too."""
    return {name: t + scale * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t + 1 for name, t in base.items()}


@pytest.fixture
def models() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base state dict and three fine-tunes of it."""
    generator = torch.Generator().manual_seed(0)
    base = tiny_vit(generator)
    return base, [finetune(base, generator) for _ in range(3)]


@pytest.fixture
def model_files(tmp_path: Path, models) -> tuple[Path, list[Path]]:
    """The ``models`` fixture written as safetensors files."""
    base, finetuned = models
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, state in enumerate(finetuned):
        paths.append(tmp_path / f"finetuned_{i}.safetensors")
        save_file(state, paths[-1])
    return tmp_path / "base.safetensors", paths
