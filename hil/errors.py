"""Errors of the hardware-in-the-loop package, one root split by fault.

HilError
├── FlashError        an emulated flash access is out of range or the file is unusable
├── PowerCut          the emulated device lost power (injected); it answers nothing until rebuilt
├── Refusal           the emulated device refuses a request (carries the model group's rc)
├── DeviceSpecError   a ``--device`` spec cannot be parsed or opened
└── RigError          the rig cannot run as asked (no bundle for a target, bad data file, keys)
"""

from __future__ import annotations


class HilError(Exception):
    """Root of every error raised by ``hil``."""


class FlashError(HilError):
    """An emulated flash access is out of range, or the backing file cannot be used."""


class PowerCut(HilError):
    """The emulated device lost power: an injected fault, not a bug."""


class Refusal(HilError):
    """The emulated device refuses a request.

    Attributes:
        rc: The error code sent to the client (a :class:`~device_agent.link.ModelRc` or an
            image-group code).
        reason: The reason text sent with it.
    """

    def __init__(self, rc: int, reason: str) -> None:
        self.rc = int(rc)
        self.reason = reason
        super().__init__(f"rc {int(rc)}: {reason}")


class DeviceSpecError(HilError):
    """A ``--device`` spec is malformed or names something that cannot be opened."""


class RigError(HilError):
    """The rig cannot run as asked."""
