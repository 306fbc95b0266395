"""AdaMerging on a tiny synthetic three-task problem built so that the paper's premise holds.

Each task reads its own block of inputs; the first layer is block-diagonal (hidden block t sees
input block t only), so fine-tuning on task t moves only block t of the first layer and the
columns of the second layer fed by it. Task vectors then interfere only through the shared
second-layer bias. The best coefficients are near 1, task arithmetic's 0.3 under-applies every
task vector, and the merged model is least uncertain where it is most accurate, which is what
entropy minimisation needs. (With fully shared hidden units the synthetic tasks interfere
everywhere and entropy minimisation is not reliably better than task arithmetic.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clpeft.errors import UserError
from clpeft.merging import adamerging, functional_forward, merge
from clpeft.merging.methods.adamerging import entropy

TASKS, BLOCK, HIDDEN, CLASSES, TRAIN = 3, 4, 8, 3, 1000


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    backbone = nn.Sequential(nn.Linear(TASKS * BLOCK, TASKS * HIDDEN, bias=False), nn.ReLU(), nn.Linear(TASKS * HIDDEN, 16), nn.ReLU())
    with torch.no_grad():
        backbone[0].weight.mul_(torch.block_diag(*[torch.ones(HIDDEN, BLOCK)] * TASKS))
    base = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    tasks, finetuned, heads = [], [], []
    for t in range(TASKS):
        x = torch.zeros(TRAIN + 200, TASKS * BLOCK)
        x[:, t * BLOCK : (t + 1) * BLOCK] = torch.randn(TRAIN + 200, BLOCK, generator=generator)
        y = (x[:, t * BLOCK : (t + 1) * BLOCK] @ torch.randn(BLOCK, CLASSES, generator=generator)).argmax(1)
        tasks.append((x, y))
        backbone.load_state_dict(base)
        head = nn.Linear(16, CLASSES)
        optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=2e-2)
        for _ in range(100):
            batch = torch.randint(0, TRAIN, (64,), generator=generator)
            loss = nn.functional.cross_entropy(head(backbone(x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        finetuned.append({k: v.detach().clone() for k, v in backbone.state_dict().items()})
        heads.append(head.requires_grad_(False))
    forward = functional_forward(backbone.requires_grad_(False), heads)
    # unlabeled test batches of 16, as in the paper
    loaders = [[x[TRAIN + 16 * i : TRAIN + 16 * (i + 1)] for i in range(12)] for x, _ in tasks]
    return base, finetuned, forward, loaders, tasks


def accuracy(forward, state_dict, tasks) -> float:
    correct = [(forward(state_dict, t, x[TRAIN:]).argmax(1) == y[TRAIN:]).float().mean() for t, (x, y) in enumerate(tasks)]
    return float(sum(correct) / len(correct))


def mean_entropy(forward, state_dict, tasks) -> float:
    return float(sum(entropy(forward(state_dict, t, x[TRAIN:])).mean() for t, (x, _) in enumerate(tasks)))


def test_adamerging_lowers_entropy_and_beats_task_arithmetic(problem):
    base, finetuned, forward, loaders, tasks = problem
    task_arithmetic = merge(base, finetuned, "task_arithmetic", scale=0.3)  # the paper's task-arithmetic setting
    result = adamerging(base, finetuned, forward=forward, loaders=loaders, steps=100, lr=0.05)
    assert result.entropy[-1] < 0.5 * result.entropy[0]
    assert mean_entropy(forward, result.state_dict, tasks) < mean_entropy(forward, task_arithmetic, tasks)
    assert accuracy(forward, result.state_dict, tasks) > accuracy(forward, task_arithmetic, tasks) + 0.05
    assert set(result.coefficients) == set(base)
    assert all(0.0 <= c <= 1.0 for cs in result.coefficients.values() for c in cs)


def test_task_wise_coefficients_and_merge_entry_point(problem):
    base, finetuned, forward, loaders, _ = problem
    result = adamerging(base, finetuned, forward=forward, loaders=loaders, steps=5, lr=0.05, granularity="task")
    assert len({tuple(c) for c in result.coefficients.values()}) == 1  # one lambda_k per task, shared by all tensors
    via_merge = merge(base, finetuned, "adamerging", forward=forward, loaders=loaders, steps=5, lr=0.05, granularity="task")
    assert all(torch.equal(via_merge[n], result.state_dict[n]) for n in base)
    name = "2.weight"
    lam = torch.tensor(result.coefficients[name])
    expected = base[name] + sum(c * (m[name] - base[name]) for c, m in zip(lam, finetuned))
    torch.testing.assert_close(result.state_dict[name], expected)


def test_adamerging_input_errors(problem):
    base, finetuned, forward, loaders, _ = problem
    with pytest.raises(UserError, match="2 data loaders for 3 models"):
        adamerging(base, finetuned, forward=forward, loaders=loaders[:2], steps=1)
    with pytest.raises(UserError, match="yields no batches"):
        adamerging(base, finetuned, forward=forward, loaders=[[], [], []], steps=1)
    with pytest.raises(UserError, match="unknown parameter of merge method 'adamerging'"):
        merge(base, finetuned, "adamerging", forward=forward, loaders=loaders, step=1)
