"""AdapterBank: every frozen adapter set in one pass equals a pass per set; stacks grow, save and load."""

from __future__ import annotations

import timm
import torch

from clpeft.components.lora.adapter_bank import AdapterBank, every_adapter, inject_adapter_banks, split_by_adapter
from clpeft.components.lora.parallel_adapter import inject_adapters


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, num_classes=0).eval()


def _trained_banks(vit, n: int) -> list[AdapterBank]:
    banks = inject_adapter_banks(vit, bottleneck=4)
    for _ in range(n):
        for bank in banks:
            adapter = bank.new_adapter()
            with torch.no_grad():  # a trained adapter: non-zero everywhere
                for p in adapter.parameters():
                    p.normal_(0, 0.3)
            bank.freeze_current()
    return banks


@torch.no_grad()
def test_one_batched_pass_equals_a_pass_per_adapter_set():
    """Features of 3 adapter sets from ``every_adapter`` (one pass, 3x the batch through the blocks)
    equal those of a plain ViT with each set injected as ordinary parallel adapters, run one at a
    time (PILOT's loop); the patch embedding runs once."""
    vit = _vit()
    reference = _vit()
    banks = _trained_banks(vit, 3)
    x = torch.randn(5, 3, 32, 32)
    embeds = []
    vit.patch_embed.register_forward_hook(lambda m, a, o: embeds.append(a[0].shape[0]))
    with every_adapter(vit, banks, 3):
        batched = split_by_adapter(vit(x), 3)
    assert batched.shape == (5, 3, vit.embed_dim) and embeds == [5]
    adapters = inject_adapters(reference, bottleneck=4, dropout=0.0)
    for k in range(3):
        for bank, adapter in zip(banks, adapters.values(), strict=True):
            adapter.down_proj.weight.copy_(bank.down_weight[k])
            adapter.down_proj.bias.copy_(bank.down_bias[k])
            adapter.up_proj.weight.copy_(bank.up_weight[k])
            adapter.up_proj.bias.copy_(bank.up_bias[k])
        torch.testing.assert_close(batched[:, k], reference(x), atol=1e-5, rtol=1e-5)
    assert all(bank.groups == 0 for bank in banks)  # the context restored the training path


def test_training_path_uses_only_the_current_adapter_and_freezing_appends_it():
    vit = _vit()
    banks = _trained_banks(vit, 2)
    for bank in banks:
        bank.new_adapter()
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter.current." in n for n in trainable)
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for n, p in vit.named_parameters() if n in trainable)
    current = banks[0].current.down_proj.weight.detach().clone()
    for bank in banks:
        bank.freeze_current()
    assert banks[0].n_frozen == 3 and banks[0].current is None
    assert torch.equal(banks[0].down_weight[2], current)


def test_state_dict_into_fresh_banks_restores_every_stack():
    vit, fresh = _vit(), _vit()
    _trained_banks(vit, 2)
    fresh_banks = inject_adapter_banks(fresh, bottleneck=4)
    fresh.load_state_dict(vit.state_dict())
    assert fresh_banks[0].n_frozen == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), every_adapter(fresh, fresh_banks, 2):
        ours = fresh(x)
    banks = [m for m in vit.modules() if isinstance(m, AdapterBank)]
    with torch.no_grad(), every_adapter(vit, banks, 2):
        assert torch.equal(ours, vit(x))
