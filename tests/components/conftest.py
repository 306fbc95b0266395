"""Shared by the component tests."""

import pytest


@pytest.fixture(scope="module")
def peft():
    """peft, or the test skips (it is a test extra)."""
    return pytest.importorskip("peft")
