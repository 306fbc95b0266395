"""clpeft.schema: one builder and one checker for config sections and merge-method parameters."""

from __future__ import annotations

import inspect
from typing import Annotated, Literal

import pytest
from pydantic import Field, model_validator

from clpeft.errors import UserError, UserErrors
from clpeft.schema import Options, flat_options, model_from_signature, validate


class Steps(Options):
    """A shared block with a rule spanning two fields."""

    optimizer: Literal["adam", "sgd"] = Field("adam", description="which optimizer")
    lr: float = Field(1e-3, gt=0, description="step size")
    momentum: float = Field(0.9, ge=0, lt=1)

    @model_validator(mode="after")
    def _adam_needs_momentum(self):
        if self.optimizer == "adam" and self.momentum == 0:
            raise ValueError("adam needs momentum > 0 (its beta1)")
        return self


SGD_STEPS = Steps(optimizer="sgd")


class Method:
    @flat_options
    def __init__(self, backbone, steps: Steps = SGD_STEPS, alpha: Annotated[int, Field(ge=1)] = 2):
        self.backbone, self.steps, self.alpha = backbone, steps, alpha


def _schema():
    return model_from_signature("MethodConfig", Method.__init__, skip={"self", "backbone"})


def test_flat_options_list_the_fields_with_this_class_defaults():
    signature = inspect.signature(Method.__init__)
    assert list(signature.parameters) == ["self", "backbone", "optimizer", "lr", "momentum", "alpha"]
    assert signature.parameters["optimizer"].default == "sgd" and signature.parameters["lr"].default == 1e-3
    fields = _schema().model_fields
    assert list(fields) == ["optimizer", "lr", "momentum", "alpha"]
    assert fields["optimizer"].default == "sgd" and fields["optimizer"].description == "which optimizer"
    assert fields["lr"].metadata and fields["alpha"].metadata  # bounds kept, shared and own


def test_flat_keys_build_one_validated_options_object():
    m = Method("b", lr=0.5, alpha=3)
    assert m.steps == Steps(optimizer="sgd", lr=0.5) and m.alpha == 3 and m.backbone == "b"
    assert Method("b").steps == Steps(optimizer="sgd")
    assert Method("b", steps=Steps(lr=0.1)).steps == Steps(lr=0.1)  # the object itself
    assert Method("b", "adam", 0.1).steps == Steps(lr=0.1)  # positionally, in signature order
    with pytest.raises(UserError, match="^lr: input should be greater than 0, got -1$"):
        Method("b", lr=-1)
    with pytest.raises(UserError, match="adam needs momentum > 0"):
        Method("b", optimizer="adam", momentum=0.0)
    with pytest.raises(TypeError, match="not both"):
        Method("b", steps=Steps(), lr=0.1)
    with pytest.raises(TypeError):
        Method("b", lrr=0.1)


def test_section_schema_applies_the_options_rules_spanning_fields():
    schema = _schema()
    assert validate(schema, {"lr": "0.5"}, "strategy").lr == 0.5
    with pytest.raises(UserError, match="^strategy: adam needs momentum > 0 \\(its beta1\\)$"):
        validate(schema, {"optimizer": "adam", "momentum": 0.0}, "strategy")


def test_one_line_per_mistake_with_key_path_and_closest_spelling():
    with pytest.raises(UserErrors) as info:
        validate(_schema(), {"lr": 0, "alpah": 2, "optimizer": "adamw"}, "strategy")
    assert info.value.messages == [
        "strategy.optimizer: input should be 'adam' or 'sgd', got 'adamw'",
        "strategy.lr: input should be greater than 0, got 0",
        "strategy.alpah: unknown key; did you mean 'alpha'?; known keys: optimizer, lr, momentum, alpha",
    ]
    with pytest.raises(UserError, match="^strategy.alpha: expected a number, got the boolean true; write the number$"):
        validate(_schema(), {"alpha": True}, "strategy")


def test_model_from_signature_required_inferred_and_annotated_parameters():
    def untyped(self, size, scale=1.5, *, name: str = "x", **rest):
        pass

    model = model_from_signature("Untyped", untyped, skip={"self"})
    assert model.model_fields["size"].is_required() and model.model_fields["scale"].annotation is float
    keyword = model_from_signature("Keyword", untyped, keyword_only=True)
    assert list(keyword.model_fields) == ["name"]
    with pytest.raises(TypeError, match="merge method 'm': parameter 'size' needs a type annotation"):
        model_from_signature("M", untyped, skip={"self"}, owner="merge method 'm'")


def test_an_options_parameter_needs_a_default_holding_the_class_values():
    with pytest.raises(TypeError, match="needs a default Steps"):

        class Broken:
            @flat_options
            def __init__(self, steps: Steps):
                pass
