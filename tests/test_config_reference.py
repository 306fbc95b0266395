"""``docs/config_reference.md`` stays true: it is exactly the page generated from the schemas."""

from __future__ import annotations

from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config_reference.md"


def test_yaml_reference_matches_the_schemas():
    """Generated in a fresh interpreter: other tests register plug-ins (the README's example) in this one."""
    import subprocess
    import sys

    page = subprocess.run([sys.executable, "-m", "clpeft", "list", "--markdown"], capture_output=True, text=True, check=True).stdout
    assert PAGE.read_text() == page, "regenerate with: clpeft list --markdown > docs/config_reference.md"


def test_reference_types_read_as_written_in_yaml():
    """Bounds of nested types stay readable (no pydantic reprs): lists of bounded numbers, pairs, models."""
    from typing import Annotated

    from pydantic import BaseModel, Field

    from clpeft.tools.docs import _type_name

    class Domain(BaseModel):
        name: str = ""

    positive = Annotated[float, Field(gt=0, le=1)]
    assert _type_name(list[Annotated[int, Field(ge=0)]]) == "list[int >= 0]"
    assert _type_name(positive | tuple[positive, positive]) == "float > 0 <= 1 \\| [float > 0 <= 1, float > 0 <= 1]"
    assert _type_name(list[Domain] | None) == "list[Domain] \\| None"
    assert _type_name(dict[str, int]) == "dict[str, int]"
