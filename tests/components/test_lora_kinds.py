"""Tests for the LoRA family's adapter kinds: DoRA, PiSSA, VeRA, LoRA-XS, AdaLoRA; EVA's start.

The references are peft's own layers (``use_dora``, ``init_lora_weights="pissa"``,
``VeraConfig``, ``AdaLoraConfig`` with its ``RankAllocator``, ``initialize_lora_eva_weights``) on identical copies of the base layers with the same trained tensors: outputs,
gradients and merged weights to 1e-5; saved peft adapter directories are loaded by
``peft.PeftModel.from_pretrained`` onto the untouched base model. LoRA-XS, which peft lacks, is
checked against its paper's formula computed from ``torch.linalg.svd`` here. Growth, pruning,
new updates, state dicts and adapter files are checked per kind against what they must preserve,
or for their one-line refusal.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clpeft.components.lora import (
    ADAPTER_KINDS,
    DoRALinear,
    LoRAFactors,
    LoRALinear,
    LoRAXSLinear,
    check_adapter,
    inject_lora,
    load_adapters,
    lora_layers,
    save_adapters,
    save_peft_adapter,
)
from clpeft.errors import UserError

TOL = dict(rtol=0, atol=1e-5)


class _Two(nn.Module):
    """Two linears of different shapes (VeRA slices its shared projections per layer)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 20)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _base(seed: int = 0) -> _Two:
    torch.manual_seed(seed)
    return _Two()


@torch.no_grad()
def _train(model: nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor as some training would (random, reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.2 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 0.1))


def _adapted(kind: str, rank: int = 3, alpha: float = 6.0, seed: int = 0, train: bool = True, **kw) -> tuple[_Two, _Two]:
    """(plain base model, (trained) copy with ``kind`` adapters on both linears)."""
    base = _base(seed)
    model = copy.deepcopy(base)
    inject_lora(model, ["a", "b"], rank, alpha, kind=kind, **kw)
    if train:
        _train(model)
    return base, model


def _peft_copy(peft, base: nn.Module, config) -> nn.Module:
    return peft.get_peft_model(copy.deepcopy(base), config)


def _copy_into_peft(ours: nn.Module, theirs: nn.Module, names: dict[str, str]) -> None:
    """Copy our tensors ``<layer>.<ours>`` into peft's ``<layer>.<theirs>`` for every adapted layer."""
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            module = theirs.base_model.model.get_submodule(path)
            for own, other in names.items():
                target = module.get_parameter(other) if "." in other else getattr(module, other)
                target.copy_(getattr(layer, own))


def _compare(ours: nn.Module, theirs: nn.Module, pairs: dict[str, str], train: bool = True) -> None:
    """Same output, input gradient and gradients of the paired tensors (ours name -> peft name)."""
    ours.train(train), theirs.train(train)
    x = torch.randn(4, 5, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    y1 = ours(x1)
    torch.manual_seed(3)
    y2 = theirs(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for path, layer in lora_layers(ours).items():
        module = theirs.base_model.model.get_submodule(path)
        for own, other in pairs.items():
            torch.testing.assert_close(getattr(layer, own).grad, module.get_parameter(other).grad, **TOL)


# ---------------------------------------------------------------------- equal to peft

_DORA = {
    "lora_A": "lora_A.default.weight",
    "lora_B": "lora_B.default.weight",
    "lora_magnitude_vector": "lora_magnitude_vector.default.weight",
}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("init", ["default", "pissa"])
def test_dora_equals_peft_forward_gradients_and_merge(peft, dropout, init):
    base, ours = _adapted("dora", dropout=dropout, init=init, train=False)
    config = peft.LoraConfig(
        r=3,
        lora_alpha=6.0,
        lora_dropout=dropout,
        target_modules=["a", "b"],
        use_dora=True,
        init_lora_weights=True if init == "default" else "pissa",
    )
    theirs = _peft_copy(peft, base, config)
    if init == "pissa":  # the starting factors are peft's
        torch.testing.assert_close(ours.a.lora_A, theirs.base_model.model.a.lora_A["default"].weight, **TOL)
    _train(ours)
    _copy_into_peft(ours, theirs, _DORA)
    _compare(ours, theirs, _DORA)
    _compare(ours, theirs, _DORA, train=False)
    merged = theirs.merge_and_unload()
    for layer in lora_layers(ours).values():
        layer.merge()
    torch.testing.assert_close(ours.a.base_layer.weight, merged.a.weight, **TOL)
    torch.testing.assert_close(ours.b.base_layer.weight, merged.b.weight, **TOL)


def test_dora_magnitude_starts_at_the_row_norms_and_unmerge_restores_the_weight():
    base = nn.Linear(8, 6)
    layer = DoRALinear(copy.deepcopy(base), 2, 4.0)
    torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.norm(dim=1), **TOL)
    _train(layer)
    x = torch.randn(3, 8)
    before = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), before, **TOL)
    assert not torch.allclose(layer.base_layer.weight, base.weight)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, **TOL)
    torch.testing.assert_close(layer(x), before, **TOL)


_LORA = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}


def test_pissa_equals_peft_start_forward_gradients_and_merge(peft):
    base = _base()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["a", "b"], 3, 6.0, kind="pissa")
    config = peft.LoraConfig(r=3, lora_alpha=6.0, target_modules=["a", "b"], init_lora_weights="pissa")
    theirs = _peft_copy(peft, base, config)
    for path, layer in lora_layers(ours).items():
        module = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.lora_A, module.lora_A["default"].weight, **TOL)
        torch.testing.assert_close(layer.lora_B, module.lora_B["default"].weight, **TOL)
        assert torch.equal(layer.base_layer.weight, base.get_submodule(path).weight)  # our base stays untouched
    _train(ours)
    _copy_into_peft(ours, theirs, _LORA)
    _compare(ours, theirs, _LORA)
    merged = theirs.merge_and_unload()
    for layer in lora_layers(ours).values():
        layer.merge()
    torch.testing.assert_close(ours.b.base_layer.weight, merged.b.weight, **TOL)


def test_pissa_start_is_the_weights_best_low_rank_approximation():
    w = torch.randn(10, 7)
    layer = LoRALinear(nn.Linear(7, 10), 2, 4.0, init="pissa")
    with torch.no_grad():
        layer.base_layer.weight.copy_(w)
        layer.new_update(2, 4.0, old="discard")
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(layer.delta_weight(), u[:, :2] * s[:2] @ vh[:2], **TOL)
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), layer.base_layer(x), **TOL)  # start components cancel it


_VERA = {"lora_lambda_d": "vera_lambda_d.default", "lora_lambda_b": "vera_lambda_b.default"}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_vera_equals_peft_projections_forward_gradients_and_merge(peft, dropout):
    base = _base()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["a", "b"], 3, 1.0, kind="vera", dropout=dropout, projection_seed=7)
    theirs = _peft_copy(peft, base, peft.VeraConfig(r=3, target_modules=["a", "b"], projection_prng_key=7, vera_dropout=dropout))
    for path, layer in lora_layers(ours).items():
        module = theirs.base_model.model.get_submodule(path)
        assert torch.equal(layer.lora_A, module.vera_A["default"][:, : layer.lora_A.shape[1]])
        assert torch.equal(layer.lora_B, module.vera_B["default"][: layer.lora_B.shape[0]])
        assert torch.equal(layer.lora_lambda_d, module.vera_lambda_d["default"])
        assert torch.equal(layer.lora_lambda_b, module.vera_lambda_b["default"])
    _train(ours)
    _copy_into_peft(ours, theirs, _VERA)
    _compare(ours, theirs, _VERA)
    torch.testing.assert_close(ours.a.delta_weight(), theirs.base_model.model.a.get_delta_weight("default"), **TOL)
    merged = theirs.merge_and_unload()
    for layer in lora_layers(ours).values():
        layer.merge()
    torch.testing.assert_close(ours.b.base_layer.weight, merged.b.weight, **TOL)


def test_lora_xs_follows_the_papers_formula():
    torch.manual_seed(0)
    base = nn.Linear(9, 11)
    layer = LoRAXSLinear(copy.deepcopy(base), 4, alpha=8.0)
    u, s, vh = torch.linalg.svd(base.weight.detach())
    torch.testing.assert_close(layer.lora_B, u[:, :4], **TOL)  # U_r
    torch.testing.assert_close(layer.lora_A, s[:4, None] * vh[:4], **TOL)  # S_r V_r^T
    assert 0 < layer.lora_R.abs().max() < 1e-4  # N(0, 1e-10)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_R"]
    _train(layer)
    r = layer.lora_R.detach().clone().requires_grad_()
    x = torch.randn(5, 9)
    reference = F.linear(x, base.weight + 2.0 * u[:, :4] @ r @ (s[:4, None] * vh[:4]), base.bias)
    y = layer(x)
    torch.testing.assert_close(y, reference, **TOL)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (reference * g).sum().backward()
    torch.testing.assert_close(layer.lora_R.grad, r.grad, **TOL)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * u[:, :4] @ r.detach() @ (s[:4, None] * vh[:4]), **TOL)


_ADALORA = {"lora_A": "lora_A.default", "lora_E": "lora_E.default", "lora_B": "lora_B.default"}


def _adalora_pair(peft, **config):
    base, ours = _adapted("adalora", dropout=config.get("lora_dropout", 0.0))
    theirs = _peft_copy(
        peft, base, peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6.0, target_modules=["a", "b"], **{"total_step": 10, **config})
    )
    _copy_into_peft(ours, theirs, _ADALORA)
    return base, ours, theirs


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_adalora_equals_peft_forward_gradients_and_merge(peft, dropout):
    _, ours, theirs = _adalora_pair(peft, lora_dropout=dropout)
    _compare(ours, theirs, _ADALORA)
    merged = theirs.merge_and_unload()
    for layer in lora_layers(ours).values():
        layer.merge()
    torch.testing.assert_close(ours.b.base_layer.weight, merged.b.weight, **TOL)


def test_adalora_starts_as_peft_does():
    layer = inject_lora(_base(), ["a"], 4, 8.0, kind="adalora")["a"]
    assert torch.equal(layer.lora_E, torch.zeros(4, 1)) and 0.01 < layer.lora_A.std() < 0.03
    assert layer.scaling == pytest.approx(8.0 / (4 + 1e-5))


class _WithLoss(nn.Module):
    """Returns an object with ``.loss``, to which peft's AdaLoRA adds its orthogonal penalty."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.a, self.b = inner.a, inner.b

    def forward(self, x):
        return types.SimpleNamespace(loss=self.b(torch.tanh(self.a(x))).sum() * 0)


def test_adalora_orthogonal_penalty_equals_peft(peft):
    from clpeft.components.lora.adalora import orthogonal_penalty

    base, ours = _adapted("adalora")
    theirs = _peft_copy(
        peft,
        _WithLoss(base),
        peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6.0, orth_reg_weight=0.7, target_modules=["a", "b"], total_step=10),
    )
    _copy_into_peft(ours, theirs, _ADALORA)
    expected = theirs.base_model(torch.randn(2, 16)).loss / 0.7  # AdaLoraModel.forward adds it
    torch.testing.assert_close(orthogonal_penalty(lora_layers(ours)), expected, **TOL)


def test_adalora_allocator_masks_as_peft_does(peft):
    from clpeft.components.lora.adalora import AdaLoRAAllocator

    _, ours, theirs = _adalora_pair(peft, tinit=1, tfinal=2, deltaT=1, total_step=8)
    allocator = AdaLoRAAllocator(lora_layers(ours), target_rank=2, total_step=8, tinit=1, tfinal=2, delta_t=1)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(0)
    masked = []
    for step in range(1, 7):
        x = torch.randn(8, 16, generator=gen)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        allocator.step(step)
        theirs.base_model.update_and_allocate(step)
        for path, layer in lora_layers(ours).items():
            peft_e = theirs.base_model.model.get_submodule(path).lora_E["default"]
            torch.testing.assert_close(layer.lora_E, peft_e, **TOL)
        masked.append(sum(int((layer.lora_E == 0).sum()) for layer in lora_layers(ours).values()))
    assert masked[0] == 0 and masked[-1] == 6 - 4  # the budget falls from 3 + 3 to target_r = 2 per layer


def _two_dimensional_inputs(n: int = 256) -> torch.Tensor:
    """Inputs with two well-separated principal directions (and a little noise), nonzero mean."""
    gen = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    return torch.randn(n, 16, generator=gen) * torch.tensor([3.0, 1.5] + [0.01] * 14) @ rotation + 0.3


@pytest.mark.parametrize("whiten", [False, True])
def test_eva_equals_peft_components_ranks_and_scaling(peft, whiten):
    from clpeft.components.lora.eva import eva_init

    base, x = _base(), _two_dimensional_inputs()
    with torch.no_grad():  # a saturating first layer: b's inputs spread over more directions than a's
        base.a.weight.mul_(5)
    config = peft.LoraConfig(
        r=3, lora_alpha=6.0, target_modules=["a", "b"], init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0, whiten=whiten)
    )
    theirs = _peft_copy(peft, base, config)
    peft.initialize_lora_eva_weights(
        theirs,
        dataloader=[x],
        forward_fn=lambda model, inputs: model(inputs),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, ["a", "b"], 3, 6.0)
    ranks = eva_init(layers, lambda: ours(x), whiten=whiten)
    assert ranks == {"a": 2, "b": 4}  # the budget of 3 + 3 follows the explained variance
    for path, layer in layers.items():
        module = theirs.base_model.model.get_submodule(path)
        expected = module.lora_A["default"].weight
        if whiten:  # peft's incremental PCA saw the one batch twice (its convergence check), so its singular
            expected = expected * 2**0.25  # values are sqrt(2) ours and its whitened rows 2^(-1/4) ours
        torch.testing.assert_close(layer.lora_A, expected, rtol=0, atol=1e-4)
        assert layer.rank == ranks[path] and layer.scaling == pytest.approx(module.scaling["default"])
        assert torch.equal(layer.lora_B, torch.zeros(layer.lora_B.shape))
    torch.testing.assert_close(ours(x), base(x), **TOL)


def test_eva_components_are_the_centred_inputs_right_singular_vectors():
    from clpeft.components.lora.eva import eva_init

    x = _two_dimensional_inputs()
    layer = LoRALinear(nn.Linear(16, 4), 3, 3.0)
    eva_init({"fc": layer}, lambda: layer(x), rho=1.0)
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    torch.testing.assert_close(layer.lora_A.abs(), vh[:3].abs(), rtol=0, atol=1e-5)
    assert (layer.lora_A.gather(1, layer.lora_A.abs().argmax(1, keepdim=True)) > 0).all()
    assert layer.rank == 3 and layer.scaling == 1.0


@pytest.mark.parametrize("kind", ["pissa", "vera", "lora_xs"])
def test_eva_is_refused_where_the_kind_sets_a(kind):
    from clpeft.components.lora.eva import eva_init

    _, model = _adapted(kind, train=False)
    with pytest.raises(UserError, match=f"^start_from\\(\\) is not defined for {kind} adapters"):
        eva_init(lora_layers(model), lambda: model(_two_dimensional_inputs()))


def test_parameter_counts_per_kind():
    counts = {}
    for kind in ADAPTER_KINDS:
        _, model = _adapted(kind, rank=3)
        counts[kind] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = 3 * (16 + 12) + 3 * (12 + 20)
    assert counts == {
        "lora": lora,
        "pissa": lora,
        "dora": lora + 12 + 20,
        "vera": (3 + 12) + (3 + 20),
        "lora_xs": 2 * 9,
        "adalora": lora + 2 * 3,
    }


# ---------------------------------------------------------------------- adapter files


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_peft_adapter_directory_loads_in_peft_with_the_same_outputs(peft, tmp_path, kind):
    base, ours = _adapted(kind)
    save_peft_adapter(ours, tmp_path / kind)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / kind).eval()
    x = torch.randn(4, 16)
    torch.testing.assert_close(loaded(x), ours.eval()(x), **TOL)
    expected = {"vera": "VeraModel", "dora": "LoraModel"}.get(kind, "LoraModel")
    assert type(loaded.base_model).__name__ == expected


def test_vera_with_frozen_updates_is_saved_as_peft_lora(peft, tmp_path):
    base, ours = _adapted("vera")
    for layer in lora_layers(ours).values():
        layer.new_update(3, 1.0, old="freeze")
    _train(ours, seed=5)
    save_peft_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(4, 16)
    torch.testing.assert_close(loaded(x), ours.eval()(x), **TOL)


@pytest.mark.parametrize("kind", ["lora", "dora", "pissa", "adalora"])
def test_save_load_adapters_round_trip(tmp_path, kind):
    _, ours = _adapted(kind)
    save_adapters(ours, tmp_path / "a.safetensors")
    _, fresh = _adapted(kind, seed=0)
    _train(fresh, seed=9)
    load_adapters(fresh, tmp_path / "a.safetensors")
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), ours(x), **TOL)


@pytest.mark.parametrize("kind", ["vera", "lora_xs"])
def test_loading_lora_factors_into_vera_or_lora_xs_is_refused(tmp_path, kind):
    _, ours = _adapted(kind)
    save_adapters(ours, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match=f"not defined for {kind} adapters.*inject kind 'lora'"):
        load_adapters(ours, tmp_path / "a.safetensors")


@pytest.mark.parametrize("kind", ["lora", "pissa", "vera", "lora_xs", "adalora"])
def test_adapter_files_merge_to_the_layers_whole_update(tmp_path, kind):
    from clpeft.merging.lora import open_model

    _, ours = _adapted(kind)
    save_adapters(ours, tmp_path / "a.safetensors")
    adapter = open_model(tmp_path / "a.safetensors")
    for path, layer in lora_layers(ours).items():
        delta = adapter.delta(f"{path}.weight", device=torch.device("cpu"), dtype=torch.float32)
        torch.testing.assert_close(delta.view_as(layer.base_layer.weight), layer._whole_delta(), **TOL)


def test_merging_refuses_dora_adapter_files_in_one_line(tmp_path):
    from clpeft.merging.lora import open_model

    _, ours = _adapted("dora")
    save_adapters(ours, tmp_path / "d.safetensors")
    with pytest.raises(UserError, match="DoRA") as info:
        open_model(tmp_path / "d.safetensors")
    assert "\n" not in str(info.value)


def test_merging_refuses_peft_vera_directories_in_one_line(peft, tmp_path):
    from clpeft.merging.lora import open_model

    _, ours = _adapted("vera")
    save_peft_adapter(ours, tmp_path)
    with pytest.raises(UserError, match=r"^\S+ is a peft 'VERA' adapter; merging reads LoRA adapters [^\n]+$"):
        open_model(tmp_path)


# ---------------------------------------------------------------------- dynamic rank and updates


@pytest.mark.parametrize("kind", ["lora", "dora", "pissa", "lora_xs", "adalora"])
def test_grow_keeps_the_output(kind):
    _, model = _adapted(kind)
    x = torch.randn(4, 16)
    before = model(x).detach()
    for layer in lora_layers(model).values():
        layer.grow(2)
        assert layer.rank == 5
    torch.testing.assert_close(model(x), before, **TOL)
    model(x).square().sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_lora_xs_grows_along_the_next_singular_vectors():
    torch.manual_seed(0)
    layer = LoRAXSLinear(nn.Linear(9, 11), 2, alpha=2.0)
    layer.grow(3)
    u, s, vh = torch.linalg.svd(layer.base_layer.weight.detach())
    torch.testing.assert_close(layer.lora_B, u[:, :5], **TOL)
    torch.testing.assert_close(layer.lora_A, s[:5, None] * vh[:5], **TOL)
    assert torch.equal(layer.lora_R[2:], torch.zeros(3, 5)) and torch.equal(layer.lora_R[:, 2:], torch.zeros(5, 3))


def test_dora_prune_keeps_the_magnitude():
    _, model = _adapted("dora", rank=4)
    magnitude = model.a.lora_magnitude_vector.detach().clone()
    kept = model.a.prune(2)
    assert model.a.rank == 2 and len(kept) == 2 and torch.equal(model.a.lora_magnitude_vector, magnitude)


@pytest.mark.parametrize(("kind", "action"), [("vera", "grow"), ("vera", "prune"), ("pissa", "prune"), ("lora_xs", "prune")])
def test_undefined_rank_changes_are_refused_in_one_line(kind, action):
    _, model = _adapted(kind)
    with pytest.raises(UserError, match=rf"^{action}\(\) is not defined for {kind} adapters: [^\n]+$"):
        getattr(model.a, action)(2)
    with pytest.raises(UserError, match=f"rank {'growth' if action == 'grow' else 'pruning'} is not defined for {kind}"):
        check_adapter(kind, **{action: True})


@pytest.mark.parametrize("kind", ["lora", "pissa", "vera", "lora_xs", "adalora"])
@pytest.mark.parametrize("old", ["freeze", "merge"])
def test_new_update_keeps_the_output_and_the_file_holds_the_whole_update(tmp_path, kind, old):
    base, model = _adapted(kind)
    x = torch.randn(4, 16)
    before = model(x).detach()
    for layer in lora_layers(model).values():
        layer.new_update(3, 6.0, old=old)
    after = model(x).detach()
    tol = 1e-4 if kind == "lora_xs" else 1e-5  # a new LoRA-XS update starts at R ~ N(0, 1e-10)
    torch.testing.assert_close(after, before, rtol=0, atol=tol)
    if old == "freeze":
        _train(model, seed=4)
        save_adapters(model, tmp_path / "a.safetensors")
        plain = copy.deepcopy(base)
        inject_lora(plain, ["a", "b"], 1, 1.0)
        load_adapters(plain, tmp_path / "a.safetensors")
        torch.testing.assert_close(plain(x), model(x), **TOL)


def test_dora_update_cannot_be_frozen_but_merges():
    _, model = _adapted("dora", init="pissa")
    with pytest.raises(UserError, match="DoRA update cannot be frozen.*old_updates: merge"):
        model.a.new_update(3, 6.0, old="freeze")
    x = torch.randn(4, 16)
    before = model(x).detach()
    for layer in lora_layers(model).values():
        layer.new_update(3, 6.0, old="merge")
        assert layer.frozen_rank == 3 and layer.start_rank == 3  # the new update's PiSSA start only
    torch.testing.assert_close(model(x), before, **TOL)


def test_pissa_discard_drops_the_start_with_the_update():
    base, model = _adapted("pissa")
    for layer in lora_layers(model).values():
        layer.new_update(3, 6.0, old="discard")
    x = torch.randn(4, 16)
    torch.testing.assert_close(model(x), base(x), **TOL)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_state_dict_round_trip_into_a_fresh_model(kind):
    _, model = _adapted(kind)
    for layer in lora_layers(model).values():
        if kind in ("lora", "dora", "lora_xs", "adalora"):
            layer.grow(1)
        if kind != "dora":
            layer.new_update(layer.rank, 6.0, old="freeze")
    _train(model, seed=6)
    _, fresh = _adapted(kind, seed=0)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), model(x), **TOL)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_lora_factors_hold_each_kinds_trained_tensors(kind):
    _, model = _adapted(kind)
    factors = LoRAFactors(lora_layers(model))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(factors.overrides()) == trained
    teacher = copy.deepcopy(factors)
    _train(teacher, seed=8)
    x = torch.randn(4, 16)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in teacher.overrides().items():
            expected.get_parameter(name).copy_(value)
    torch.testing.assert_close(functional_call(model, teacher.overrides(), (x,)), expected(x), **TOL)


def test_kind_options_are_checked_in_one_line():
    with pytest.raises(UserError, match="unknown adapter kind 'lorax'; use one of lora, dora, pissa, vera, lora_xs, adalora"):
        inject_lora(_base(), ["a"], 2, 2.0, kind="lorax")
    with pytest.raises(UserError, match="learnable_scale is not defined for vera"):
        inject_lora(_base(), ["a"], 2, 2.0, kind="vera", learnable_scale=True)
    with pytest.raises(UserError, match="a rank per layer is not defined for vera"):
        inject_lora(_base(), ["a", "b"], 2, 2.0, kind="vera", rank_schedule=[2, 3])
    with pytest.raises(UserError, match="designed A .* not defined for lora_xs"):
        check_adapter("lora_xs", design_a=True)
    check_adapter("dora", grow=True, prune=True, design_a=True, learnable_scale=True)
