"""Self-refined adapter retrieval: each test sample finds the adapter of its own task by iterating.

Sun, Zhou, Zhao, Gan, Zhan & Ye, "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental
Learning", AAAI 2025 (https://arxiv.org/abs/2412.09441), Sec. 4.3. With one adapter per task and a
head over every class, a sample's task is unknown at test time. A first guess comes from the
prototype classifier on the first adapter's features (cosine to the class means, the
``forward_orig`` of LAMDA-PILOT ``models/mos.py``); then, repeatedly, the head reads the features of
the adapter of the task the last prediction belongs to, until the predicted task stops changing or
``max_iterations`` head evaluations were made (PILOT: 4). The head's last logits, softmaxed, are
added to the softmax of the first guess's logits times ``t + 1`` (``t + 1`` tasks; the "ensemble")::

    p = softmax(f(phi_k(x))) + softmax((t + 1) cos(phi_0(x), mu))

Every adapter's features come from one batched pass (:func:`clpeft.components.lora.adapter_bank.every_adapter`)
and the head reads them all at once, so the iteration is a gather per sample, not a pass per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def self_refined_logits(
    head_logits: torch.Tensor, first_guess: torch.Tensor, task_of_class: torch.Tensor, max_iterations: int = 4
) -> torch.Tensor:
    """The head's logits ``(B, C)`` at the adapter the iteration stops at.

    Args:
        head_logits: ``(B, n, C)``, the head on every adapter's features.
        first_guess: ``(B, C)``, the logits whose argmax starts the iteration.
        task_of_class: ``(C,)``, the task (adapter) of every class.
        max_iterations: head evaluations at most.
    """
    rows = torch.arange(len(head_logits), device=head_logits.device)
    task = task_of_class[first_guess.argmax(1)]
    done = torch.zeros_like(task, dtype=torch.bool)
    for _ in range(max_iterations - 1):
        new = torch.where(done, task, task_of_class[head_logits[rows, task].argmax(1)])
        done |= new == task
        task = new
    return head_logits[rows, task]


def ensemble(refined: torch.Tensor, first_guess: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """``softmax(refined) + softmax(n_tasks * first_guess)``."""
    return F.softmax(refined, dim=1) + F.softmax(first_guess * n_tasks, dim=1)
