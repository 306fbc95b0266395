"""The classic baselines against Avalanche 0.6 (``avalanche-lib``, the installed package).

clpeft's ``finetune``, ``joint``, ``ewc``, ``lwf`` and ``replay`` run through clpeft's engine on a
class-incremental split of scikit-learn digits (3 experiences x 2 classes, 12 training samples
per class, a 16-unit trainable MLP, SGD, 2 epochs of batches of 8). Spies record what the engine
did: the initial weights, the head rows each experience added, every training batch in order,
and the parameters after each experience. Avalanche's ``Naive`` / ``Cumulative`` (with
``EWCPlugin`` / ``LwFPlugin``) then train the same network -- the same ``MLPBackbone`` object
deep-copied at its initial weights, an ``IncrementalClassifier`` whose new rows get clpeft's
values -- on the same batches in the same order (a plugin hands Avalanche the recorded batches as
its dataloader, after checking they hold exactly the samples of Avalanche's own training
dataset: the experience, or the union of all so far for ``Cumulative``), with the same optimiser
and epochs. The parameters after every experience must agree within ``rtol=1e-5, atol=1e-6``
(float32 arithmetic in different orders; observed: bitwise equal, EWC within 1e-8).

Where clpeft deliberately differs from Avalanche, the test shows the difference:

* **EWC's ``lambda``**: Avalanche adds ``lambda * sum F (theta - theta*)^2``; clpeft follows
  Kirkpatrick et al. eq. 3, ``lambda/2 * ...``. clpeft's ``ewc_lambda = 2 x`` Avalanche's trains
  identically (shown).
* **EWC's Fisher**: Avalanche squares the gradient of each *mini-batch*'s mean loss
  (``compute_importances`` with the training batch size) and averages over batches; clpeft uses
  the per-sample empirical Fisher (mean of squared per-sample gradients, the diagonal Fisher of
  the paper), which does not depend on a batch size. They are equal when Avalanche's Fisher
  batches hold one sample (shown; the equality runs use that) and differ otherwise (shown).
* **Optimiser state across experiences**: Avalanche 0.6 keeps SGD's momentum buffers of the
  surviving parameters from one experience to the next (``reset_optimizer_state=False``);
  clpeft, like Mammoth and PILOT, builds a new optimiser per experience. With momentum they
  agree when Avalanche is asked to reset (``train(exp, reset_optimizer_state=True)``, shown) and
  differ otherwise (shown); the other comparisons use momentum 0.
* **Replay's training data**: Avalanche's ``ReplayPlugin`` pairs every batch of the experience
  with a batch from the memory (as ER in Chaudhry et al. 2019 and Mammoth's ``er``); clpeft's
  ``replay`` trains on the union of the experience and the memory, shuffled together, as iCaRL and
  PyCIL/LAMDA-PILOT's ``replay`` do. With a memory of the same samples clpeft equals Avalanche's
  ``Naive`` on that union (shown); the class-balanced memory's per-class sizes equal Avalanche's
  ``ClassBalancedBuffer`` (shown).

* **LwF's heads**: Avalanche's ``LwFPlugin`` also distils every head of a multi-head
  (task-incremental) model; clpeft has one growing head (class-incremental), the case compared
  here, where Avalanche distils the previously seen units exactly as clpeft does.

LwF matched Avalanche only after a fix: clpeft multiplied the distillation by ``T^2`` (Hinton et
al.), which neither the LwF paper (eq. 2), Avalanche nor Mammoth does.

Mutations checked (each fails a test here): the ``T^2`` factor back in ``distillation_loss``;
EWC's ``lambda/2`` changed to ``lambda``; online EWC's decay applied to the new Fisher instead of
the old one; ``joint`` training on the current experience only; replay's ``train_data`` without
the memory.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import Counter

import pytest
import torch
from torch import nn

import clpeft.config
import clpeft.engine
from clpeft.strategies.ewc import EWC
from clpeft.strategies.finetune import Finetune
from clpeft.strategies.joint import Joint
from clpeft.strategies.lwf import LwF
from clpeft.strategies.replay import Replay

avalanche_training = pytest.importorskip("avalanche.training")
pytestmark = [
    pytest.mark.filterwarnings("ignore:No loggers specified"),
    pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing"),
]

TRAIN_PER_CLASS, EPOCHS, BATCH, LR = 12, 2, 8, 0.1
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# clpeft through its engine, recorded
# --------------------------------------------------------------------------------------------


class Record:
    """What one clpeft run did, for replaying it in Avalanche."""

    def __init__(self):
        self.initial_backbone = None  # MLPBackbone at its initial weights
        self.new_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # head rows added per experience
        self.batches: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = []  # [experience][epoch] -> batches
        self.after: list[dict[str, torch.Tensor]] = []  # parameters after each experience
        self.train: list[tuple[torch.Tensor, torch.Tensor]] = []  # each experience's training data
        self.trained_on: list[tuple[torch.Tensor, torch.Tensor]] = []  # what the strategy trained on (train_data)
        self.memory_labels: list[list[int]] = []  # replay: the memory's labels after each experience
        self.test: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.strategy = None


def _params(backbone: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {f"backbone.{n}": p.detach().clone() for n, p in backbone.named_parameters()}
    return {**out, "head.weight": weight.detach().clone(), "head.bias": bias.detach().clone()}


def run_clpeft(tmp_path, monkeypatch, cls, strategy: dict, momentum: float = 0.0) -> Record:
    record = Record()
    before, step, after, train_data = cls.before_experience, cls.training_step, cls.after_experience, cls.train_data

    def spy_before(self, exp):
        if record.initial_backbone is None:
            record.initial_backbone = copy.deepcopy(self.backbone)
        n_old = self.head.n_classes
        before(self, exp)
        record.new_rows.append((self.head.weight[n_old:].detach().clone(), self.head.bias[n_old:].detach().clone()))
        record.batches.append([])
        record.train.append(exp.train.load())
        record.test.append(exp.test.load())
        record.strategy = self

    def spy_step(self, batch):
        epochs = record.batches[-1]
        if len(epochs) <= self.epoch:
            epochs.append([])
        epochs[self.epoch].append((batch.x.clone(), batch.y.clone()))
        return step(self, batch)

    def spy_train_data(self, exp):
        view = train_data(self, exp)
        record.trained_on.append(view.load())
        return view

    def spy_after(self, exp):
        record.after.append(_params(self.backbone, self.head.weight, self.head.bias))
        after(self, exp)
        if hasattr(self, "buffer"):
            record.memory_labels.append(self.buffer.labels.tolist())

    monkeypatch.setattr(cls, "before_experience", spy_before)
    monkeypatch.setattr(cls, "train_data", spy_train_data)
    monkeypatch.setattr(cls, "training_step", spy_step)
    monkeypatch.setattr(cls, "after_experience", spy_after)
    cfg = {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": TRAIN_PER_CLASS,
            "test_per_class": 4,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "mlp", "hidden": [16]},
        "strategy": strategy,
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "momentum": momentum, "weight_decay": 0.0},
        "eval": {"batch_size": 64, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    clpeft.engine.Engine(clpeft.config.resolve(cfg), tmp_path / "run", device="cpu").run()
    return record


# --------------------------------------------------------------------------------------------
# Avalanche on the recorded start and batches
# --------------------------------------------------------------------------------------------


def _sample_keys(x: torch.Tensor, y: torch.Tensor) -> Counter:
    return Counter((bytes(xi.contiguous().numpy().tobytes()), int(yi)) for xi, yi in zip(x, y))


class _RecordedEpochs:
    """Avalanche's dataloader: each ``iter()`` is the next epoch of the recorded batches."""

    def __init__(self, epochs):
        self.epochs, self.next = epochs, 0

    def __iter__(self):
        epoch = self.epochs[self.next]
        self.next += 1
        return iter([[x, y, torch.zeros(len(y), dtype=torch.long)] for x, y in epoch])

    def __len__(self):
        return len(self.epochs[0])


def _same_start_and_batches(record: Record, head):
    from avalanche.core import SupervisedPlugin

    class SameStartAndBatches(SupervisedPlugin):
        """Before each experience: clpeft's new head rows, and clpeft's batches as the dataloader
        (after checking every recorded epoch holds exactly Avalanche's training samples)."""

        def before_training_exp(self, strategy, **kwargs):
            i = strategy.clock.train_exp_counter
            weight, bias = record.new_rows[i]
            with torch.no_grad():
                head.classifier.weight[-len(bias) :].copy_(weight)
                head.classifier.bias[-len(bias) :].copy_(bias)
            data = strategy.adapted_dataset
            own = _sample_keys(
                torch.stack([data[j][0] for j in range(len(data))]), torch.tensor([int(data[j][1]) for j in range(len(data))])
            )
            for epoch in record.batches[i]:
                assert _sample_keys(torch.cat([x for x, _ in epoch]), torch.cat([y for _, y in epoch])) == own
            strategy.dataloader = _RecordedEpochs(record.batches[i])

    return SameStartAndBatches()


def run_avalanche(record: Record, template: str = "Naive", plugins=(), momentum: float = 0.0, train_data=None, **train_kwargs):
    """Avalanche's ``template`` on clpeft's start and batches (its experiences: ``train_data``,
    default each experience's own training data); the parameters after each experience."""
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.models import IncrementalClassifier
    from avalanche.training.plugins import EvaluationPlugin

    backbone = copy.deepcopy(record.initial_backbone)
    head = IncrementalClassifier(backbone.feature_dim, initial_out_features=len(record.new_rows[0][1]), masking=False)
    model = nn.Sequential(backbone, head)
    bench = tensors_benchmark(
        train_tensors=[list(t) for t in (train_data or record.train)],
        test_tensors=[list(t) for t in record.test],
        task_labels=[0] * len(record.train),
    )
    strategy = getattr(avalanche_training, template)(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=BATCH,
        train_epochs=EPOCHS,
        eval_mb_size=64,
        device="cpu",
        plugins=[*plugins, _same_start_and_batches(record, head)],
        evaluator=EvaluationPlugin(loggers=[]),
        eval_every=-1,
    )
    after = []
    with contextlib.redirect_stdout(io.StringIO()):
        for exp in bench.train_stream:
            strategy.train(exp, num_workers=0, **train_kwargs)
            after.append(_params(backbone, head.classifier.weight, head.classifier.bias))
    return after


def assert_same_parameters(clpeft_after, avalanche_after, **tolerance):
    assert len(clpeft_after) == len(avalanche_after) == 5
    for i, (ours, theirs) in enumerate(zip(clpeft_after, avalanche_after)):
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(
                ours[name], theirs[name], **(tolerance or TOLERANCE), msg=lambda m, i=i, name=name: f"experience {i}, {name}: {m}"
            )


def _differs(clpeft_after, avalanche_after) -> float:
    """Largest absolute parameter difference after the last experience."""
    return max(float((clpeft_after[-1][n] - avalanche_after[-1][n]).abs().max()) for n in clpeft_after[-1])


# --------------------------------------------------------------------------------------------
# finetune = Naive, joint = Cumulative
# --------------------------------------------------------------------------------------------


def test_finetune_equals_avalanche_naive(tmp_path, monkeypatch):
    record = run_clpeft(tmp_path, monkeypatch, Finetune, {"name": "finetune"})
    assert [len(e) for e in record.batches] == [EPOCHS] * 5 and len(record.batches[0][0]) == 3
    assert_same_parameters(record.after, run_avalanche(record, "Naive"))


def test_joint_equals_avalanche_cumulative(tmp_path, monkeypatch):
    record = run_clpeft(tmp_path, monkeypatch, Joint, {"name": "joint"})
    assert [len(e[0]) for e in record.batches] == [3, 6, 9, 12, 15]  # the union grows
    assert_same_parameters(record.after, run_avalanche(record, "Cumulative"))


# --------------------------------------------------------------------------------------------
# EWC
# --------------------------------------------------------------------------------------------


def _per_sample_fisher_ewc(ewc_lambda, mode, decay):
    from avalanche.training.plugins import EWCPlugin

    class PerSampleFisherEWC(EWCPlugin):
        """Avalanche's EWC with its importances computed on batches of one sample."""

        def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
            return super().compute_importances(model, criterion, optimizer, dataset, device, 1, num_workers)

    return PerSampleFisherEWC(ewc_lambda, mode=mode, decay_factor=decay if mode == "online" else None)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_ewc_equals_avalanche_with_twice_the_lambda_and_per_sample_fisher(tmp_path, monkeypatch, mode):
    lam, decay = 20.0, 0.5
    record = run_clpeft(tmp_path, monkeypatch, EWC, {"name": "ewc", "ewc_lambda": 2 * lam, "mode": mode, "decay": decay})
    assert_same_parameters(record.after, run_avalanche(record, "Naive", plugins=[_per_sample_fisher_ewc(lam, mode, decay)]))
    # the same lambda on both sides is not the same method (clpeft halves it: Kirkpatrick et al. eq. 3)
    assert _differs(record.after, run_avalanche(record, "Naive", plugins=[_per_sample_fisher_ewc(2 * lam, mode, decay)])) > 1e-3


def test_ewc_fisher_is_per_sample_avalanche_squares_batch_gradients(tmp_path, monkeypatch):
    from avalanche.training.plugins import EWCPlugin

    from clpeft.components.regularization.fisher import empirical_fisher

    record = run_clpeft(tmp_path, monkeypatch, Finetune, {"name": "finetune"})
    model = record.strategy  # calling a strategy is predict(): logits over the classes seen
    x, y = record.train[-1]
    ours = empirical_fisher(model, [(x, y)], nn.functional.cross_entropy)
    dataset = torch.utils.data.TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def theirs(batch_size):
        imp = EWCPlugin(1.0).compute_importances(model, nn.CrossEntropyLoss(), optimizer, dataset, "cpu", batch_size)
        return {n: p.data for n, p in imp.items()}

    one, batched = theirs(1), theirs(BATCH)
    assert ours.keys() == one.keys()
    for n in ours:
        torch.testing.assert_close(ours[n], one[n], rtol=1e-5, atol=1e-9)
    # mini-batch gradients average per-sample ones out: a smaller, batch-size dependent estimate
    total = lambda f: sum(float(v.sum()) for v in f.values())  # noqa: E731
    assert total(batched) < 0.7 * total(ours)


# --------------------------------------------------------------------------------------------
# LwF
# --------------------------------------------------------------------------------------------


def test_lwf_equals_avalanche(tmp_path, monkeypatch):
    from avalanche.training.plugins import LwFPlugin

    alpha, temperature = 2.0, 3.0
    record = run_clpeft(tmp_path, monkeypatch, LwF, {"name": "lwf", "alpha": alpha, "temperature": temperature})
    assert_same_parameters(record.after, run_avalanche(record, "Naive", plugins=[LwFPlugin(alpha, temperature)]))


# --------------------------------------------------------------------------------------------
# optimiser state across experiences
# --------------------------------------------------------------------------------------------


def test_momentum_is_reset_per_experience_as_avalanche_with_reset_optimizer_state(tmp_path, monkeypatch):
    record = run_clpeft(tmp_path, monkeypatch, Finetune, {"name": "finetune"}, momentum=0.9)
    assert_same_parameters(record.after, run_avalanche(record, "Naive", momentum=0.9, reset_optimizer_state=True))
    assert _differs(record.after, run_avalanche(record, "Naive", momentum=0.9)) > 1e-3  # Avalanche's default keeps it


# --------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------


def test_replay_memory_sizes_equal_avalanche_class_balanced_buffer_and_training_equals_naive_on_the_union(tmp_path, monkeypatch):
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.training.storage_policy import ClassBalancedBuffer

    mem = 15  # not a multiple of the class counts: the remainder goes to the lowest class ids on both sides
    record = run_clpeft(tmp_path, monkeypatch, Replay, {"name": "replay", "mem_size": mem, "policy": "class_balanced"})
    bench = tensors_benchmark(
        train_tensors=[list(t) for t in record.train], test_tensors=[list(t) for t in record.test], task_labels=[0] * len(record.train)
    )
    theirs = ClassBalancedBuffer(mem, adaptive_size=True)
    for i, exp in enumerate(bench.train_stream):
        theirs.update_from_dataset(exp.dataset)
        sizes = {c: len(g.buffer) for c, g in theirs.buffer_groups.items()}
        assert Counter(record.memory_labels[i]) == sizes
        # what clpeft trained on: the experience plus the memory of the experiences before it
        memory = _sample_keys(*record.trained_on[i]) - _sample_keys(*record.train[i])
        assert (
            sum(memory.values()) == len(record.trained_on[i][1]) - len(record.train[i][1]) == (len(record.memory_labels[i - 1]) if i else 0)
        )
        past = sum((_sample_keys(*record.train[j]) for j in range(i)), Counter())
        assert not memory - past
    # the training itself: Avalanche's Naive on the same union, same batches
    assert_same_parameters(record.after, run_avalanche(record, "Naive", train_data=record.trained_on))


def test_avalanche_replay_pairs_each_batch_with_a_memory_batch():
    """The deliberate difference: Avalanche's ``ReplayPlugin`` builds ``ReplayDataLoader`` batches
    of ``B`` experience samples plus up to ``B`` memory samples (the memory cycled), an epoch being
    the experience's ``ceil(N / B)`` batches; clpeft's union has ``ceil((N + M) / B)`` batches of
    ``B``: other steps, other batch compositions, other numbers."""
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.benchmarks.utils.data_loader import ReplayDataLoader

    x, y = torch.randn(24, 3), torch.arange(24) % 2
    bench = tensors_benchmark(train_tensors=[[x, y], [x[:10], y[:10] + 2]], test_tensors=[[x, y], [x, y]], task_labels=[0, 0])
    data, memory = bench.train_stream[0].dataset, bench.train_stream[1].dataset
    # the arguments ReplayPlugin.before_training_exp passes
    loader = ReplayDataLoader(
        data, memory, oversample_small_tasks=True, batch_size=BATCH, batch_size_mem=BATCH, task_balanced_dataloader=False, shuffle=True
    )
    sizes = [len(batch[1]) for batch in loader]
    assert len(sizes) == 3 and all(s > BATCH for s in sizes)  # clpeft: ceil(34 / 8) = 5 batches of at most 8
    assert sum(sizes) - len(data) > len(memory)  # memory samples drawn more than once per epoch
