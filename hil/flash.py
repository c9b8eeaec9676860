"""File-backed flash for emulated devices, with a power cut that can fall between any two writes.

The file outlives the emulated device: "restarting" a device means building a new one over the
same file, as a board boots from the flash it had. Every write and erase counts as one
operation; :class:`PowerCut` armed at operation N lets N-1 complete and kills the device at N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hil.errors import FlashError, PowerCut

ERASED = 0xFF


@dataclass(frozen=True)
class Region:
    """A named area of flash."""

    name: str
    offset: int
    size: int


class FlashLayout:
    """Regions laid out back to back, each aligned to the erase page."""

    def __init__(self, sizes: dict[str, int], page_bytes: int = 4096) -> None:
        self.page_bytes = page_bytes
        self.regions: dict[str, Region] = {}
        offset = 0
        for name, size in sizes.items():
            aligned = -(-size // page_bytes) * page_bytes
            self.regions[name] = Region(name, offset, aligned)
            offset += aligned
        self.total_bytes = offset

    def region(self, name: str) -> Region:
        """The region called ``name``.

        Raises:
            FlashError: If there is none.
        """
        try:
            return self.regions[name]
        except KeyError:
            raise FlashError(f"no flash region {name!r}") from None


class Flash:
    """A flash chip in a file.

    Args:
        path: The backing file; created (erased) if missing, reused as it is otherwise.
        layout: The regions.
    """

    def __init__(self, path: Path, layout: FlashLayout) -> None:
        self.path = path
        self.layout = layout
        self.operations = 0
        self._cut_at: int | None = None
        self._dead = False
        fresh = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FlashError(f"cannot open flash file {path}: {exc.strerror}") from exc
        if fresh or os.fstat(self._fd).st_size < layout.total_bytes:
            self._fill(0, layout.total_bytes, keep_existing=not fresh)

    def arm_power_cut(self, at_operation: int | None) -> None:
        """Cut power at the ``at_operation``-th write or erase from now (None disarms)."""
        self._cut_at = None if at_operation is None else self.operations + at_operation
        self._dead = False

    @property
    def dead(self) -> bool:
        """Whether the power cut has happened."""
        return self._dead

    def read(self, region: str, offset: int, length: int) -> bytes:
        """Read bytes from a region.

        Raises:
            FlashError: If the range leaves the region.
            PowerCut: If the power is off.
        """
        self._alive()
        start = self._address(region, offset, length)
        return os.pread(self._fd, length, start)

    def write(self, region: str, offset: int, data: bytes) -> None:
        """Program bytes into a region (one operation).

        Raises:
            FlashError: If the range leaves the region.
            PowerCut: If the power goes at this operation.
        """
        start = self._address(region, offset, len(data))
        self._operation()
        os.pwrite(self._fd, data, start)

    def erase(self, region: str) -> None:
        """Erase a whole region (one operation).

        Raises:
            PowerCut: If the power goes at this operation.
        """
        area = self.layout.region(region)
        self._operation()
        self._fill(area.offset, area.size, keep_existing=False)

    def close(self) -> None:
        """Close the backing file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _operation(self) -> None:
        self._alive()
        self.operations += 1
        if self._cut_at is not None and self.operations >= self._cut_at:
            self._dead = True
            raise PowerCut(f"power cut at flash operation {self.operations}")

    def _alive(self) -> None:
        if self._dead:
            raise PowerCut("the power is off")

    def _address(self, region: str, offset: int, length: int) -> int:
        area = self.layout.region(region)
        if offset < 0 or length < 0 or offset + length > area.size:
            raise FlashError(
                f"{length} bytes at {offset} leave region {region} of {area.size} bytes"
            )
        return area.offset + offset

    def _fill(self, start: int, size: int, *, keep_existing: bool) -> None:
        if keep_existing:
            start = max(start, os.fstat(self._fd).st_size)
            size = self.layout.total_bytes - start
        page = bytes([ERASED]) * self.layout.page_bytes
        for offset in range(start, start + size, len(page)):
            os.pwrite(self._fd, page[: min(len(page), start + size - offset)], offset)
