"""The emulated device's persistent state record, kept twice in flash so one write is atomic.

Each save writes the whole record (JSON, CRC-32, sequence number) over the older copy; at boot
the valid copy with the higher sequence wins. A power cut falls between writes, never inside
one, so the device always finds either the old record or the new one.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from firmware_bundles.anti_rollback import ReleaseCounters
from hil.flash import Flash

RECORD_REGIONS = ("record-a", "record-b")
_MAGIC = b"EFR1"
_HEADER = struct.Struct("<4sII")  # magic, length, crc32


@dataclass
class SlotRecord:
    """What a model slot holds, as persisted."""

    state: str = "empty"
    model: str | None = None
    version: str | None = None
    sha256: str | None = None
    length: int = 0
    release_counter: int = 0


@dataclass
class ImageRecord:
    """A firmware image in a slot."""

    sha256: str
    length: int
    version: str


@dataclass
class FirmwareRecord:
    """Firmware slots as the emulated bootloader sees them."""

    primary: ImageRecord | None = None
    secondary: ImageRecord | None = None
    #: The secondary is marked for test: swap it in at the next boot.
    pending: bool = False
    #: The running image is confirmed (a test image that is not gets swapped back at boot).
    confirmed: bool = True


@dataclass
class DeviceRecord:
    """Everything the emulated device keeps across power cycles."""

    seq: int = 0
    boot_epoch: int = 0
    active: int | None = None
    confirmed: bool = True
    fallback: int | None = None
    slots: list[SlotRecord] = field(default_factory=lambda: [SlotRecord(), SlotRecord()])
    #: The anti-rollback floors per model (docs/rollback.md), with the highest release
    #: counter installed and self-tested, and the highest the director said was confirmed.
    counters: dict[str, int] = field(default_factory=dict)
    installed_counters: dict[str, int] = field(default_factory=dict)
    confirmed_counters: dict[str, int] = field(default_factory=dict)
    firmware: FirmwareRecord = field(default_factory=FirmwareRecord)

    def release_counters(self) -> ReleaseCounters:
        """The counters as the shared rule keeps them."""
        return ReleaseCounters(
            dict(self.counters), dict(self.installed_counters), dict(self.confirmed_counters)
        )

    def keep(self, counters: ReleaseCounters) -> None:
        """Take ``counters`` into the record (the caller saves it)."""
        self.counters = dict(counters.floors)
        self.installed_counters = dict(counters.installed)
        self.confirmed_counters = dict(counters.confirmed)

    def to_bytes(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return _HEADER.pack(_MAGIC, len(body), zlib.crc32(body)) + body

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceRecord | None:
        """The record in ``data``, or None if it is erased, torn or corrupt."""
        if len(data) < _HEADER.size:
            return None
        magic, length, crc = _HEADER.unpack_from(data)
        body = data[_HEADER.size : _HEADER.size + length]
        if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
            return None
        return _from_dict(json.loads(body))


def _image(raw: dict[str, Any] | None) -> ImageRecord | None:
    return None if raw is None else ImageRecord(**raw)


def _from_dict(raw: dict[str, Any]) -> DeviceRecord:
    firmware = raw.get("firmware", {})
    return DeviceRecord(
        seq=raw["seq"],
        boot_epoch=raw["boot_epoch"],
        active=raw["active"],
        confirmed=raw["confirmed"],
        fallback=raw["fallback"],
        slots=[SlotRecord(**s) for s in raw["slots"]],
        counters=dict(raw["counters"]),
        # A record from before the rule: its counters rose at each confirm, so they are also
        # the highest installed.
        installed_counters=dict(raw.get("installed_counters", raw["counters"])),
        confirmed_counters=dict(raw.get("confirmed_counters", {})),
        firmware=FirmwareRecord(
            primary=_image(firmware.get("primary")),
            secondary=_image(firmware.get("secondary")),
            pending=firmware.get("pending", False),
            confirmed=firmware.get("confirmed", True),
        ),
    )


def load_record(flash: Flash) -> DeviceRecord | None:
    """The newest valid record in flash, or None on a factory-fresh chip."""
    found = []
    for region in RECORD_REGIONS:
        size = flash.layout.region(region).size
        record = DeviceRecord.from_bytes(flash.read(region, 0, size))
        if record is not None:
            found.append(record)
    return max(found, key=lambda r: r.seq) if found else None


def save_record(flash: Flash, record: DeviceRecord) -> None:
    """Persist ``record`` with the next sequence number, over the older copy (one write).

    Raises:
        PowerCut: If the power goes at this write; the previous record stays valid.
        FlashError: If the record outgrows its region.
    """
    record.seq += 1
    # Copies alternate by sequence parity, so the other copy always holds the previous record.
    flash.write(RECORD_REGIONS[record.seq % 2], 0, record.to_bytes())
