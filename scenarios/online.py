"""Online streams: the scenario keys shared by the online scenarios, and the i-Blurry split.

A scenario with ``online: true`` is learned in one pass (see :mod:`clpeft.online` for the run):
its experiences' ``train`` views, concatenated, are the stream, each experience's samples in a
seeded random order, and labels are renumbered in the order classes first appear in the stream
(so the classes seen after any prefix are ``0..k-1`` and a head grows exactly on first sight).

**i-Blurry-N-M** (Koh et al., "Online Continual Learning on Class Incremental Blurry Task
Configuration with Anytime Inference", ICLR 2022, https://arxiv.org/abs/2110.10031, Sec. 3),
``blurry: {disjoint: N, blurry: M}``, defined here as:

1. every class keeps its experience of the class-incremental split (its *major* experience,
   whose test data it belongs to: the accuracy matrix's columns are unchanged);
2. ``round(N * C / 100)`` of the ``C`` classes, drawn at random, are *disjoint*: all their
   training samples stay in their major experience;
3. every other class is *blurry*: ``round(M * n_c / 100)`` of its ``n_c`` training samples, drawn
   at random, each move to an experience drawn uniformly from the other ``T - 1`` ones; the rest
   stay in its major experience;
4. each experience's training samples are then shuffled.

Every draw comes from one generator seeded by the run seed, so a seed gives one stream. The
official code ships its splits as fixed files (``collections/`` of naver-ai/i-Blurry); this is
the construction its paper describes, written from the paper.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from clpeft.errors import UserError
from clpeft.experience import OnlineProtocol

__all__ = ["Blurry", "blurry_split", "check_online", "first_appearance_order", "online_protocol"]


class Blurry(BaseModel):
    """i-Blurry-N-M: ``disjoint`` = N, ``blurry`` = M, both percentages."""

    model_config = ConfigDict(extra="forbid")

    disjoint: Annotated[int, Field(ge=0, le=100, description="N: percentage of classes that stay in one experience")] = 50
    blurry: Annotated[int, Field(ge=0, le=100, description="M: percentage of a blurry class's samples moved to other experiences")] = 10


def check_online(p: dict, blurry_allowed: bool = True) -> None:
    """The online keys of a scenario's parameters ``p``: set only with ``online: true``, and coherent."""
    if not p.get("online"):
        for key in ("task_free", "blurry"):
            if p.get(key):
                raise UserError("applies to online streams only; set scenario.online: true or remove it", key=f"scenario.{key}")
        return
    if p.get("eval_every", 1) < 1:
        raise UserError(f"must be at least 1 sample, got {p['eval_every']}", key="scenario.eval_every")
    if p.get("blurry") is not None:
        if not blurry_allowed:
            raise UserError("this scenario has no class groups to blur; remove it", key="scenario.blurry")
        if p.get("n_experiences", 2) < 2:
            raise UserError("a blurry stream moves samples to other experiences: set scenario.n_experiences >= 2", key="scenario.blurry")


def online_protocol(online: bool, eval_every: int, task_free: bool) -> OnlineProtocol | None:
    return OnlineProtocol(eval_every, task_free) if online else None


def blurry_split(targets: np.ndarray, groups: list[list[int]], blurry: Blurry | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions into ``targets`` for each experience, in stream order (the i-Blurry split above).

    Args:
        targets: labels of the training samples on offer.
        groups: each experience's (major) classes.
        blurry: N and M; None keeps every class in its experience (i-Blurry-100-0).
        rng: the scenario's generator.
    """
    T = len(groups)
    classes = [c for g in groups for c in g]
    n_disjoint = len(classes) if blurry is None else round(blurry.disjoint * len(classes) / 100)
    disjoint = set(rng.permutation(classes)[:n_disjoint].tolist())
    parts: list[list[np.ndarray]] = [[] for _ in range(T)]
    for t, group in enumerate(groups):
        for c in group:
            own = rng.permutation(np.flatnonzero(targets == c))
            moved = 0 if c in disjoint else round(blurry.blurry * len(own) / 100)
            others = np.array([u for u in range(T) if u != t])
            to = others[rng.integers(0, T - 1, size=moved)] if moved else np.empty(0, dtype=int)
            parts[t].append(own[moved:])
            for u in range(T):
                parts[u].append(own[:moved][to == u])
    return [rng.permutation(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def first_appearance_order(targets: torch.Tensor, stream: list[np.ndarray], n_classes: int) -> torch.Tensor:
    """``mapping[old] = new``: labels renumbered in the order they first appear in ``stream``
    (classes never trained on keep their relative order after those that are)."""
    labels = torch.cat([targets[torch.as_tensor(p, dtype=torch.long)] for p in stream]).tolist()
    order = list(dict.fromkeys(labels))
    order += [c for c in range(n_classes) if c not in set(order)]
    mapping = torch.empty(n_classes, dtype=torch.long)
    mapping[torch.tensor(order)] = torch.arange(n_classes)
    return mapping
