"""Temporally correlated labels in a test stream: the Dirichlet ordering of non-i.i.d. test-time adaptation.

Gong et al., "NOTE: Robust Continual Test-time Adaptation Against Temporal Correlation",
NeurIPS 2022 (https://arxiv.org/abs/2208.05117), section 5.1, as Döbler et al.'s benchmark
samples it (``sort_by_dirichlet`` in ``datasets/data_loading.py``, its ``correlated`` settings
with ``TEST.DELTA_DIRICHLET``): with ``C`` classes, ``N`` samples and concentration ``delta``,

1. for each class ``k`` in turn: shuffle its samples, draw proportions ``q ~ Dir(delta 1_C)`` over
   ``C`` chunks, zero those of chunks already holding ``N / C`` samples or more, renormalise and
   split the class's samples among the chunks in those proportions (floored cumulative counts);
2. repeat 1 until every chunk holds at least 10 samples;
3. the stream is the chunks in order, each chunk's class groups in a random order.

Small ``delta`` gives long runs of one class (the benchmark's ImageNet-C value is 0.01); large
``delta`` approaches an i.i.d. order. Draws come from a numpy ``RandomState`` in the reference's
order (seeded like numpy's global generator, it gives the reference's sequence). The reference
gives up after 120 seconds of redraws; here after ``MAX_DRAWS`` rounds.
"""

from __future__ import annotations

import numpy as np

from clpeft.errors import UserError

MIN_CHUNK = 10
MAX_DRAWS = 10_000


def dirichlet_order(labels: np.ndarray, concentration: float, rng: np.random.RandomState) -> np.ndarray:
    """Positions ``0 .. N - 1`` of ``labels`` in the temporally correlated order (see the module docstring).

    Raises:
        UserError: the stream is too short for chunks of ``MIN_CHUNK`` samples, or no draw gave them.
    """
    labels = np.asarray(labels)
    n, classes = len(labels), int(labels.max()) + 1
    if n < MIN_CHUNK * classes:
        raise UserError(
            f"label_shift: dirichlet needs at least {MIN_CHUNK} test samples per class on average "
            f"({MIN_CHUNK * classes} for {classes} classes), got {n}; raise test_per_class",
            key="scenario.label_shift",
        )
    for _ in range(MAX_DRAWS):
        chunks = [[] for _ in range(classes)]
        per_class = [[] for _ in range(classes)]
        for k in range(classes):
            members = np.where(labels == k)[0]
            rng.shuffle(members)
            proportions = rng.dirichlet(np.repeat(concentration, classes))
            proportions = np.array([p * (len(chunk) < n / classes) for p, chunk in zip(proportions, chunks)])
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
            for chunk, group, part in zip(chunks, per_class, np.split(members, cuts)):
                chunk.extend(part.tolist())
                group.append(part)
        if min(len(chunk) for chunk in chunks) >= MIN_CHUNK:
            break
    else:
        raise UserError(
            f"no Dirichlet ordering with chunks of at least {MIN_CHUNK} samples in {MAX_DRAWS} draws at "
            f"concentration {concentration}; raise dirichlet_concentration",
            key="scenario.dirichlet_concentration",
        )
    order = []
    for groups in per_class:
        sequence = list(range(classes))
        rng.shuffle(sequence)
        for k in sequence:
            order.extend(groups[k].tolist())
    return np.asarray(order, dtype=np.int64)
