"""``clpeft merge --search scale=0.3:1.5:0.1 --on CONFIG``: choose a merge parameter on labelled data.

The official code chooses lambda on validation data: it merges once per value of a grid, evaluates
every merged model and keeps the best (``resolve_lambda_code``'s ``linear+start+end+step`` in
``ties-merging/src/ties_merging.py``; its README searches task arithmetic over 0.1-1.0 and TIES over
0.8-2.5, step 0.1). Here each value's merge is written to a temporary file and scored by a clpeft
run of ``CONFIG`` (a run config: its scenario gives the labelled data, its backbone the model, its
strategy how the backbone is scored, e.g. ``simplecil``'s class prototypes, no training) with
``backbone.weights`` set to that file, as ``clpeft run CONFIG --set backbone.weights=merged.safetensors``
evaluates a merge (README, "Evaluate a merged model"). The run's final accuracy on everything it
saw (``acc_last``) scores the value; the best value (the first of equals, in grid order) is merged
once more into ``out``, and the table of (value, accuracy) goes to ``<out stem>.search.json``.

The data the config's scenario tests on is the validation data: use a split that is not the one
the merged model is finally reported on.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from clpeft.errors import UserError
from clpeft.merging.output import atomic_output, check_outputs
from clpeft.merging.registry import get_method

__all__ = ["SearchResult", "parse_search", "search_merge"]

METRIC = "acc_last"
_MAX_VALUES = 1000


@dataclass
class SearchResult:
    """The grid, each value's score and the choice; written as ``<out stem>.search.json``."""

    parameter: str
    on: str
    metric: str = METRIC
    table: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def parse_search(text: str) -> tuple[str, list[float]]:
    """``KEY=START:STOP:STEP`` (``STOP`` included) or ``KEY=V1,V2,...`` -> ``(KEY, values)``.

    Grid values are ``START + i * STEP`` rounded to the decimals given, so ``0.3:1.5:0.1`` is
    exactly 0.3, 0.4, ..., 1.5 (13 values), as the official ``round(lam, 1)`` makes them.

    Raises:
        UserError: for anything else, under the key ``--search``.
    """
    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or not key or not spec.strip():
        raise UserError(f"expects KEY=START:STOP:STEP or KEY=V1,V2,..., got {text!r}", key="--search")
    try:
        if ":" in spec:
            parts = [Decimal(p.strip()) for p in spec.split(":")]
            if len(parts) != 3:
                raise InvalidOperation
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise UserError(f"needs STEP > 0 and STOP >= START, got {spec!r}", key="--search")
            count = int((stop - start) / step) + 1
            if count > _MAX_VALUES:
                raise UserError(f"{spec!r} is {count} values; at most {_MAX_VALUES}", key="--search")
            values = [float(start + i * step) for i in range(count)]
        else:
            values = [float(Decimal(v.strip())) for v in spec.split(",")]
    except InvalidOperation:
        raise UserError(f"expects KEY=START:STOP:STEP or KEY=V1,V2,... with numbers, got {text!r}", key="--search") from None
    if not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
        raise UserError(f"values must be finite and distinct, got {spec!r}", key="--search")
    return key, values


def search_merge(
    merge: Callable[..., Any],
    *,
    method: str,
    params: Mapping[str, Any],
    parameter: str,
    values: list[float],
    score: Callable[[Path, Path], dict],
    on: str | Path,
    out: Path,
    outputs: Mapping[str, Path],
    inputs: list[Path],
) -> tuple[Any, SearchResult]:
    """Score every value of ``parameter`` by ``score``; merge the best into ``out``.

    Args:
        merge: ``merge(out, report, **params)`` writes one merge and its report and returns the
            report (``merge_files`` with the models, rules, device and seed bound).
        method: the merge method (its parameters are checked for each value).
        params: the method's other parameters.
        parameter: the searched parameter, e.g. ``scale``.
        values: its grid.
        score: ``score(candidate, scratch)`` evaluates the merged weights file ``candidate`` (a
            run of the config ``on``, writing under the directory ``scratch``) and returns the
            run's result (``metrics`` with ``acc_last``, ``acc_matrix``). The command line
            passes a clpeft run (:mod:`clpeft.tools.merge_cli`), so merging never runs the engine.
        on: the run config that scores each merge (recorded in the table).
        out: the final merged file (candidates are written beside it, then removed).
        outputs: every file the search writes (``out``, ``report``, ``search``), checked first.
        inputs: every file the merge reads (for the same check).

    Returns:
        The final merge's report and the search's table.

    Raises:
        UserError: for a parameter the method lacks or a value it refuses, an output that would
            harm an input, or a config that cannot load the merge.
    """
    spec = get_method(method)
    if parameter not in spec.parameters:
        raise UserError(f"'{method}' has no parameter '{parameter}' (its parameters: {', '.join(spec.parameters)})", key="--search")
    if parameter in params:
        raise UserError(f"'{parameter}' is both set ({params[parameter]!r}) and searched; give it once", key="--search")
    for value in values:
        spec.validate({**params, parameter: value}, key="--search")
    check_outputs(outputs, inputs)
    result = SearchResult(parameter, str(on))
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.search-", dir=out.parent))
    try:
        for i, value in enumerate(values):
            candidate = scratch / f"candidate_{i}.safetensors"
            merge(candidate, scratch / f"candidate_{i}.report.json", **{**params, parameter: value})
            run = score(candidate, scratch / f"run_{i}")
            result.table.append({parameter: value, METRIC: run["metrics"][METRIC], "acc_matrix": run["acc_matrix"]})
            for path in scratch.iterdir():  # one candidate on disk at a time
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = max(result.table, key=lambda row: row[METRIC])  # the first of equal scores
    result.best = best[parameter]
    report = merge(out, outputs["report"], **{**params, parameter: result.best})
    with atomic_output(outputs["search"]) as f:
        f.write(result.to_json().encode())
    return report, result
