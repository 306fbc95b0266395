"""CODA-Prompt's attention-weighted prompt components.

Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning", CVPR 2023 (https://arxiv.org/abs/2211.13218), Sec. 4. At each prompted
layer a prompt is a weighted sum of ``M`` components ``P_m`` (``L_p x D``), weighted by how well
the query ``q(x)`` (the frozen model's [CLS] feature), seen through the attention vector ``A_m``,
matches the key ``K_m`` (eqs. 3-5)::

    alpha_m = cos(q(x) * A_m, K_m)        (* elementwise)
    p = sum_m alpha_m P_m

and ``p`` is used by prefix-tuning: its first ``L_p / 2`` rows are prefix keys, the rest prefix
values (as in the official code, GT-RIPL/CODA-Prompt). ``alpha`` is computed without the
``(B, M, D)`` tensor ``q * A``: ``cos(q * A_m, K_m) = sum_d q_d A_md K_md / (|q * A_m| |K_m|)`` with
``|q * A_m|^2 = sum_d q_d^2 A_md^2``, two ``(B, D) x (D, M)`` products.

Continual growth (Sec. 4.2): the components are split between tasks. Each new task adds its own
``P``, ``K`` and ``A`` rows and freezes those of the earlier tasks (``requires_grad`` is turned
off, so no optimizer touches them). The new rows are initialised orthonormal to each other and
to every earlier row (Gram-Schmidt on Gaussian draws, per layer; a prompt component counts as
one ``L_p * D`` vector), and the optional regulariser (eq. 6) keeps them near-orthogonal::

    L_ortho(B) = mean((B B^T - I)^2)   for B in {P, K, A}, summed over layers

(the official code's ``ortho_penalty``; it weighs the whole ``B`` while only the current task's
rows receive gradient).

The initialisation draws what the official ``CodaPrompt.process_task_count`` draws: per layer the
keys, then the attention vectors, then the prompts, one Gaussian vector per new row in the rows'
dtype, so a seeded init repeats the official one. Its Gram-Schmidt is classical: each draw
minus its projections on every earlier row, taken one by one. That is exact while the earlier
rows are orthogonal (the first task's), but trained rows of earlier tasks are not, and then its
new rows are orthogonal neither to them nor to each other. Here the draws
lose their whole projection on the span of the earlier rows before they are orthonormalised
(with Gram-Schmidt's signs), so the new rows are exactly orthogonal to the earlier ones, as
the paper intends; with orthonormal earlier rows both give the same rows
(``tests/reference/test_coda_prompt.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def orthonormal_complement(existing: torch.Tensor, n_new: int) -> torch.Tensor:
    """``n_new`` unit rows orthogonal to each other and to every row of ``existing`` ``(n_old, d)``.

    One Gaussian draw per new row, in ``existing``'s dtype (as the official code draws them),
    with the span of ``existing`` projected out, then orthonormalised in float64 by QR with
    Gram-Schmidt's signs (each row keeps a positive component along its own draw). Needs
    ``n_old + n_new <= d``.
    """
    n_old, d = existing.shape
    if n_old + n_new > d:
        raise ValueError(f"{n_old} + {n_new} components cannot be orthogonal in {d} dimensions")
    draws = torch.stack([torch.randn(d, device=existing.device, dtype=existing.dtype) for _ in range(n_new)])
    draws = draws.double()
    if n_old:
        basis = torch.linalg.qr(existing.detach().double().T).Q  # (d, n_old)
        draws = draws - (draws @ basis) @ basis.T
    q, r = torch.linalg.qr(draws.T)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).T.to(existing.dtype)


def orthogonality_penalty(rows: torch.Tensor) -> torch.Tensor:
    """``mean((B B^T - I)^2)`` for ``B = rows`` ``(n, d)`` (CODA-Prompt eq. 6)."""
    gram = rows @ rows.T
    return (gram - torch.eye(len(rows), device=rows.device, dtype=rows.dtype)).pow(2).mean()


class _TaskComponents(nn.Module):
    """One task's components at every prompted layer: ``P`` (layer, n, L, D), ``K`` and ``A`` (layer, n, Dk)."""

    def __init__(self, n_layers: int, n: int, length: int, embed_dim: int, key_dim: int, like: torch.Tensor | None):
        super().__init__()
        where = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.prompts = nn.Parameter(torch.zeros(n_layers, n, length, embed_dim, **where))
        self.keys = nn.Parameter(torch.zeros(n_layers, n, key_dim, **where))
        self.attention = nn.Parameter(torch.zeros(n_layers, n, key_dim, **where))


class AttentionPromptPool(nn.Module):
    """Prompt components combined per input by attention over keys; grows by a block per task.

    Args:
        layers: the prompted layers (prefix-tuning), e.g. ``[0, 1, 2, 3, 4]``.
        embed_dim: ``D``, width of prefix keys/values.
        length: ``L_p``, prompt length (even: half prefix keys, half prefix values).
        components_per_task: components added for each task (``M / T`` in the paper's terms).
        key_dim: width of keys, attention vectors and queries (``D`` by default).
    """

    def __init__(self, layers: Sequence[int], embed_dim: int, length: int, components_per_task: int, key_dim: int | None = None):
        super().__init__()
        if length % 2:
            raise ValueError(f"prompt length must be even (half keys, half values), got {length}")
        self.layers = list(layers)
        self.embed_dim = embed_dim
        self.length = length
        self.components_per_task = components_per_task
        self.key_dim = key_dim or embed_dim
        self.tasks = nn.ModuleList()

    def _new_task(self) -> _TaskComponents:
        """A zero block on the device and in the dtype of the earlier ones."""
        like = self.tasks[0].prompts if len(self.tasks) else None
        return _TaskComponents(len(self.layers), self.components_per_task, self.length, self.embed_dim, self.key_dim, like)

    @torch.no_grad()
    def add_task(self) -> None:
        """Freeze the components so far and add the next task's, orthonormal to all earlier ones."""
        for old in self.tasks:
            old.requires_grad_(False)
        new = self._new_task()
        old_p, old_k, old_a = (self._stacked(name) for name in ("prompts", "keys", "attention"))
        n = self.components_per_task
        for i in range(len(self.layers)):  # the official order of draws: K, A, then P
            new.keys[i] = orthonormal_complement(old_k[i], n)
            new.attention[i] = orthonormal_complement(old_a[i], n)
            new.prompts[i] = orthonormal_complement(old_p[i].flatten(1), n).view(n, self.length, self.embed_dim)
        self.tasks.append(new)

    def _stacked(self, name: str) -> torch.Tensor:
        """``name`` of every task, concatenated along the component axis (``(layer, M, ...)``)."""
        if not len(self.tasks):
            shapes = {"prompts": (self.length, self.embed_dim), "keys": (self.key_dim,), "attention": (self.key_dim,)}
            return torch.zeros(len(self.layers), 0, *shapes[name])
        return torch.cat([getattr(t, name) for t in self.tasks], dim=1)

    def weights(self, query: torch.Tensor) -> torch.Tensor:
        """``alpha = cos(q * A_m, K_m)`` for every layer, query and component: ``(layer, B, M)``."""
        q = query.to(self.tasks[0].keys.dtype)
        keys = self._stacked("keys")
        attention = self._stacked("attention")
        unit_keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        dot = torch.einsum("bd,lmd->lbm", q, attention * unit_keys)
        norm = torch.einsum("bd,lmd->lbm", q.square(), attention.square()).sqrt().clamp_min(1e-12)
        return dot / norm

    def forward(self, query: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Prefixes ``{layer: (keys, values)}``, each ``(B, L_p / 2, D)``, for queries ``(B, Dk)``."""
        if not len(self.tasks):
            raise RuntimeError("the pool has no components yet: call add_task() first")
        prompts = torch.einsum("lbm,lmtd->lbtd", self.weights(query), self._stacked("prompts"))
        half = self.length // 2
        return {layer: (p[:, :half], p[:, half:]) for layer, p in zip(self.layers, prompts)}

    def orthogonality_loss(self) -> torch.Tensor:
        """``L_ortho`` of ``P``, ``K`` and ``A``, summed over the layers (eq. 6)."""
        total = 0.0
        for name in ("prompts", "keys", "attention"):
            for rows in self._stacked(name):
                total = total + orthogonality_penalty(rows.flatten(1))
        return total

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint taken after task t holds t + 1 blocks: build them before loading
        stored = {key[len(prefix) :].split(".")[1] for key in state_dict if key.startswith(prefix + "tasks.")}
        while len(self.tasks) < len(stored):
            self.tasks.append(self._new_task())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
