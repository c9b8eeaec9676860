"""Device links: SMP (MCUmgr) to rings and boards over serial and BLE.

:class:`DeviceLink` is the one transport protocol; :class:`DeviceClient` speaks the OS, image and
model groups over any link. The model group is specified in ``docs/device-protocol.md``.
Importing this package needs neither bleak nor Bumble (see :mod:`device_agent.link.ble`).
"""

from device_agent.link.client import DeviceClient, InferResult, Parameters, TelemetryRead
from device_agent.link.config import LinkSettings
from device_agent.link.errors import (
    DeviceRejected,
    Disconnected,
    LinkError,
    LinkTimeout,
    ProtocolError,
    UploadMismatch,
)
from device_agent.link.memory import MemoryLink
from device_agent.link.model_group import MODEL_GROUP_ID, ModelCommand, ModelRc
from device_agent.link.transport import DeviceLink, SMPTransportLink, serial_link
from device_agent.link.upload import UploadResult

__all__ = [
    "MODEL_GROUP_ID",
    "DeviceClient",
    "DeviceLink",
    "DeviceRejected",
    "Disconnected",
    "InferResult",
    "LinkError",
    "LinkSettings",
    "LinkTimeout",
    "MemoryLink",
    "ModelCommand",
    "ModelRc",
    "Parameters",
    "ProtocolError",
    "SMPTransportLink",
    "TelemetryRead",
    "UploadMismatch",
    "UploadResult",
    "serial_link",
]
