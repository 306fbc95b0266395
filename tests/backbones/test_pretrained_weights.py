"""PretrainedWeights: state dicts leave out unchanged pretrained tensors, and loading restores them exactly."""

import pytest
import torch
from torch import nn

from clpeft.backbones.pretrained_weights import OMITTED_KEY, PretrainedWeights, tensor_digest
from clpeft.errors import UserError


class _Wrapped(nn.Module):
    """A linear moved under ``base_layer`` (as LoRA wraps it), plus a new trained parameter."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.extra = nn.Parameter(torch.zeros(2))


def _pretrained(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 5, bias=False))
    model[2].weight = model[0].weight  # tied, as many LLMs tie their output layer to the embedding
    model.register_buffer("counts", torch.arange(3.0))
    return model


def _adapted(seed: int = 0, rebuilt: list | None = None) -> tuple[nn.Module, PretrainedWeights]:
    """The pretrained model, hooked, then adapted: layer 1 wrapped as LoRA wraps a linear."""
    model = _pretrained(seed)

    def rebuild():
        if rebuilt is not None:
            rebuilt.append(1)
        return _pretrained(seed)

    hooks = PretrainedWeights(model, rebuild)
    model[1] = _Wrapped(model[1])
    return model, hooks


def test_state_leaves_out_only_unchanged_pretrained_tensors():
    model, _ = _adapted()
    with torch.no_grad():
        model[1].base_layer.bias.add_(1.0)  # changed in place (as a merged update)
        model[1].extra.fill_(3.0)
    state = model.state_dict()
    assert set(state) == {"1.base_layer.bias", "1.extra", OMITTED_KEY}
    omitted = state[OMITTED_KEY]
    assert set(omitted) == {"0.weight", "1.base_layer.weight", "2.weight", "counts"}
    assert omitted["1.base_layer.weight"] == ["1.weight", tensor_digest(_pretrained()[1].weight)]


def test_load_restores_the_left_out_tensors_exactly_even_after_they_changed():
    trained, _ = _adapted()
    with torch.no_grad():
        trained[1].extra.fill_(3.0)
    state = trained.state_dict()

    rebuilt = []
    fresh, _ = _adapted(rebuilt=rebuilt)
    fresh.load_state_dict(state)
    assert rebuilt == []  # every left-out tensor was still the pretrained one here
    for (name, a), b in zip(trained.state_dict(keep_vars=True).items(), fresh.state_dict(keep_vars=True).values()):
        assert name == OMITTED_KEY or torch.equal(a, b)

    with torch.no_grad():  # this process changed a left-out tensor: it is read again from a rebuilt model
        fresh[1].base_layer.weight.mul_(2.0)
    fresh.load_state_dict(state)
    assert rebuilt == [1]
    assert torch.equal(fresh[1].base_layer.weight, trained[1].base_layer.weight)


def test_load_refuses_other_pretrained_weights_naming_the_tensor():
    state = _adapted(seed=0)[0].state_dict()
    other, _ = _adapted(seed=1)
    with pytest.raises(UserError, match=r"backbone.weights: .*other pretrained weights \(0.weight differs"):
        other.load_state_dict(state)


def test_a_full_state_without_the_record_still_loads():
    trained, _ = _adapted()
    with torch.no_grad():
        trained[1].extra.fill_(3.0)
    full = {k: v.detach() for k, v in [*trained.named_parameters(remove_duplicate=False), *trained.named_buffers()]}
    fresh, _ = _adapted()
    fresh.load_state_dict(full)  # a checkpoint written before states left pretrained tensors out
    assert torch.equal(fresh[1].extra, trained[1].extra)
