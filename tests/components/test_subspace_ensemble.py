"""EASE's prototype complement and subspace-ensemble logits against hand-built cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clpeft.components.heads.subspace_ensemble import complement_prototypes, subspace_ensemble_logits


def _setup():
    torch.manual_seed(0)
    task = torch.tensor([0, 0, 1, 1, 2, 2])
    prototypes = torch.randn(6, 3, 4, dtype=torch.float64)
    real = torch.arange(3)[None] <= task[:, None]  # (C, n): subspaces 0..task of each class are real
    return task, prototypes * real[..., None], real


def _complement(prototypes, task, i, j):
    """Eq. 7-8 for task i's classes in subspace j, by hand: the classes of tasks >= j, similarity in subspace i."""
    known = (task >= j).nonzero().flatten().tolist()
    out = []
    for c in (task == i).nonzero().flatten().tolist():
        sims = torch.tensor([F.cosine_similarity(prototypes[c, i], prototypes[k, i], dim=0) for k in known])
        out.append(sum(w * prototypes[k, j] for w, k in zip(sims.softmax(0), known, strict=True)))
    return torch.stack(out)


def test_complement_fills_every_later_subspace_from_the_classes_that_have_it():
    task, prototypes, real = _setup()
    filled = prototypes.clone()
    complement_prototypes(filled, task, 3, recompute=True)
    assert torch.equal(filled[real], prototypes[real])  # real prototypes untouched
    for i, j in ((0, 1), (0, 2), (1, 2)):
        torch.testing.assert_close(filled[task == i, j], _complement(prototypes, task, i, j))


def test_without_recompute_earlier_complements_keep_the_classes_of_their_time():
    """recompute=False (PILOT's recalc_sim: false) fills only the new subspace: task 0's prototype in
    subspace 1, complemented when task 1 was the last, is not redone with task 2's classes."""
    task, prototypes, _ = _setup()
    at_task_1 = prototypes.clone()
    complement_prototypes(at_task_1[:4], task[:4], 2, recompute=False)
    kept, redone = at_task_1.clone(), at_task_1.clone()
    complement_prototypes(kept, task, 3, recompute=False)
    complement_prototypes(redone, task, 3, recompute=True)
    torch.testing.assert_close(kept[:2, 1], _complement(prototypes[:4], task[:4], 0, 1))
    assert not torch.allclose(kept[:2, 1], redone[:2, 1])
    torch.testing.assert_close(kept[:, 2], redone[:, 2])


def test_logits_weight_the_own_subspace_one_and_the_others_alpha_over_the_task_index():
    task, prototypes, _ = _setup()
    complement_prototypes(prototypes, task, 3)
    features = torch.randn(2, 3, 4, dtype=torch.float64)
    logits = subspace_ensemble_logits(features, prototypes, task, alpha=0.3)
    for b in range(2):
        for c in range(6):
            cos = [F.cosine_similarity(features[b, j], prototypes[c, j], dim=0) for j in range(3)]
            expected = sum(cos[j] * (1.0 if j == task[c] else 0.3 / 2) for j in range(3))
            torch.testing.assert_close(logits[b, c], expected)
