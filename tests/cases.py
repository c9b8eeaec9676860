"""Tables of named test cases: each case a tuple whose first item is its id."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest


def named_cases(argnames: Sequence[str], cases: Sequence[Sequence[Any]]) -> pytest.MarkDecorator:
    """``pytest.mark.parametrize`` over ``cases``: the first item of each names it, the rest are
    its values for ``argnames``."""
    return pytest.mark.parametrize(
        tuple(argnames), [tuple(c[1:]) for c in cases], ids=[str(c[0]) for c in cases]
    )
