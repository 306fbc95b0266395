"""What LUCIR does to its cosine classifier around a task: imprint the new rows, hold the other rows.

Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019
(http://openaccess.thecvf.com/content_CVPR_2019/html/Hou_Learning_a_Unified_Classifier_Incrementally_via_Rebalancing_CVPR_2019_paper.html):

* **Imprinting** (after Qi et al., "Low-Shot Learning with Imprinted Weights", CVPR 2018,
  https://arxiv.org/abs/1712.07136): a new class's row starts as the unit-length mean of its
  samples' L2-normalised features, times the mean norm of the old classes' rows (the official
  code's and Mammoth's ``imprint_weights``).
* **Held rows**: the official code and Mammoth give the other tasks' rows a learning rate of 0 while
  a task trains; :class:`HeldRows` puts them back after every optimizer step instead, so weight
  decay and momentum of the run's optimizer cannot move them either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def imprint_rows(weight: torch.Tensor, n_old: int, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Set row ``c`` of ``weight``, for every class ``c`` in ``labels``, to ``normalize(mean_i
    normalize(f_i)) * mean_{k < n_old} ||w_k||`` (in place); needs ``n_old > 0`` old rows."""
    old_norm = weight[:n_old].double().norm(dim=1).mean()
    normalised = F.normalize(features.float(), dim=1)
    for c in torch.unique(labels).tolist():
        mean = normalised[labels == c].mean(dim=0)
        weight[c] = (F.normalize(mean, dim=0).double() * old_norm).to(weight)


class HeldRows:
    """Rows of a weight kept as they are while the others train (call :meth:`restore` after each step)."""

    def __init__(self):
        self.saved: torch.Tensor | None = None
        self.held: torch.Tensor | None = None

    def hold(self, weight: torch.Tensor, trained: range) -> None:
        """From now on every row of ``weight`` outside ``trained`` is put back to its current value."""
        self.held = torch.ones(len(weight), dtype=torch.bool, device=weight.device)
        self.held[trained.start : trained.stop] = False
        self.saved = weight.detach().clone()

    @torch.no_grad()
    def restore(self, weight: torch.Tensor) -> None:
        """Put the held rows back (a no-op before :meth:`hold`)."""
        if self.saved is not None:
            weight[self.held] = self.saved[self.held].to(weight)
