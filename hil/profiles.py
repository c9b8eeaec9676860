"""What each emulated device is: its catalogue target, link, firmware and SMP buffers.

Budgets (bundle bytes, RAM arena, ops) come from the target catalogue, so an emulated ring refuses
exactly what a real one of that generation would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from firmware_bundles import DeviceTarget, TargetCatalogue
from hil.errors import DeviceSpecError


@dataclass(frozen=True)
class DeviceProfile:
    """One emulated device model.

    Attributes:
        target: The catalogue entry (hardware id, budgets, ops, firmware range).
        link: How it is reached: ``ble`` (Bumble GATT server) or ``serial`` (pty).
        firmware_version: The factory firmware's version.
        buf_size: MCUmgr ``buf_size`` (bytes of one SMP request).
        buf_count: MCUmgr ``buf_count`` (requests it can hold at once).
        firmware_slot_bytes: Size of each firmware image slot.
        telemetry_window_s: Length of its telemetry windows.
    """

    target: DeviceTarget
    link: Literal["ble", "serial"]
    firmware_version: str
    buf_size: int
    buf_count: int
    firmware_slot_bytes: int = 256 * 1024
    telemetry_window_s: int = 3600

    @property
    def hardware_id(self) -> str:
        return self.target.hardware_id


# (link, factory firmware, buf_size, buf_count). BLE rings use 2440-byte buffers: ten 244-byte
# ATT writes, which fill one 15 ms connection event at 2M PHY with data length 251.
_EMULATED: dict[str, tuple[Literal["ble", "serial"], str, int, int]] = {
    "ring-gen3": ("ble", "3.2.0", 2440, 4),
    "ring-gen4": ("ble", "4.1.0", 2440, 6),
    "devboard-nrf52840": ("serial", "1.4.0", 2048, 4),
}


def emulated_targets() -> list[str]:
    """Hardware ids the rig can emulate."""
    return sorted(_EMULATED)


def profile_for(hardware_id: str, catalogue: TargetCatalogue | None = None) -> DeviceProfile:
    """The emulated device profile of ``hardware_id``.

    Raises:
        DeviceSpecError: If the target cannot be emulated, naming the ones that can.
    """
    if hardware_id not in _EMULATED:
        known = ", ".join(emulated_targets())
        raise DeviceSpecError(f"no emulated device for {hardware_id!r}; emulated: {known}")
    link, firmware, buf_size, buf_count = _EMULATED[hardware_id]
    target = (catalogue or TargetCatalogue.load_default()).get(hardware_id)
    return DeviceProfile(target, link, firmware, buf_size, buf_count)
