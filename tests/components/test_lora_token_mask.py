"""PRILoRA's input statistics (``LoRALinear.input_sq_mean``) on padded token batches: with ``token_mask`` set,
only the real positions count, as if each sequence ran on its own without padding; without it, every position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clpeft.components.lora import DoRALinear, LoRALinear

D = 6
LENGTHS = (5, 2, 4)  # three sequences; a batch of them is padded to 5


def _layer(kind=LoRALinear) -> LoRALinear:
    torch.manual_seed(0)
    layer = kind(nn.Linear(D, 4), rank=3, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # nonzero B: the importance scores differ by component
    layer.track_importance = True
    return layer.train()


def _sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, D, generator=g) for n in LENGTHS]


def _padded(sequences, pad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, mask)``: the sequences right-padded to the longest, the padding zeros or large random garbage."""
    width = max(len(s) for s in sequences)
    fill = torch.zeros if pad == "zeros" else lambda *shape: 100 * torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    x = fill(len(sequences), width, D)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return x, mask


@pytest.mark.parametrize("kind", [LoRALinear, DoRALinear])
def test_a_padded_batch_counts_what_its_sequences_count_run_unpadded(kind):
    sequences = _sequences()
    alone = _layer(kind)
    for s in sequences:  # one sequence at a time, no padding and no mask
        alone(s[None])
    x, mask = _padded(sequences, "garbage")
    padded = _layer(kind)
    padded.token_mask = mask
    padded(x)
    real = torch.cat(sequences)
    assert int(padded.input_count) == int(alone.input_count) == len(real) == sum(LENGTHS)
    torch.testing.assert_close(padded.input_sq_mean, real.square().mean(0))  # by hand: the real rows' mean square
    torch.testing.assert_close(padded.input_sq_mean, alone.input_sq_mean)
    torch.testing.assert_close(padded.importance(), alone.importance())


def test_garbage_in_the_padding_gives_the_scores_of_zeros_there():
    scores = {}
    for pad in ("zeros", "garbage"):
        layer = _layer()
        x, mask = _padded(_sequences(), pad)
        layer.token_mask = mask
        layer(x)
        scores[pad] = layer.importance()
    assert torch.equal(scores["zeros"], scores["garbage"])
    unmasked = _layer()  # without the mask the padding counts: zeros dilute the mean, garbage swamps it
    unmasked(_padded(_sequences(), "garbage")[0])
    assert not torch.allclose(unmasked.importance(), scores["garbage"], rtol=0.1)


def test_without_a_mask_every_position_counts_and_a_wrong_mask_is_refused():
    x, mask = _padded(_sequences(), "garbage")
    layer = _layer()
    layer(x)
    torch.testing.assert_close(layer.input_sq_mean, x.reshape(-1, D).square().mean(0))
    assert int(layer.input_count) == x.shape[0] * x.shape[1]
    layer.token_mask = mask[:, :-1]
    with pytest.raises(RuntimeError, match=r"token_mask of shape \[3, 4\] does not fit inputs of shape \[3, 5, 6\]"):
        layer(x)
    layer.token_mask = torch.zeros_like(mask)  # no real token: nothing counts
    before = layer.input_sq_mean.clone()
    layer(x)
    assert torch.equal(layer.input_sq_mean, before) and int(layer.input_count) == x.shape[0] * x.shape[1]
