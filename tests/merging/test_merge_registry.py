"""A typed function becomes a merge method: schema, checks, and end-to-end use."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging import get_method, list_methods, merge, merge_method
from clpeft.merging.registry import _METHODS


@pytest.fixture
def median_method():
    @merge_method("test_median", reference_url="https://example.org/median")
    def median(task_vectors: torch.Tensor, *, scale: Annotated[float, Field(gt=0)] = 1.0) -> torch.Tensor:
        """Entry-wise median of the task vectors (a test method)."""
        return task_vectors.median(dim=0).values * scale

    yield get_method("test_median")
    del _METHODS["test_median"]


def test_a_registered_function_is_a_method(models, median_method):
    assert median_method.parameters == ["scale"]
    assert median_method.description == "Entry-wise median of the task vectors (a test method)."
    assert "test_median" in [m.name for m in list_methods()]
    base, finetuned = models
    merged = merge(base, finetuned, "test_median", scale=2.0)
    name = "blocks.0.attn.qkv.weight"
    expected = base[name] + 2.0 * torch.stack([m[name] - base[name] for m in finetuned]).median(dim=0).values
    torch.testing.assert_close(merged[name], expected)
    with pytest.raises(UserError, match="parameters.scale: input should be greater than 0"):
        merge(base, finetuned, "test_median", scale=-1.0)


def test_registration_errors(median_method):
    with pytest.raises(ValueError, match="already registered"):

        @merge_method("test_median", reference_url="x")
        def other(task_vectors: torch.Tensor) -> torch.Tensor:
            return task_vectors.sum(0)

    with pytest.raises(TypeError, match="'density' needs a type annotation"):

        @merge_method("test_untyped", reference_url="x")
        def untyped(task_vectors: torch.Tensor, *, density=0.5) -> torch.Tensor:
            return task_vectors.sum(0)


def test_builtins_cite_their_papers():
    urls = {m.name: m.reference_url for m in list_methods()}
    assert urls == {
        "adamerging": "https://arxiv.org/abs/2310.02575",
        "arcee_fusion": "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
        "breadcrumbs": "https://arxiv.org/abs/2312.06795",
        "consensus": "https://arxiv.org/abs/2405.07813",
        "dare": "https://arxiv.org/abs/2311.03099",
        "della": "https://arxiv.org/abs/2406.11617",
        "emr": "https://arxiv.org/abs/2405.17461",
        "fisher": "https://arxiv.org/abs/2111.09832",
        "iso_c": "https://arxiv.org/abs/2502.04959",
        "iso_cts": "https://arxiv.org/abs/2502.04959",
        "karcher": "https://arxiv.org/abs/2603.04972",
        "linear": "https://arxiv.org/abs/2203.05482",
        "lines": "https://arxiv.org/abs/2410.17146",
        "mean": "https://arxiv.org/abs/2203.05482",
        "model_stock": "https://arxiv.org/abs/2403.19522",
        "multislerp": "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        "nearswap": "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        "nuslerp": "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        "ram": "https://arxiv.org/abs/2601.13572",
        "ramplus_tl": "https://arxiv.org/abs/2601.13572",
        "regmean": "https://arxiv.org/abs/2212.09849",
        "sce": "https://arxiv.org/abs/2408.07990",
        "slerp": "https://doi.org/10.1145/325165.325242",
        "task_arithmetic": "https://arxiv.org/abs/2212.04089",
        "ties": "https://arxiv.org/abs/2306.01708",
        "tsv": "https://arxiv.org/abs/2412.00081",
    }


def test_parameters_are_checked_as_run_config_keys_are(median_method):
    """One schema module (clpeft.schema) for both: a boolean is not a number, and every mistake is a line."""
    from clpeft.errors import UserErrors

    with pytest.raises(UserError, match="^parameters.scale: expected a number, got the boolean true; write the number$"):
        median_method.validate({"scale": True})
    with pytest.raises(UserErrors) as info:
        median_method.validate({"scale": -1.0, "scael": 2.0}, key="merge.parameters")
    assert info.value.messages == [
        "merge.parameters.scale: input should be greater than 0, got -1.0",
        "merge.parameters.scael: unknown parameter of merge method 'test_median'; did you mean 'scale'? (its parameters: scale)",
    ]
    assert median_method.validate({"scale": "2"}) == {"scale": 2.0}  # YAML text coerced as a config's
