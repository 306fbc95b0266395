"""Data-parallel runs under ``torchrun``: the process group, its collectives, what is synchronised.

``torchrun --nproc_per_node N -m clpeft run CONFIG`` starts ``N`` copies of the run; the engine
joins them in one process group (NCCL on CUDA, gloo on CPU), each on its own device
(``cuda:LOCAL_RANK``). ``train.batch_size`` stays the **global** batch: every rank walks the
same shuffled order and takes positions ``rank, rank + N, ...`` of each global batch.

What is synchronised, so that results do not depend on the number of processes beyond the
order of floating-point sums:

- **gradients**: :class:`~torch.nn.parallel.DistributedDataParallel` averages them over ranks.
  Each rank's loss is weighted by ``n_rank * N / n_batch`` first, so the average is the mean
  over the global batch even when its last batch does not split evenly (also exact for
  regularisers added once per batch, e.g. EWC's penalty). With ``train.sharding: fsdp`` a
  generative LLM's parameters, gradients and optimizer state are sharded instead, and FSDP2
  reduce-scatters the gradients (:mod:`clpeft.fsdp`).
- **training loss** (logged, and checked for NaN/inf on every rank): all-reduced sum of
  ``loss * n_rank`` and ``n_rank``.
- **evaluation**: each rank scores its share of every test set; correct counts are all-reduced.
- **class statistics** (:class:`~clpeft.components.heads.class_statistics.ClassStatistics`: counts,
  means, scatter; SimpleCIL, FSA-LDA, fscil_proto, APER, SLCA's alignment): each rank
  accumulates its share of the experience, then every rank gathers all shares and merges them in
  rank order (:meth:`ClassStatistics.gathered`).
- **prompt-selection counts** (:class:`~clpeft.components.prompts.prompt_pool.PromptPool`, L2P's
  diversity frequencies): all-reduced sum after each experience.
- **buffers** changed by training on local batches (BatchNorm running statistics): rank 0's
  values are broadcast after each experience, as DDP's ``broadcast_buffers`` does.

Everything else (replay memories, EMA teachers, closed-form heads, RanPAC's ridge statistics,
EWC's Fisher) is computed identically on every rank from the same seeds and the same
synchronised inputs. After every experience the engine compares a digest of each rank's full
state with rank 0's and stops with the name of the first tensor that differs
(:func:`check_consistent`), so a strategy that forgot to synchronise something cannot silently
produce results that depend on the world size.

Test-time adaptation is online and sequential; it runs in one process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clpeft.errors import RunError, UserError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (``rank 0 of 1`` without ``torchrun``)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints and metrics."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place; returns it."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def shard(self, positions: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``positions``: every ``size``-th one, starting at ``rank``."""
        return positions[self.rank :: self.size] if self.active else positions


def current() -> World:
    """The world of the initialised process group (a single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when started directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; start the run with torchrun") from None


def require_one_process(method: str, reason: str) -> None:
    """Refuse a ``torchrun`` launch of ``method`` in one line; ``reason`` says what would differ across ranks.

    Strategies call it in ``__init__`` (they are built before training starts) when their state
    cannot be kept equal on every rank: e.g. a reservoir each rank fills with its own draws.
    """
    if launched_size() > 1:
        raise UserError(f"{method} runs in one process: {reason}; start it without torchrun", key="strategy.name")


def init_from_env(device: str) -> tuple[World, str]:
    """Join the process group ``torchrun`` describes (if any, and not joined yet).

    Returns the world and the device this rank uses: ``cuda:LOCAL_RANK`` under ``torchrun``
    when ``device`` is ``auto`` or ``cuda``, else ``device`` unchanged.
    """
    size = launched_size()
    if size <= 1:
        return current(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise UserError(
                f"rank {os.environ.get('RANK')} wants cuda:{local_rank} but this node has "
                f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current(), device


def shutdown() -> None:
    """Leave the process group (at the end of ``clpeft run``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def state_digests(module: torch.nn.Module) -> dict[str, str]:
    """A short digest of every tensor in ``module.state_dict()`` (bytes and shape)."""
    out = {}
    for name, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            data = value.detach().to("cpu").contiguous()
            h = hashlib.sha1(str((tuple(data.shape), str(data.dtype))).encode())
            h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            out[name] = h.hexdigest()[:16]
    return out


def check_consistent(world: World, module: torch.nn.Module, where: str) -> None:
    """Stop the run if any rank's state differs from rank 0's (names the first tensor)."""
    if not world.active:
        return
    mine = state_digests(module)
    reference = world.broadcast_object(mine)
    differing = sorted(k for k in set(mine) | set(reference) if mine.get(k) != reference.get(k))
    flag = world.all_reduce_sum(torch.tensor([float(bool(differing))]))
    if flag.item() > 0:
        detail = f"rank {world.rank} differs from rank 0 in {differing[:3]}" if differing else "another rank differs from rank 0"
        raise RunError(
            f"the ranks' states diverged after {where} ({detail}); a component updated state from its "
            f"local batches without synchronising it (see clpeft.distributed)"
        )


def broadcast_buffers(world: World, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics updated on local batches)."""
    if world.active:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)
