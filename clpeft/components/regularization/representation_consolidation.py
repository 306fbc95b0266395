"""DUCT's representation consolidation: every task fine-tunes from the pre-trained weights, and the
backbone is the pre-trained one plus the sum of the tasks' weighted task vectors.

Zhou, Cai, Ye, Zhang & Zhan, "Dual Consolidation for Pre-Trained Model-Based Domain-Incremental
Learning", CVPR 2025 (https://arxiv.org/abs/2410.00911), Sec. 4.2; code: LAMDA-PILOT
``models/duct.py`` ``_stage1_merge_backbone``:

    theta_t = theta_0 + sum_{k <= t} lambda_k (theta*_k - theta_0),   lambda_k = s * mean_c cos(mu_c^0, mu_c^k),

``theta*_k`` the backbone fine-tuned on task ``k`` from ``theta_0``, ``s`` PILOT's ``merge_scalar``
and the cosine between each of the task's classes' feature means before (``mu^0``, pre-trained)
and after fine-tuning (:func:`mean_cosine`): a task whose fine-tuning moved its classes' features
less counts more. Task vectors are task arithmetic's (Ilharco et al., ICLR 2023,
https://arxiv.org/abs/2212.04089).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.regularization.fisher_averaging import TensorSnapshot


def mean_cosine(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over rows of ``cos(before_c, after_c)`` (PILOT's ``_calculate_adjust_ratio``)."""
    return F.cosine_similarity(before.double(), after.double(), dim=1).mean().item()


class TaskVectorSum(nn.Module):
    """The pre-trained parameters ``theta_0`` of a module and the running sum of weighted task vectors.

    Both are kept with the model's state (two module-sized tensor sets, as PILOT's
    ``model_init_vector`` and ``model_merged_vector``).

    Args:
        module: the module (a backbone) whose current parameters are ``theta_0``.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.pretrained, self.merged = TensorSnapshot(), TensorSnapshot()
        parameters = dict(module.named_parameters())
        self.pretrained.store(parameters)
        self.merged.store({name: torch.zeros_like(p) for name, p in parameters.items()})

    @torch.no_grad()
    def restart(self, module: nn.Module) -> None:
        """Put ``theta_0`` back into ``module`` (each task fine-tunes from the pre-trained weights)."""
        pretrained = self.pretrained.tensors()
        for name, p in module.named_parameters():
            p.copy_(pretrained[name])

    @torch.no_grad()
    def add(self, module: nn.Module, weight: float) -> None:
        """Add ``weight (theta* - theta_0)`` of ``module``'s fine-tuned ``theta*`` to the sum, then load
        ``theta_0 + sum`` into ``module``."""
        pretrained, merged = self.pretrained.tensors(), self.merged.tensors()
        for name, p in module.named_parameters():
            merged[name] += (p - pretrained[name]) * weight
            p.copy_(merged[name] + pretrained[name])
