"""Knowledge distillation from a frozen copy of the model.

Hinton et al., "Distilling the Knowledge in a Neural Network", 2015
(https://arxiv.org/abs/1503.02531); used for continual learning by LwF (Li & Hoiem, 2016).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.,
    section 2). Only the first ``teacher_logits.shape[1]`` student outputs are compared, so a
    student with a grown head distils on the teacher's classes.
    """
    n = teacher_logits.shape[1]
    log_p = F.log_softmax(student_logits[:, :n].float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off and eval mode on, for use as a teacher."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
