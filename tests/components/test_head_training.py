"""The classifier-side options (``train_mask``, ``align``, ``drift_compensation``) as one component.

Issue 21: the seven strategies that take them wired them by hand, and those that validated them
from a partial dict let a strategy built from Python skip the rule YAML enforced. The options are
now one :class:`HeadOptions` block that checks itself, so both ways of building refuse the same
mistakes, and :class:`HeadTraining` makes the pass over an experience only when alignment reads it.
"""

from __future__ import annotations

import pytest
import torch

from clpeft import config, registry
from clpeft.components.heads import HeadOptions, HeadTraining, LinearHead
from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.errors import UserError
from clpeft.experience import Experience

STRATEGIES = ["l2p", "dualprompt", "coda_prompt", "slca", "lora_cl", "merge_cl", "lae"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_strategy_built_from_python_refuses_what_yaml_refuses(name):
    cls = registry.strategies.get(name)
    # the options are checked before anything is built, so no backbone is needed to see the refusal
    with pytest.raises(UserError, match=r"^strategy\.drift_compensation: needs align: true"):
        cls(None, align=False, drift_compensation=True)
    with pytest.raises(UserError, match=r"^strategy\.drift_compensation: needs align: true"):
        cls(None, head_options=HeadOptions(align=False, drift_compensation=True))


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_options_are_flat_keys_of_the_strategy_with_its_defaults(name):
    fields = config.schema_of(registry.strategies.get(name), "strategy").model_fields
    align_default = name == "slca"  # SLCA is the method whose alignment this is
    assert (fields["train_mask"].default, fields["align"].default, fields["drift_compensation"].default) == (True, align_default, False)
    assert fields["align"].description == HeadOptions.model_fields["align"].description
    assert "head_options" not in fields


def test_giving_the_block_and_its_keys_together_is_refused():
    with pytest.raises(TypeError, match="not both"):
        registry.strategies.get("l2p")(None, head_options=HeadOptions(), align=True)


def _experience(x: torch.Tensor, y: torch.Tensor, index: int) -> Experience:
    classes = sorted(set(y.tolist()))
    view = DataView.of(ArrayDataset(x, y, name="synthetic"))
    return Experience(
        index=index,
        train=view,
        test=None,
        classes_in_this_experience=classes,
        classes_seen_so_far=list(range(max(classes) + 1)),
        task_label=0,
    )


class _Batches:
    """A strategy's ``batches`` service over a view's rows (two per batch), counting the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, view: DataView, shard: bool = False):
        assert shard  # a data-parallel run reads this rank's share
        self.calls += 1
        x, y = view.load()
        return (Batch(x[i : i + 2], y[i : i + 2]) for i in range(0, len(y), 2))


def test_the_pass_over_the_experience_is_made_only_when_alignment_reads_it():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    exp = _experience(x, y, 0)
    head = LinearHead(3)
    head.grow_to(2)
    plain, batches = HeadTraining(3, HeadOptions()), _Batches()
    plain.start(exp, batches, lambda b: b.x)
    plain.finish(head, exp, batches, lambda b: b.x)
    assert batches.calls == 0 and plain.alignment.n_classes == 0

    aligned, batches = HeadTraining(3, HeadOptions(align=True)), _Batches()
    aligned.start(exp, batches, lambda b: b.x)  # nothing stored yet: no features before training to keep
    aligned.finish(head, exp, batches, lambda b: 2 * b.x)
    assert batches.calls == 1
    for c in (0, 1):  # the statistics are those of the features the strategy's function gave
        torch.testing.assert_close(aligned.alignment.stats.means()[c], (2 * x[y == c]).double().mean(0))


def test_the_loss_is_the_cross_entropy_over_the_current_classes_only():
    torch.manual_seed(1)
    logits, targets = torch.randn(6, 5), torch.tensor([2, 3, 2, 3, 3, 2])
    exp = _experience(torch.zeros(6, 1), targets, 1)
    masked, full = HeadTraining(1, HeadOptions()), HeadTraining(1, HeadOptions(train_mask=False))
    for training in (masked, full):
        training.start(exp, _Batches(), lambda b: b.x)
    current = logits[:, [2, 3]]
    expected = (torch.logsumexp(current, dim=1) - logits[torch.arange(6), targets]).mean()
    torch.testing.assert_close(masked.loss(logits, targets), expected)
    torch.testing.assert_close(full.loss(logits, targets), torch.nn.functional.cross_entropy(logits, targets))
