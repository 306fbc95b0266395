"""Knowledge distillation from a frozen copy of the model.

Learning without Forgetting's old-task loss (Li & Hoiem, ECCV 2016 / TPAMI 2017,
https://arxiv.org/abs/1606.09282, eq. 2): a cross-entropy between the temperature-``T``
softmaxes of the recorded (teacher) and current (student) outputs, after Hinton et al.,
"Distilling the Knowledge in a Neural Network", 2015 (https://arxiv.org/abs/1503.02531).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))``, averaged over the batch (computed in float32 or wider).

    LwF's ``L_old = -sum y'_o log y^'_o`` (eq. 2) minus the teacher's entropy, a constant: the
    same gradients. Like the paper, Avalanche's ``LearningWithoutForgetting`` and Mammoth's
    ``lwf``, there is no ``T^2`` factor (Hinton et al. add one to keep gradient magnitudes
    comparable across temperatures; with it, ``alpha`` would weigh the loss ``T^2`` times more
    than the paper's ``lambda_o``). Only the first ``teacher_logits.shape[1]`` student outputs
    are compared, so a student with a grown head distils on the teacher's classes.
    """
    n = teacher_logits.shape[1]
    log_p = F.log_softmax(student_logits[:, :n].float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off and eval mode on, for use as a teacher."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
