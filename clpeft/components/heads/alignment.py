"""Classifier alignment (CA) with per-class Gaussian feature statistics.

Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023 (https://arxiv.org/abs/2303.05118), section 4.2.
After each task, every class ``c`` seen so far is modelled by a Gaussian ``N(mu_c, Sigma_c)``
of its features (computed when its task ended: no old data is kept), and the classifier is
re-trained on features sampled from all of them:

* ``Sigma_c`` is the unbiased covariance plus ``1e-4 I`` (``ridge``), as in the official code
  (GengDavid/SLCA ``models/base.py``);
* the official code shrinks older tasks' means, sampling around ``mu_c * (1 - a + a (t_c + 1) / T)``
  for a class of task ``t_c`` (0-based) after ``T`` tasks, ``a = 0.1`` (``mean_shrink``; the
  newest task is unscaled); ``mean_shrink: 0`` samples the plain ``N(mu_c, Sigma_c)`` of the paper;
* each epoch draws ``n`` fresh features per class (``samples_per_class``, 256), shuffles them
  and takes mini-batches of ``n``; SGD (momentum 0.9, weight decay 5e-4, lr 0.01) with cosine
  annealing over ``epochs`` (5);
* logit normalisation (the official ``ca_with_logit_norm``): the logits ``z`` are
  divided by the mean over tasks of the L2 norm of each task's block of logits, and by a
  temperature ``tau`` = 0.1 before the cross-entropy::

      z_hat = z / (tau * mean_t (||z_t||_2 + 1e-7)).

Sampling draws from a ``torch.Generator`` (``x = mu + L z`` with ``Sigma = L L^T``), so a
seeded generator gives the same features on every run.

:class:`AlignedHead` packages the whole procedure for any strategy whose classifier is a
:class:`~clpeft.components.heads.classifiers.LinearHead`: SLCA, and the prompt/LoRA methods' optional
``align`` (classifier alignment on top of a prompt method is what HiDe-Prompt, Wang et al.,
NeurIPS 2023, https://arxiv.org/abs/2310.07234, builds on). Optionally it moves the stored means
with the features (semantic drift compensation, Yu et al., "Semantic Drift Compensation for
Class-Incremental Learning", CVPR 2020, https://arxiv.org/abs/2004.00440, eq. 8-9): the current
experience's training features before (``z_i^{t-1}``) and after (``z_i^t``) training give every
old class ``c`` the drift::

    Delta_c = sum_i w_ic (z_i^t - z_i^{t-1}) / sum_i w_ic,
    w_ic = exp(-||z_i^{t-1} - mu_c^{t-1}||^2 / (2 sigma^2)),

and ``mu_c^t = mu_c^{t-1} + Delta_c``. The paper's ``sigma = 0.3`` is for unit-norm embeddings;
here ``sigma = drift_sigma * mean_i ||z_i^{t-1}||`` so that it means the same for features of
any scale. Covariances are not moved (as in the paper).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import LinearHead
from clpeft.distributed import current


class ClassifierAlignment(nn.Module):
    """Per-class Gaussian statistics of features and SLCA's head re-training from samples.

    Args:
        dim: feature dimension ``D``.
        samples_per_class: ``n``, features sampled per class and epoch (also the batch size).
        epochs: alignment epochs.
        lr, momentum, weight_decay: the SGD optimizer of the alignment.
        temperature: ``tau`` of the logit normalisation; ``None`` trains on raw logits.
        mean_shrink: ``a``, the official code's shrinkage of older tasks' means (0: none).
        ridge: added to every class covariance's diagonal.

    Buffers: :attr:`stats` (a :class:`ClassStatistics` with per-class covariances, float64)
    and ``task_of_class`` (the task index in which each class was seen, -1 if never).
    """

    def __init__(
        self,
        dim: int,
        samples_per_class: int = 256,
        epochs: int = 5,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        temperature: float | None = 0.1,
        mean_shrink: float = 0.1,
        ridge: float = 1e-4,
    ):
        super().__init__()
        self.stats = ClassStatistics(dim, covariance="per_class")
        self.register_buffer("task_of_class", torch.zeros(0, dtype=torch.long))
        self.samples_per_class = samples_per_class
        self.epochs = epochs
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.temperature = temperature
        self.mean_shrink = mean_shrink
        self.ridge = ridge

    @property
    def n_classes(self) -> int:
        return self.stats.n_classes

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        """Add a batch of features of classes seen in task ``task`` (0-based)."""
        self.stats.update(features, labels)
        self._mark(labels.unique(), task)

    @torch.no_grad()
    def add(self, stats: ClassStatistics, task: int) -> None:
        """Add a task's accumulated statistics (``per_class`` covariance), e.g. all ranks' shares
        of an experience (:meth:`ClassStatistics.gathered`)."""
        self.stats.merge(stats)
        self._mark(torch.nonzero(stats.seen()).flatten(), task)

    def _mark(self, classes: torch.Tensor, task: int) -> None:
        extra = self.stats.n_classes - len(self.task_of_class)
        if extra > 0:
            self.task_of_class = torch.cat([self.task_of_class, self.task_of_class.new_full((extra,), -1)])
        self.task_of_class[classes.to(self.task_of_class.device)] = task

    def sampling_means(self) -> torch.Tensor:
        """``mu_c`` scaled by the mean shrinkage of its task, (C, D) float64."""
        tasks = self.task_of_class.to(torch.float64)
        n_tasks = float(self.task_of_class.max()) + 1 if len(tasks) else 1.0
        factor = 1.0 - self.mean_shrink + self.mean_shrink * (tasks + 1) / n_tasks
        return self.stats.means() * factor[:, None]

    def sampling_covariances(self) -> torch.Tensor:
        """``Sigma_c + ridge * I`` for every class, (C, D, D) float64."""
        eye = torch.eye(self.stats.dim, dtype=torch.float64, device=self.stats.mean.device)
        return torch.stack([self.stats.covariance(c) + self.ridge * eye for c in range(self.n_classes)])

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, factors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` features of every class (float32, class by class) and their labels.

        Args:
            n: samples per class.
            generator: the random source (on the statistics' device).
            factors: Cholesky factors of :meth:`sampling_covariances` when already computed.
        """
        self._require_all_seen()
        device = self.stats.mean.device
        factors = torch.linalg.cholesky(self.sampling_covariances()) if factors is None else factors
        z = torch.randn(self.n_classes, n, self.stats.dim, generator=generator, dtype=torch.float64, device=device)
        x = self.sampling_means()[:, None, :] + z @ factors.transpose(1, 2)
        labels = torch.arange(self.n_classes, device=device).repeat_interleave(n)
        return x.reshape(-1, self.stats.dim).float(), labels

    def normalised_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``z / (tau * mean_t ||z_t||)`` over the tasks' blocks of logits; ``z`` itself
        when ``temperature`` is ``None``."""
        if self.temperature is None:
            return logits
        tasks = self.task_of_class.to(logits.device)
        norms = torch.stack([logits[:, tasks == t].norm(dim=1) + 1e-7 for t in torch.unique(tasks).tolist()], dim=1)
        return logits / (norms.mean(dim=1, keepdim=True) * self.temperature)

    def align(self, head: nn.Module, generator: torch.Generator | None = None) -> list[float]:
        """Re-train ``head`` (in place) on sampled features of every class; returns the mean
        loss of each epoch. ``head`` must output one logit per class of the statistics.

        Runs in float32 with autocast off, also when called under a bf16 autocast (as the
        official code trains it)."""
        self._require_all_seen()
        factors = torch.linalg.cholesky(self.sampling_covariances())
        return train_on_samples(
            head,
            lambda: self.sample(self.samples_per_class, generator, factors),
            self.epochs,
            self.samples_per_class,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            generator=generator,
            logits=self.normalised_logits,
        )

    def _require_all_seen(self) -> None:
        if not bool(self.stats.seen().all()):
            missing = torch.nonzero(~self.stats.seen()).flatten().tolist()
            raise RuntimeError(f"classes {missing} have no statistics: alignment needs every class seen")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "task_of_class")
        if stored is not None:
            self.task_of_class = torch.zeros_like(stored, device=self.task_of_class.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"samples_per_class={self.samples_per_class}, epochs={self.epochs}, lr={self.lr}, "
            f"temperature={self.temperature}, mean_shrink={self.mean_shrink}, ridge={self.ridge}"
        )


def train_on_samples(
    head: nn.Module,
    draw: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    steps: int | None = None,
    logits: Callable[[torch.Tensor], torch.Tensor] = lambda z: z,
) -> list[float]:
    """Train ``head``'s trainable parameters (in place) on sampled features; the mean loss of each epoch.

    Each epoch ``draw()`` gives fresh ``(features, labels)``, shuffled by ``randperm`` (from
    ``generator``) and cut into mini-batches of ``batch_size``, of which the first ``steps`` are
    used (all: ``None``); cross-entropy of ``logits(head(x))``, SGD with cosine annealing over
    ``epochs``. Runs in float32 with autocast off, also under a bf16 autocast. SLCA's classifier
    alignment (:meth:`ClassifierAlignment.align`) and HiDe-Prompt's task-adaptive prediction
    (:mod:`~clpeft.components.heads.centroid_statistics`) are this loop with their own sampler.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    losses = []
    with torch.enable_grad(), torch.autocast(params[0].device.type, enabled=False):
        for _ in range(epochs):
            x, y = draw()
            batches = torch.randperm(len(y), generator=generator, device=y.device).split(batch_size)[:steps]
            total = 0.0
            for batch in batches:
                loss = F.cross_entropy(logits(head(x[batch])), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            schedule.step()
            losses.append(total / max(len(batches), 1))
    return losses


class AlignedHead(nn.Module):
    """A trained head's aligned copy, re-aligned after every experience (SLCA's ``fc.backup()`` /
    ``fc.recall()``).

    The strategy keeps training its own head on the current classes; after each experience
    :meth:`update` stores the new classes' feature Gaussians and re-trains a fresh copy of the
    trained head on samples of every seen class. :meth:`forward` predicts with that copy once it
    covers every class of the trained head, with the trained head otherwise. With drift
    compensation the strategy also calls :meth:`track` before training on an experience, with
    the same batches in the same order as it later passes to :meth:`update`.

    Args:
        dim: feature dimension read by the head.
        enabled: ``False`` makes :meth:`track` and :meth:`update` no-ops and :meth:`forward` the
            trained head.
        drift_compensation: move the stored means by SDC's estimated drift at every update.
        drift_sigma: SDC's kernel width as a fraction of the mean feature norm.
        **alignment: arguments of :class:`ClassifierAlignment` (SLCA's defaults otherwise).
    """

    def __init__(self, dim: int, enabled: bool = True, drift_compensation: bool = False, drift_sigma: float = 0.3, **alignment):
        super().__init__()
        self.enabled = enabled
        self.drift_compensation = drift_compensation
        self.drift_sigma = drift_sigma
        self.alignment = ClassifierAlignment(dim, **alignment)
        self.head = LinearHead(dim).requires_grad_(False)
        self._before: torch.Tensor | None = None  # z^{t-1} of the experience in training

    @torch.no_grad()
    def track(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Before training on an experience: keep its features under the current model (``z^{t-1}``).

        Reads the batches only with drift compensation on and classes already stored."""
        if self.enabled and self.drift_compensation and self.alignment.n_classes:
            self._before = _gathered_rows([features.float() for features, _ in batches])

    @torch.no_grad()
    def drift(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """SDC's ``Delta_c`` of every stored class from the same samples' features before and
        after training, (C, D) float64."""
        before, after = before.double(), after.double()
        sigma = self.drift_sigma * before.norm(dim=1).mean()
        squared = torch.cdist(self.alignment.stats.mean, before).square_()
        weights = torch.softmax(-squared / (2 * sigma**2), dim=1)  # w_ic / sum_i w_ic, without underflow
        return weights @ (after - before)

    @torch.no_grad()
    def update(self, trained: LinearHead, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], task: int) -> None:
        """Add the statistics of an experience's ``(features, labels)`` batches and re-align.

        In a data-parallel run each rank passes its share; the shares are gathered in rank
        order (:meth:`ClassStatistics.gathered`). Sampling uses a seed drawn from torch's global
        generator, which the engine seeds per experience.
        """
        if not self.enabled:
            return
        stats = self.alignment.stats
        share = ClassStatistics(stats.dim, covariance="per_class").to(stats.mean.device)
        after = []
        for features, labels in batches:
            share.update(features.float(), labels)
            if self._before is not None:
                after.append(features.float())
        if self._before is not None:
            after = _gathered_rows(after)
            if after.shape != self._before.shape:
                raise RuntimeError(
                    f"drift compensation saw {len(self._before)} samples before training and "
                    f"{len(after)} after: track() and update() need the same batches"
                )
            seen = stats.seen()
            stats.mean[seen] += self.drift(self._before, after)[seen]
            self._before = None
        self.alignment.add(share.gathered(), task)
        if int(self.alignment.task_of_class.max()) < 1:
            return  # nothing to align after the first task
        aligned = copy.deepcopy(trained).requires_grad_(True)
        seed = int(torch.randint(2**62, (), dtype=torch.long))
        self.alignment.align(aligned, torch.Generator(stats.mean.device).manual_seed(seed))
        self.head.load_state_dict(aligned.state_dict())

    def extra_repr(self) -> str:
        drift = f", drift_sigma={self.drift_sigma}" if self.drift_compensation else ""
        return f"enabled={self.enabled}, drift_compensation={self.drift_compensation}{drift}"

    def forward(self, features: torch.Tensor, trained: LinearHead) -> torch.Tensor:
        """Logits of the aligned copy when it covers ``trained``'s classes, else of ``trained``."""
        if self.enabled and self.head.n_classes == trained.n_classes:
            return self.head(features)
        return trained(features)


def _gathered_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """This rank's row blocks concatenated, then every rank's in rank order (one process: its own)."""
    world = current()
    mine = torch.cat(parts) if parts else torch.zeros(0)
    if not world.active:
        return mine
    return torch.cat([rows.to(mine.device) for rows in world.all_gather_object(mine.cpu())])
