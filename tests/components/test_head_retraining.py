"""DUCT's head re-training helpers (``clpeft.components.heads.head_retraining``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.heads.head_retraining import constant_lr_factor, retrain_head


def test_constant_lr_factor_equals_pytorchs_constant_lr_per_epoch():
    """Eight epochs of two groups: the learning rates at every epoch's start equal those of
    ``ConstantLR(factor=1/3, total_iters=5)`` stepped once per epoch (PILOT's use), bit for bit."""
    p = nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.001}], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ConstantLR(reference)
    groups = [{"lr": 0.1}, {"lr": 0.001}]
    for epoch in range(8):
        constant_lr_factor(groups, epoch, 1 / 3, 5)
        assert [g["lr"] for g in groups] == [g["lr"] for g in reference.param_groups]
        reference.step()  # no gradients: only keeps the scheduler's order check quiet
        scheduler.step()


def test_retrain_head_equals_a_plain_sgd_loop():
    """Three epochs with a warm factor of 0.5 over 2 epochs equal a hand-written SGD loop over the
    same ``randperm`` batches (momentum 0.9, weight decay), bit for bit."""
    torch.manual_seed(0)
    features, labels = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ours, theirs = nn.Linear(4, 3), nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    retrain_head(ours, features, labels, F.cross_entropy, 3, 4, 0.1, 1e-3, (0.5, 2), generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(5)
    for epoch in range(3):
        if epoch == 2:
            optimizer.param_groups[0]["lr"] = 0.05 / 0.5
        for batch in torch.randperm(10, generator=g).split(4):
            optimizer.zero_grad()
            F.cross_entropy(theirs(features[batch]), labels[batch]).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
