"""``train.sharding: fsdp``: a generative LLM's parameters, gradients and optimizer state sharded across ranks while it trains.

Fully sharded data parallelism (Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded
Data Parallel", VLDB 2023, https://arxiv.org/abs/2304.11277) with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``): under ``torchrun`` with several ranks, :func:`shard`
applies it to a ``generative_lm`` backbone's ``net``, to each decoder layer and then to the root,
instead of DistributedDataParallel. Every parameter (the frozen pretrained weights and the
trainable LoRA factors alike) is split along its first dimension, rank ``r`` keeping chunk ``r``.

**Training** (the strategy in train mode): the registered parameters are the shards. A layer's
weights are all-gathered before its forward and freed after it (again in backward), gradients are
reduce-scattered (averaged over the ranks, each rank keeping the gradient of its own chunk), and
the optimizer, built from :func:`training_parameters`, holds and updates only the shards and their
state. The step (:func:`sharded_step`) weighs each rank's loss by ``n_rank * N / n_batch`` as the
DDP step does, so the average is the global batch's mean; a rank whose share of the last global
batch is empty still runs one forward (of a single padding token, weighted 0), since every rank
must take part in each layer's all-gather and reduce-scatter.

**Outside training** (the strategy in eval mode, :func:`follow_mode`; ``Strategy.train`` calls
it): every rank all-gathers the whole model into the module's own ``nn.Parameter`` objects (empty
while training) and keeps it there, so generation, perplexity, checkpoints, exports and the
cross-rank consistency check see the plain full tensors of an unsharded run: the ranks' evaluation
shares need different numbers of forward passes (a batch stops decoding when its answers are
done), which collectives inside the forward could not serve. FSDP's state-dict hooks (which would
give local shards) are removed, so a checkpoint is the full state dict in the one-process format
(the unchanged pretrained tensors left out by
:class:`~clpeft.backbones.pretrained_weights.PretrainedWeights`, which knows these objects),
written by rank 0 alone; a sharded run resumes from a one-process checkpoint and the other way
round. Values loaded or changed while gathered are copied into the shards when training starts
again (:meth:`_Sharding.scatter`); ``nn.Module.to`` moves the shards (``Strategy._apply`` uses
:func:`scattered`).

**Memory.** The whole model is on each device when it is built (before :func:`shard`) and while it
is evaluated; sharding lowers what training holds (the parameters, their gradients and the
optimizer state to ``1 / N``, plus one gathered layer at a time). ``eval.baseline`` is refused:
it evaluates a deep copy of the strategy, which FSDP refuses to make.

Only the strategies in :data:`SUPPORTED` are sharded; the others (those that call the net
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

__all__ = ["SUPPORTED", "follow_mode", "shard", "sharded_step", "scattered", "training_parameters"]

_KEY = "train.sharding"
#: Strategies checked to train sharded as in one process: one forward of the net per step, their
#: optimizer groups from the base class, no functional calls of the net, no parameters replaced.
SUPPORTED = ("seq_finetune", "replay", "joint")


def shard(strategy: nn.Module, world: distributed.World, cfg, device: torch.device) -> None:
    """Apply FSDP2 to ``strategy.backbone.net`` (``cfg.train.sharding: fsdp`` with several ranks); leave it gathered (eval mode).

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
    strategy.backbone.net.clpeft_sharding = _Sharding(strategy.backbone.net, world, device)
    strategy.eval()


class _Sharding:
    """One sharded net: its FSDP units (the root first, then the decoder layers) and, for every
    parameter, the module's own ``nn.Parameter``, which holds the gathered values outside training."""

    def __init__(self, net: nn.Module, world: distributed.World, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard  # imported here: 1.5 s, for sharded runs only

        layers = getattr(getattr(net, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise UserError(f"fsdp finds no decoder layers (model.layers) in {type(net).__name__}; use none", key=_KEY)
        originals = {(id(m), n): p for m in net.modules() for n, p in m.named_parameters(recurse=False)}
        mesh = init_device_mesh(device.type, (world.size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        self.world = world
        self.units = [net, *layers]
        self.pairs = [(r, originals[id(r._module_info.module), r._module_info.param_name]) for r in self._records()]
        self.originals = {id(record): original for record, original in self.pairs}
        for record, original in self.pairs:  # memory: the whole model lives in the shards until gathered
            original.data = original.data.new_empty(0)
            record._post_load_hook_handle.remove()  # loads happen while gathered; scatter() reaches the shards
        self.gathered = False

    def _records(self) -> Iterator:
        for unit in self.units:
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                yield from group.fsdp_params

    def gather(self) -> None:
        """Every rank all-gathers the whole model, unit by unit, into the module's own parameters (plain tensors)."""
        if self.gathered:
            return
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)  # forwards while gathered: no collectives
            unit.unshard()
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                for handle in (  # state dicts of the gathered tensors, not of the shards
                    *group._module_to_pre_save_state_dict_hook_handle.values(),
                    *group._module_to_pre_load_state_dict_hook_handle.values(),
                ):
                    handle.remove()
                with torch.no_grad():
                    for record in group.fsdp_params:
                        original = self.originals[id(record)]
                        original.data = record._unsharded_param.detach().clone()
                        record._setattr_on_modules(original)
                        record.free_unsharded_param()  # one copy of the unit at a time
        self.gathered = True

    def scatter(self) -> None:
        """Copy the gathered values (changed by a load or a hook) into this rank's chunks; register the shards again."""
        if not self.gathered:
            return
        with torch.no_grad():
            for record, original in self.pairs:
                local = record.sharded_param._local_tensor
                if local.numel():
                    local.copy_(torch.chunk(original.detach(), self.world.size, dim=0)[self.world.rank][: local.shape[0]])
                original.data = original.data.new_empty(0)
        for unit in self.units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not self.units[0], recurse=False)  # the root keeps its weights for backward
        self.gathered = False


def _of(strategy: nn.Module) -> _Sharding | None:
    """The sharding of the strategy's net (``None``: not sharded)."""
    return getattr(getattr(getattr(strategy, "backbone", None), "net", None), "clpeft_sharding", None)


def follow_mode(strategy: nn.Module, training: bool) -> None:
    """Shards in train mode, the whole model gathered in eval mode (no-op when not sharded).

    Every rank switches mode at the same points of the run, so the all-gathers match.
    """
    sharding = _of(strategy)
    if sharding is not None:
        sharding.scatter() if training else sharding.gather()


@contextmanager
def scattered(strategy: nn.Module):
    """The shards registered for the block (``nn.Module.to`` and the like move them), then gathered again if they were."""
    sharding = _of(strategy)
    was = sharding is not None and sharding.gathered
    if was:
        sharding.scatter()
    try:
        yield
    finally:
        if was:
            sharding.gather()


def training_parameters(strategy: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer updates: a sharded net's shards (whatever the mode), else the registered ones."""
    sharding = _of(strategy)
    shards = {id(original): record.sharded_param for record, original in sharding.pairs} if sharding is not None else {}
    return [shards.get(id(p), p) for p in strategy.parameters()]


def sharded_step(strategy: nn.Module):
    """``step(batch, weight) -> weighted loss`` for a sharded strategy (FSDP reduces the gradients), else ``None``."""
    if _of(strategy) is None:
        return None
    backbone = strategy.backbone

    def step(batch, weight: float) -> torch.Tensor:
        if len(batch.y) == 0:  # an empty share: the same collectives as the other ranks, zero gradients
            token = torch.full((1, 1), backbone.pad_id, dtype=torch.long, device=backbone.device)
            return backbone.net(input_ids=token, use_cache=False).logits.sum() * 0.0
        return strategy.training_step(batch) * weight

    return step
