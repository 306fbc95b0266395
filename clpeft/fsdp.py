"""``train.sharding: fsdp``: a generative LLM's parameters, gradients and optimizer state sharded across ranks.

Fully sharded data parallelism (Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded
Data Parallel", VLDB 2023, https://arxiv.org/abs/2304.11277) with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``): under ``torchrun`` with several ranks, :func:`shard`
applies it to a ``generative_lm`` backbone's ``net``, to each decoder layer and then to the root,
instead of DistributedDataParallel. Every parameter (the frozen pretrained weights and the
trainable LoRA factors alike) is split along its first dimension, rank ``r`` keeping chunk ``r``.

**Built sharded.** :func:`shard` runs before the strategy is moved to the device
(:func:`~clpeft.run.build_run`): FSDP moves one unit (a decoder layer, then the root's own
weights) to the device at a time, keeps this rank's chunk there and frees the rest, so a GPU
never holds more than ``1 / N`` of the model plus one unit. The modules hold the shards from then
on, in training and in evaluation alike (the root's own weights, embeddings, final norm and output
layer, stay gathered from a forward until the backward, or the end of :func:`lockstep`).

**Training.** A layer's weights are all-gathered before its forward and freed after it (again in
backward), gradients are reduce-scattered (averaged over the ranks, each rank keeping the gradient
of its own chunk), and the optimizer holds and updates only the shards and their state. The step
(:func:`sharded_step`) weighs each rank's loss by ``n_rank * N / n_batch`` as the DDP step does, so
the average is the global batch's mean; a rank whose share of the last global batch is empty
still runs one forward (of a single padding token, weighted 0), since every rank must take part
in each layer's all-gather and reduce-scatter.

**Evaluation in lockstep** (:func:`lockstep`). The ranks' shares of a test set need different
numbers of forwards (uneven shares, an empty last batch, a batch whose answers end early in
greedy decoding), and every forward all-gathers each layer. Inside :func:`lockstep` each forward
of the net is preceded by an all-reduce of "I run one"; a rank whose share is done answers
"none" and, while another rank still runs, runs a forward of one padding token whose output is
dropped. Every rank thus runs as many forwards as the busiest one, and the model stays sharded:
answers are the unsharded model's (each forward computes what one process computes).

**The whole state** (checkpoints, the cross-rank consistency check, exports). Each rank keeps the
module's own ``nn.Parameter`` objects, as built, off the device (where the pretrained weights were
loaded: host memory) and refreshes them from the shards (an all-gather per parameter, moved off
the device at once) when the strategy goes from training to evaluation (:func:`follow_mode`;
``Strategy.train`` calls it; every rank switches at the same points). ``state_dict`` and
``load_state_dict`` of the backbone or its ``net`` swap them in for the call (:class:`_Sharding`'s
hooks; FSDP's own state-dict hooks, which give local shards, are removed), and :func:`whole` for
rank 0's exports (:class:`WholeCalls`): a checkpoint is the
full state dict in the one-process format (the unchanged pretrained tensors left out by
:class:`~clpeft.backbones.pretrained_weights.PretrainedWeights`, which knows these objects),
written by rank 0 alone with no collective; a sharded run resumes from a one-process checkpoint and
the other way round; a loaded state is copied into every rank's chunks at once. Reading the state
while training (the host copies are stale then) is a ``RuntimeError``.

``eval.baseline`` is refused: it evaluates a deep copy of the strategy, which FSDP refuses to
make. Only the strategies in :data:`SUPPORTED` are sharded; the others (those that call the net
functionally, as LwF's teacher pass with ``params=``, replace parameters, build their own
optimizer groups or compute statistics from each rank's own batches) are refused in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from clpeft import distributed
from clpeft.errors import UserError

__all__ = ["SUPPORTED", "WholeCalls", "follow_mode", "lockstep", "shard", "sharded_step", "whole"]

_KEY = "train.sharding"
#: Strategies checked to train sharded as in one process: one forward of the net per step, their
#: optimizer groups from the base class, no functional calls of the net, no parameters replaced.
SUPPORTED = ("seq_finetune", "replay", "joint")


def shard(strategy: nn.Module, world: distributed.World, cfg, device: torch.device) -> None:
    """Apply FSDP2 to ``strategy.backbone.net`` (``cfg.train.sharding: fsdp`` with several ranks), moving it to ``device`` unit by unit.

    Raises:
        UserError: the backbone is not ``generative_lm``, the strategy cannot train sharded, or
            ``eval.baseline`` is on (it evaluates a copy of the model, and FSDP refuses to be copied).
    """
    if cfg.train.sharding == "none":
        return
    from clpeft.backbones.generative_lm import GenerativeLM

    if not isinstance(strategy.backbone, GenerativeLM):
        raise UserError(f"fsdp shards a generative_lm backbone (this one is {type(strategy.backbone).__name__}); use none", key=_KEY)
    name = strategy.registered_name or type(strategy).__name__
    if name not in SUPPORTED:
        raise UserError(f"strategy {name} cannot train sharded (fsdp supports {', '.join(SUPPORTED)}); use none", key=_KEY)
    if not world.active:
        return
    if cfg.eval.baseline:
        raise UserError(
            "the untrained model's evaluation copies the model, which FSDP cannot; set eval.baseline: false", key="eval.baseline"
        )
    strategy.backbone.net.clpeft_sharding = _Sharding(strategy.backbone, world, device)


class _Sharding:
    """One sharded net: its FSDP units (the root first, then the decoder layers) and, for every
    parameter, the module's own ``nn.Parameter``, which holds the whole value off the device."""

    def __init__(self, backbone: nn.Module, world: distributed.World, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard  # imported here: 1.5 s, for sharded runs only

        net = backbone.net
        layers = getattr(getattr(net, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise UserError(f"fsdp finds no decoder layers (model.layers) in {type(net).__name__}; use none", key=_KEY)
        originals = {(id(m), n): p for m in net.modules() for n, p in m.named_parameters(recurse=False)}
        host = {id(p): p.data for p in originals.values()}
        mesh = init_device_mesh(device.type, (world.size,))
        for unit in (*layers, net):  # FSDP moves the unit to the device, then keeps this rank's chunk
            fully_shard(unit, mesh=mesh, reshard_after_forward=unit is not net)  # the root keeps its weights for backward
            for p in originals.values():  # the whole unit leaves the device at once
                p.data = host[id(p)]
        self.net, self.world = net, world
        self.units = [net, *layers]
        self.pairs = [(r, originals[id(r._module_info.module), r._module_info.param_name]) for r in self._records()]
        for record, _ in self.pairs:
            record._post_load_hook_handle.remove()  # loads reach the whole tensors; _leave() copies them into the chunks
        for unit in self.units:
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                for handle in (  # state dicts of the whole tensors, not of the shards
                    *group._module_to_pre_save_state_dict_hook_handle.values(),
                    *group._module_to_pre_load_state_dict_hook_handle.values(),
                ):
                    handle.remove()
        self.stale = False  # the whole tensors are the shards' values
        self.depth = 0  # nested state-dict calls (the backbone's, then its net's)
        for module in (backbone, net):
            module.register_state_dict_pre_hook(lambda *_: self._enter())
            module.register_state_dict_post_hook(lambda *_: self._leave(loaded=False))  # after PretrainedWeights' on the backbone
            handle = module.register_load_state_dict_pre_hook(lambda *_: self._enter())
            module._load_state_dict_pre_hooks.move_to_end(handle.id, last=False)  # before PretrainedWeights' restore
            module.register_load_state_dict_post_hook(lambda *_: self._leave(loaded=True))

    def _records(self) -> Iterator:
        for unit in self.units:
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                yield from group.fsdp_params

    def _enter(self) -> None:
        """A state dict is read or loaded: the whole tensors registered in the modules for the call."""
        if self.stale:
            raise RuntimeError("the sharded model's whole state is read after evaluation starts (strategy.eval()), not while training")
        self.depth += 1
        if self.depth == 1:
            for record, original in self.pairs:
                record._setattr_on_modules(original)

    def _leave(self, loaded: bool) -> None:
        """The call is over: a loaded state copied into this rank's chunks, the shards registered again."""
        self.depth -= 1
        if self.depth:
            return
        with torch.no_grad():
            for record, original in self.pairs:
                if loaded:
                    local = record.sharded_param._local_tensor
                    if local.numel():
                        chunk = torch.chunk(original.detach(), self.world.size, dim=0)[self.world.rank][: local.shape[0]]
                        local.copy_(chunk)
                record._setattr_on_modules(record.sharded_param)

    def reshard(self) -> None:
        """Free every gathered unit (the root keeps its weights after a forward): a local step, no collective."""
        for unit in self.units:
            unit.reshard()

    def refresh(self) -> None:
        """The whole tensors from the shards, one parameter at a time (an all-gather each, moved off the device at once)."""
        if not self.stale:
            return
        self.reshard()
        with torch.no_grad():
            for record, original in self.pairs:
                original.data = record.sharded_param.detach().full_tensor().to(original.device)
        self.stale = False


def _of(strategy: nn.Module) -> _Sharding | None:
    """The sharding of the strategy's net (``None``: not sharded)."""
    return getattr(getattr(getattr(strategy, "backbone", None), "net", None), "clpeft_sharding", None)


def follow_mode(strategy: nn.Module, training: bool) -> None:
    """Training makes the whole tensors stale; evaluation refreshes them (every rank switches at the same points)."""
    sharding = _of(strategy)
    if sharding is None:
        return
    if training:
        sharding.reshard()
        sharding.stale = True
    else:
        sharding.refresh()


@contextmanager
def lockstep(strategy: nn.Module):
    """Every rank runs as many forwards of the sharded net in the block as the busiest one (see the module docstring); no-op when not sharded."""
    sharding = _of(strategy)
    if sharding is None:
        yield
        return
    backbone, world = strategy.backbone, sharding.world

    def running(*_) -> None:  # before FSDP's own hook: this all-reduce comes before the forward's all-gathers
        world.all_reduce_sum(torch.ones(1, device=backbone.device))

    handle = sharding.net.register_forward_pre_hook(running, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            while world.all_reduce_sum(torch.zeros(1, device=backbone.device)).item() > 0:
                _idle_forward(backbone)  # another rank's forward: its all-gathers, the output dropped
        sharding.reshard()


@contextmanager
def whole(strategy: nn.Module):
    """The whole tensors (the host copies) registered in the modules for the block, with no collective; no-op when not sharded."""
    sharding = _of(strategy)
    if sharding is None:
        yield
        return
    sharding._enter()
    try:
        yield
    finally:
        sharding._leave(loaded=False)


class WholeCalls:
    """``target`` (rank 0's exports, which read the modules' tensors) with each method called inside :func:`whole`."""

    def __init__(self, target, strategy: nn.Module):
        self._target, self._strategy = target, strategy

    def __getattr__(self, name: str):
        attribute = getattr(self._target, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            with whole(self._strategy):
                return attribute(*args, **kwargs)

        return call


def sharded_step(strategy: nn.Module):
    """``step(batch, weight) -> weighted loss`` for a sharded strategy (FSDP reduces the gradients), else ``None``."""
    if _of(strategy) is None:
        return None
    backbone = strategy.backbone

    def step(batch, weight: float) -> torch.Tensor:
        if len(batch.y) == 0:  # an empty share: the same collectives as the other ranks, zero gradients
            return _idle_forward(backbone).logits.sum() * 0.0
        return strategy.training_step(batch) * weight

    return step


def _idle_forward(backbone: nn.Module):
    """A forward of one padding token: this rank's part in the others' collectives, its output of no use.
    The token is masked out, so statistics of real tokens (PRILoRA's, under ``mark_real_tokens``) skip it."""
    token = torch.full((1, 1), backbone.pad_id, dtype=torch.long, device=backbone.device)
    return backbone.net(input_ids=token, attention_mask=torch.zeros_like(token), use_cache=False)
