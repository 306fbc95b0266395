"""Prompt pools of L2P, DualPrompt and CODA-Prompt against hand computations (numpy, float64)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clpeft.components.prompts.attention_prompt_pool import AttentionPromptPool, orthonormal_complement
from clpeft.components.prompts.prefix_prompt import PrefixPrompt
from clpeft.components.prompts.prompt_pool import PromptPool


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of every row of ``a`` with every row of ``b``."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


# --------------------------------------------------------------------------------------------
# L2P: PromptPool
# --------------------------------------------------------------------------------------------


def test_selection_follows_the_keys_nearest_first():
    torch.manual_seed(0)
    pool = PromptPool(pool_size=6, length=3, embed_dim=4, top_k=2, key_dim=8)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(8)[:6] * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0], [7.0]]))
    # query b = e_i + 0.5 e_j (+ a little of everything): nearest key i, then j, whatever the key norms
    wanted = [(4, 1), (0, 5), (3, 2), (5, 0)]
    queries = torch.full((4, 8), 0.01)
    for b, (i, j) in enumerate(wanted):
        queries[b, i] += 1.0
        queries[b, j] += 0.5
    selection = pool(queries)
    assert selection.indices.tolist() == [list(w) for w in wanted]
    expected = torch.stack([torch.cat([pool.prompts[i], pool.prompts[j]]) for i, j in wanted])
    assert torch.equal(selection.prompts, expected)  # (B, N * L_p, D), in selection order


def test_selection_and_matching_loss_equal_a_numpy_computation():
    torch.manual_seed(1)
    pool = PromptPool(pool_size=10, length=2, embed_dim=4, top_k=3, key_dim=16)
    queries = torch.randn(7, 16)
    selection = pool(queries)
    cos = _cos(_np(queries), _np(pool.keys))
    expected_idx = np.argsort(-cos, axis=1, kind="stable")[:, :3]
    assert selection.indices.tolist() == expected_idx.tolist()
    expected_loss = np.mean([(1 - cos[b, expected_idx[b]]).sum() for b in range(7)])
    assert selection.matching_loss.item() == pytest.approx(expected_loss, rel=1e-6)
    # the loss trains the selected keys only
    selection.matching_loss.backward()
    grad_rows = set(torch.nonzero(pool.keys.grad.abs().sum(1)).flatten().tolist())
    assert grad_rows == set(expected_idx.flatten().tolist())


def test_batchwise_selection_uses_the_most_frequent_prompts_for_every_sample():
    pool = PromptPool(pool_size=5, length=1, embed_dim=2, top_k=2, key_dim=5, batchwise=True)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(5))
    # per-sample choices: {3, 1}, {3, 4}, {1, 3}, {4, 0} -> counts 3:3, 1:2, 4:2, 0:1 -> (3, 1) (tie 1/4: smaller id)
    queries = torch.tensor([[0, 0.5, 0, 1, 0], [0, 0, 0, 1, 0.5], [0, 1, 0, 0.5, 0], [0.5, 0, 0, 0, 1.0]])
    assert pool(queries).indices.tolist() == [[3, 1]] * 4
    pool.batchwise = False
    assert pool(queries).indices.tolist() == [[3, 1], [3, 4], [1, 3], [4, 0]]


def test_diversity_weights_training_distances_by_past_frequencies():
    pool = PromptPool(pool_size=3, length=1, embed_dim=2, top_k=1, key_dim=2, diversity=True)
    angles = torch.tensor([0.0, 1.0, 2.5])
    with torch.no_grad():
        pool.keys.copy_(torch.stack([angles.cos(), angles.sin()], 1))
    query = torch.tensor([[1.0, 0.1]])  # nearest key 0, then 1, then 2
    # "task 0": training selections are counted ...
    first = [pool(q, train=True).indices.item() for q in (query, query, query, torch.tensor([[0.3, 0.9]]))]
    assert first == [0, 0, 0, 1]  # no frequencies yet: plain nearest keys
    pool.start_task()
    assert pool.frequency.tolist() == [0.75, 0.25, 0.0]
    # ... then weight the distances gamma * h at training time (eq. 4)
    gamma = 1 - _cos(_np(query), _np(pool.keys))[0]
    weighted = gamma * np.array([0.75, 0.25, 0.0])
    assert pool.select(query, train=True).item() == int(np.argmin(weighted)) == 2
    assert pool.select(query, train=False).item() == 0  # inference: eq. 3


# --------------------------------------------------------------------------------------------
# DualPrompt: PrefixPrompt
# --------------------------------------------------------------------------------------------


def _prefix_prompt(**kw) -> PrefixPrompt:
    torch.manual_seed(2)
    prompt = PrefixPrompt(embed_dim=6, pool_size=4, g_layers=[0, 1], e_layers=[2, 3], g_length=2, e_length=3, key_dim=5, **kw)
    with torch.no_grad():
        prompt.e_keys.copy_(torch.eye(5)[:4] + 0.05)
    for task in range(3):
        prompt.start_task(task, copy_previous=False)
    return prompt


def test_e_prompt_is_the_given_task_when_training_and_the_nearest_trained_key_otherwise():
    prompt = _prefix_prompt()
    queries = torch.eye(5)[[2, 0, 1, 3]] + 0.01  # the last one is nearest to key 3, not trained yet
    chosen = prompt(queries)
    cos = _cos(_np(queries), _np(prompt.e_keys))
    assert chosen.tasks.tolist() == [2, 0, 1, int(np.argmax(cos[3, :3]))]
    assert chosen.matching_loss.item() == pytest.approx(np.mean(1 - cos[np.arange(4), chosen.tasks.numpy()]), rel=1e-6)

    training = prompt(queries, task=1)
    assert training.tasks.tolist() == [1, 1, 1, 1]
    assert training.matching_loss.item() == pytest.approx(np.mean(1 - cos[:, 1]), rel=1e-6)
    for i, layer in enumerate([2, 3]):
        keys, values = training.prefixes[layer]
        assert torch.equal(keys, prompt.e_prompts[1, i, 0].expand(4, -1, -1))
        assert torch.equal(values, prompt.e_prompts[1, i, 1].expand(4, -1, -1))
    for i, layer in enumerate([0, 1]):
        assert torch.equal(training.prefixes[layer][0], prompt.g_prompt[i, 0])
        assert torch.equal(training.prefixes[layer][1], prompt.g_prompt[i, 1])
    training.matching_loss.backward()  # only the current task's key learns
    assert torch.nonzero(prompt.e_keys.grad.abs().sum(1)).flatten().tolist() == [1]


def test_new_e_prompt_starts_from_the_previous_one():
    prompt = _prefix_prompt()
    before = prompt.e_prompts.detach().clone()
    prompt.start_task(3, copy_previous=True)
    assert torch.equal(prompt.e_prompts[3], before[2]) and torch.equal(prompt.e_prompts[:3], before[:3])
    assert int(prompt.n_tasks) == 4
    with pytest.raises(ValueError, match="outside the pool"):
        prompt.start_task(4)


def test_batchwise_e_prompt_selection():
    prompt = _prefix_prompt(batchwise=True)
    queries = torch.eye(5)[[2, 0, 2, 1]] + 0.01
    assert prompt(queries).tasks.tolist() == [2, 2, 2, 2]


# --------------------------------------------------------------------------------------------
# CODA-Prompt: AttentionPromptPool
# --------------------------------------------------------------------------------------------


def _coda_pool(tasks: int = 2) -> AttentionPromptPool:
    torch.manual_seed(3)
    pool = AttentionPromptPool(layers=[0, 2], embed_dim=6, length=4, components_per_task=3, key_dim=12)
    for _ in range(tasks):
        pool.add_task()
    return pool


def test_alpha_and_weighted_prompt_equal_a_hand_computation():
    pool = _coda_pool()
    with torch.no_grad():  # leave the orthonormal start, as training does
        for p in pool.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q = torch.randn(5, 12)
    prefixes = pool(q)
    alpha = _np(pool.weights(q))
    qn = _np(q)
    for li, layer in enumerate([0, 2]):
        P = np.concatenate([_np(t.prompts[li]) for t in pool.tasks])  # (M, L, D)
        K = np.concatenate([_np(t.keys[li]) for t in pool.tasks])
        A = np.concatenate([_np(t.attention[li]) for t in pool.tasks])
        expected_alpha = np.array([[_cos((qn[b] * A[m])[None], K[m][None])[0, 0] for m in range(6)] for b in range(5)])
        np.testing.assert_allclose(alpha[li], expected_alpha, rtol=1e-5, atol=1e-6)
        prompt = np.einsum("bm,mld->bld", expected_alpha, P)
        np.testing.assert_allclose(_np(prefixes[layer][0]), prompt[:, :2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(prefixes[layer][1]), prompt[:, 2:], rtol=1e-5, atol=1e-6)


def test_new_components_are_orthonormal_to_all_earlier_ones_and_earlier_ones_freeze():
    pool = _coda_pool(tasks=1)
    with torch.no_grad():  # "training" moves the first task's rows off their orthonormal start
        for p in pool.tasks[0].parameters():
            p.add_(0.2 * torch.randn_like(p))
    trained = copy.deepcopy(pool.tasks[0].state_dict())
    pool.add_task()
    assert all(not p.requires_grad for p in pool.tasks[0].parameters())
    assert all(p.requires_grad for p in pool.tasks[1].parameters())
    assert all(torch.equal(v, pool.tasks[0].state_dict()[k]) for k, v in trained.items())
    for name in ("prompts", "keys", "attention"):
        for li in range(2):
            new = _np(getattr(pool.tasks[1], name)[li].flatten(1))
            old = _np(getattr(pool.tasks[0], name)[li].flatten(1))
            np.testing.assert_allclose(new @ new.T, np.eye(3), atol=1e-5)
            np.testing.assert_allclose(new @ old.T, 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be orthogonal"):
        orthonormal_complement(torch.randn(7, 8), 2)


def test_orthogonality_loss_equals_numpy():
    pool = _coda_pool()
    with torch.no_grad():
        pool.tasks[1].keys.add_(0.5)
    expected = 0.0
    for name in ("prompts", "keys", "attention"):
        for li in range(2):
            B = np.concatenate([_np(getattr(t, name)[li].reshape(3, -1)) for t in pool.tasks])
            expected += np.mean((B @ B.T - np.eye(6)) ** 2)
    assert pool.orthogonality_loss().item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.1  # the perturbed keys are far from orthogonal: the check can fail


def test_state_dict_round_trip_rebuilds_every_task_block():
    pool = _coda_pool(tasks=3)
    fresh = AttentionPromptPool(layers=[0, 2], embed_dim=6, length=4, components_per_task=3, key_dim=12)
    fresh.load_state_dict(pool.state_dict())
    q = torch.randn(4, 12)
    assert len(fresh.tasks) == 3
    for layer in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(fresh(q)[layer], pool(q)[layer]))
