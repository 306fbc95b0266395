"""The order of things per kind of stream, driven by :class:`clpeft.engine.Engine`.

- :func:`run_experiences`: experience by experience (class-, domain-incremental, few-shot
  sessions, instruction tasks): train, evaluate the accuracy-matrix row, checkpoint.
- :func:`run_online`: one pass over an online stream with anytime evaluation
  (:mod:`clpeft.online`).
- :func:`run_test_time`: the source phase, then online adaptation domain by domain.

Each loop steps a built :class:`~clpeft.run.Run` and leaves the run directory (resume,
checkpoints, ``metrics.json``) to the engine.
"""

from clpeft.loops.experiences import run_experiences
from clpeft.loops.online import run_online
from clpeft.loops.test_time import run_test_time

__all__ = ["run_experiences", "run_online", "run_test_time"]
