"""Errors of the device link (SMP over serial or BLE), one root split by who is at fault.

AgentError (device_agent.errors)
└── LinkError (device_agent.errors; refined here)
    ├── Disconnected      the link dropped or could not be opened (cable, radio, port)
    ├── LinkTimeout       the device did not answer within the configured time
    ├── ProtocolError     the device answered something that is not valid SMP for the request
    ├── DeviceRejected    the device refused the request with an error code (group, rc, reason)
    └── UploadMismatch    an upload completed but the device's copy hashes differently

Foreign errors (pyserial, bleak, bumble, smpclient) are mapped where they enter, in
:mod:`device_agent.link.transport`, with ``raise ... from exc``.
"""

from __future__ import annotations

from device_agent import errors as agent_errors


class LinkError(agent_errors.LinkError):
    """Root of every device-link error (an :class:`~device_agent.errors.AgentError`).

    Attributes:
        link: Which link (``serial:/dev/ttyACM0``, ``ble:F0:...``), when known.
    """

    def __init__(self, message: str, link: str = "") -> None:
        self.link = link
        super().__init__(f"{link}: {message}" if link else message)


class Disconnected(LinkError):
    """The link dropped, or could not be opened."""


class LinkTimeout(LinkError):
    """The device did not answer in time.

    Attributes:
        command: The request that went unanswered (``model.upload``).
        timeout_s: How long the client waited.
    """

    def __init__(self, command: str, timeout_s: float, link: str = "") -> None:
        self.command = command
        self.timeout_s = timeout_s
        super().__init__(f"no answer to {command} within {timeout_s:g} s", link)


class ProtocolError(LinkError):
    """The device's answer is not a valid SMP response to the request."""


class DeviceRejected(LinkError):
    """The device refused a request.

    Attributes:
        group: The SMP group of the request.
        command: The command id.
        rc: The device's error code (see ``docs/device-protocol.md``).
        rc_name: The code's name (``ROLLBACK``), or ``rc=<n>`` for an unknown code.
        reason: The device's reason text, if it sent one.
    """

    def __init__(
        self, group: int, command: int, rc: int, rc_name: str, reason: str = "", link: str = ""
    ) -> None:
        self.group = group
        self.command = command
        self.rc = rc
        self.rc_name = rc_name
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"device refused group {group} command {command}: {rc_name}{detail}", link)


class UploadMismatch(LinkError):
    """Every byte was acknowledged, but the device's SHA-256 differs from the upload's.

    Attributes:
        sha256: The hex SHA-256 the client announced.
    """

    def __init__(self, sha256: str, link: str = "") -> None:
        self.sha256 = sha256
        super().__init__(f"device's copy does not match sha256 {sha256[:16]}...", link)
