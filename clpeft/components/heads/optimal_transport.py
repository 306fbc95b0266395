"""DUCT's classifier consolidation: each older task's head rows moved towards the new task's by entropic optimal transport.

Zhou, Cai, Ye, Zhang & Zhan, "Dual Consolidation for Pre-Trained Model-Based Domain-Incremental
Learning", CVPR 2025 (https://arxiv.org/abs/2410.00911), Sec. 4.3; code: LAMDA-PILOT
``models/duct.py`` ``_stage2_transport_classifier``. For an older task ``o`` and the new task
``n``, with class means ``mu`` of the pre-trained backbone:

    C = ||mu_n,i - mu_o,j||_2,   T = Sinkhorn(1/|n|, 1/|o|, C, reg),
    W_o <- (1 - r) W_o + r T^T W_n

(``T^T W_n`` is not divided by the marginals: a row of it is ``1/|o|`` times a weighted mean of
the new rows, as in PILOT; the paper's cost is the squared distance, PILOT's code the distance). :func:`sinkhorn` is the Sinkhorn-Knopp scaling (Cuturi, "Sinkhorn
Distances: Lightspeed Computation of Optimal Transport", NeurIPS 2013, https://arxiv.org/abs/1306.0895)
as POT's ``ot.sinkhorn`` (method ``sinkhorn``) runs it, written here so that clpeft does not
depend on POT.
"""

from __future__ import annotations

import torch


def sinkhorn(
    a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, max_iterations: int = 1000, threshold: float = 1e-9
) -> torch.Tensor:
    """The entropic transport plan ``diag(u) K diag(v)``, ``K = exp(-cost / reg)``, between marginals ``a`` and ``b``.

    POT's ``sinkhorn_knopp`` step for step (its defaults: 1000 iterations, the right marginal's L2
    error checked every 10th against 1e-9; ``u``, ``v`` in ``cost``'s dtype, ``a`` and ``b`` promoted
    with it). When ``K^T u`` has a zero or a scaling stops being finite (``K`` underflows when
    ``cost / reg`` passes ~745), POT keeps the last finite ``u``, ``v`` and stops; so does this.
    """
    kernel = torch.exp(cost / (-reg))
    u = torch.ones(len(a), dtype=cost.dtype, device=cost.device) / len(a)
    v = torch.ones(len(b), dtype=cost.dtype, device=cost.device) / len(b)
    scaled = (1 / a).reshape(-1, 1) * kernel
    for iteration in range(max_iterations):
        previous = u, v
        mass = kernel.T @ u
        v = b / mass
        u = 1.0 / (scaled @ v)
        if (mass == 0).any() or not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            u, v = previous
            break
        if iteration % 10 == 0 and torch.linalg.norm(torch.einsum("i,ij,j->j", u, kernel, v) - b) < threshold:
            break
    return u.reshape(-1, 1) * kernel * v.reshape(1, -1)


@torch.no_grad()
def transport_old_heads(
    weight: torch.Tensor, means: torch.Tensor, task_of_class: torch.Tensor, new_task: int, reg: float, ratio: float
) -> None:
    """Move every older task's rows of ``weight`` (in place) towards the transported rows of ``new_task``.

    ``means`` (C, D) are the classes' means under the pre-trained backbone, ``task_of_class`` (C,)
    each class's task; ``reg`` is the entropic regulariser (PILOT's ``ot_reg``), ``ratio`` ``r``
    (``head_merge_ratio``). Uniform float32 marginals, float64 costs and plan, as PILOT.
    """
    new = (task_of_class == new_task).nonzero().squeeze(1)
    new_rows = weight[new].double()
    for old_task in range(new_task):
        old = (task_of_class == old_task).nonzero().squeeze(1)
        cost = torch.cdist(means[new], means[old], p=2)
        a = torch.ones(len(new), device=weight.device) / len(new)
        b = torch.ones(len(old), device=weight.device) / len(old)
        plan = sinkhorn(a, b, cost.double(), reg)
        transported = (plan.T @ new_rows).to(weight.dtype)
        weight[old] = (1 - ratio) * weight[old] + ratio * transported
