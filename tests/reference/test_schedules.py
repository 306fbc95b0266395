"""``train.schedule: quarter_cosine`` against CODA-Prompt's and InfLoRA's ``CosineSchedule``.

Both official trainers build ``CosineSchedule(optimizer, K=epochs)`` and step it once per epoch
after the first (``coda-prompt/learners/default.py``: ``if epoch > 0: self.scheduler.step()``;
``inflora/methods/inflora.py``: ``scheduler.step()`` after each epoch, importing the same
``utils/schedulers.py``, which the InfLoRA folder here does not ship). The class resets its epoch
counter to -1 after construction, so epochs 0 and 1 both train at the full rate and epoch ``e >= 1``
at ``lr * cos(99 pi (e - 1) / (200 (K - 1)))``. clpeft steps its scheduler after every optimizer
step; the learning rate of every step must be the reference's for that step's epoch.
Tolerance: 1e-12 (the same float64 formula). Mutation checks (done once): 99 -> 100, or dropping the
one-epoch lag, in ``clpeft.training.make_scheduler`` fails the first test.
"""

from __future__ import annotations

import pytest
import torch

from clpeft.config import TrainConfig
from clpeft.training import make_scheduler


def _per_step_lrs(epochs: int, steps_per_epoch: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = make_scheduler(optimizer, TrainConfig(epochs=epochs, lr=0.01, schedule="quarter_cosine"), steps_per_epoch)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _reference_per_epoch(module, epochs: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = module.CosineSchedule(optimizer, K=epochs)
    lrs = []
    for epoch in range(epochs):
        if epoch > 0:
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize(("epochs", "steps"), [(20, 3), (5, 1), (2, 7)])
def test_quarter_cosine_is_the_official_per_epoch_schedule(load_reference, epochs, steps):
    with load_reference("coda-prompt", "utils.schedulers") as module:
        expected = _reference_per_epoch(module, epochs)
    got = _per_step_lrs(epochs, steps)
    assert got == pytest.approx([lr for lr in expected for _ in range(steps)], abs=1e-12)


def test_one_epoch_keeps_the_learning_rate():
    assert _per_step_lrs(1, 4) == [0.01] * 4  # the reference divides by K - 1 = 0 here
