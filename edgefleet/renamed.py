"""CLI options renamed to the one vocabulary (docs/names.md): their old spellings still work and
are hidden from ``--help``; a command takes the value from :func:`renamed`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from edgefleet.common import fail

#: ``--target``: ``--hardware-id`` before (``bundle verify``, ``release``).
OldTargetOpt = Annotated[str | None, typer.Option("--target", hidden=True)]
#: ``--target``, repeatable: ``--hardware-id`` before (``hil samples``).
OldTargetListOpt = Annotated[list[str] | None, typer.Option("--target", hidden=True)]
#: ``--targets``: ``--hardware-ids`` before (``convert``).
OldTargetsOpt = Annotated[str | None, typer.Option("--targets", hidden=True)]
#: ``--target`` and ``EDGEFLEET_AGENT_TARGET_ID``: ``--hardware-id`` before (``agent run``).
OldAgentTargetOpt = Annotated[
    str | None, typer.Option("--target", envvar="EDGEFLEET_AGENT_TARGET_ID", hidden=True)
]


def renamed(value: Any, old_value: Any, name: str, old_name: str) -> Any:
    """An option's value, given under its ``name`` or under ``old_name``, the spelling it had
    before; giving both exits 2."""
    if old_value is None or old_value == []:
        return value
    if value is not None and value != []:
        fail(f"{old_name} is the old spelling of {name}: give one of them", 2)
    return old_value
