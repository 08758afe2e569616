"""The public names each module exports are exactly the ones docs/api.md lists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented() -> dict[str, list[str]]:
    """module -> the names listed under its heading (``## `module```, then ``- `name` ...``)."""
    names: dict[str, list[str]] = {}
    module = None
    for line in API.read_text().splitlines():
        heading = re.match(r"## `([\w.]+)`", line)
        if heading:
            module = heading.group(1)
            names[module] = []
        item = re.match(r"- `(\w+)`", line)
        if item and module is not None:
            names[module].append(item.group(1))
    return names


def test_the_docs_list_three_modules():
    assert set(documented()) == {"capsule_actors", "capsule_actors.ui", "capsule_actors.testing"}


@pytest.mark.parametrize("module", sorted(documented()))
def test_exports_match_the_docs(module: str):
    listed = documented()[module]
    exported = list(importlib.import_module(module).__all__)
    assert len(listed) == len(set(listed)), f"docs/api.md lists a name of {module} twice"
    assert sorted(exported) == sorted(listed), (
        f"{module}: exported but not in docs/api.md: {sorted(set(exported) - set(listed))}; "
        f"in docs/api.md but not exported: {sorted(set(listed) - set(exported))}"
    )
    for name in exported:
        assert hasattr(importlib.import_module(module), name), f"{module}.__all__ names {name}, which it lacks"
