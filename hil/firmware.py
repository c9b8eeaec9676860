"""The image group (1) of an emulated device: firmware upload, test and confirm, as MCUboot does.

An image is uploaded into the secondary slot (SHA-256 resume), marked for test, swapped in at
the next boot, and swapped back at the boot after that unless the running firmware confirmed
it. Images carry an MCUboot header (magic and version); the image hash is the SHA-256 of the
whole image.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from smp import image_management as smpimg

from hil.errors import Refusal
from hil.flash import Flash
from hil.record import DeviceRecord, ImageRecord, save_record

PRIMARY, SECONDARY = "image-0", "image-1"
IMAGE_MAGIC = 0x96F3B83D
_HEADER = struct.Struct("<IIHHII BBHI I")  # magic .. flags, version (major minor rev build), pad
_ERR = smpimg.IMG_MGMT_ERR


def make_image(version: str, body: bytes) -> bytes:
    """An image with an MCUboot header for ``version`` (``major.minor.revision``)."""
    major, minor, revision = (int(p) for p in version.split("."))
    header = _HEADER.pack(
        IMAGE_MAGIC, 0, _HEADER.size, 0, len(body), 0, major, minor, revision, 0, 0
    )
    return header + body


def image_version(image: bytes) -> str | None:
    """The version in an image's MCUboot header, or None if it has none."""
    if len(image) < _HEADER.size:
        return None
    fields = _HEADER.unpack_from(image)
    if fields[0] != IMAGE_MAGIC:
        return None
    return f"{fields[6]}.{fields[7]}.{fields[8]}"


class FirmwareSlots:
    """Primary (running) and secondary (staging) firmware slots."""

    def __init__(self, flash: Flash, record: DeviceRecord, slot_bytes: int) -> None:
        self.flash = flash
        self.record = record
        self.slot_bytes = slot_bytes
        self._session: tuple[bytes | None, int, Any] | None = None  # sha, length, hasher
        self._off = 0

    @property
    def version(self) -> str:
        primary = self.record.firmware.primary
        return primary.version if primary else "0.0.0"

    def boot(self, factory_version: str) -> None:
        """Install the factory image on a fresh chip; swap a test image in or back out."""
        firmware = self.record.firmware
        if firmware.primary is None:
            image = make_image(factory_version, bytes(1024))
            self.flash.write(PRIMARY, 0, image)
            firmware.primary = ImageRecord(
                hashlib.sha256(image).hexdigest(), len(image), factory_version
            )
            save_record(self.flash, self.record)
        elif firmware.pending:
            self._swap()
            firmware.pending, firmware.confirmed = False, False
            save_record(self.flash, self.record)
        elif not firmware.confirmed and firmware.secondary is not None:
            self._swap()
            firmware.confirmed = True
            save_record(self.flash, self.record)

    def _swap(self) -> None:
        firmware = self.record.firmware
        assert firmware.primary is not None and firmware.secondary is not None
        primary = self.flash.read(PRIMARY, 0, firmware.primary.length)
        secondary = self.flash.read(SECONDARY, 0, firmware.secondary.length)
        self.flash.write(PRIMARY, 0, secondary)
        self.flash.write(SECONDARY, 0, primary)
        firmware.primary, firmware.secondary = firmware.secondary, firmware.primary

    def upload(self, request: smpimg.ImageUploadWriteRequest) -> dict[str, Any]:
        """Apply one image upload request; returns the response fields.

        Raises:
            Refusal: With an image-group error code.
        """
        if request.off == 0:
            length, sha = request.len, request.sha
            if length is None:
                raise Refusal(_ERR.INVALID_LENGTH, "offset 0 needs len")
            session = self._session
            same = sha is not None and session is not None and session[:2] == (bytes(sha), length)
            # A finished upload that did not match its SHA-256 is never resumed: it starts over.
            corrupt = same and self._off == length and not self._progress(length).get("match")
            if same and not corrupt:
                if self._off > 0:
                    return self._progress(length)
            else:
                if length > self.slot_bytes:
                    raise Refusal(
                        _ERR.INVALID_IMAGE_TOO_LARGE,
                        f"image is {length} bytes, slot holds {self.slot_bytes}",
                    )
                firmware = self.record.firmware
                if firmware.secondary is not None or firmware.pending:
                    firmware.secondary, firmware.pending = None, False
                    save_record(self.flash, self.record)
                self.flash.erase(SECONDARY)
                self._session = (bytes(sha) if sha else None, length, hashlib.sha256())
                self._off = 0
        if self._session is None:
            raise Refusal(_ERR.INVALID_OFFSET, "no upload in progress; start at offset 0")
        sha, length, hasher = self._session
        if request.off != self._off or self._off == length:
            return self._progress(length)
        if request.off + len(request.data) > length:
            raise Refusal(_ERR.INVALID_IMAGE_DATA_OVERRUN, "data runs past the image length")
        self.flash.write(SECONDARY, request.off, request.data)
        hasher.update(request.data)
        self._off += len(request.data)
        if self._off == length:
            digest = hasher.digest()
            image = self.flash.read(SECONDARY, 0, length)
            version = image_version(image) or "0.0.0"
            self.record.firmware.secondary = ImageRecord(digest.hex(), length, version)
            save_record(self.flash, self.record)
        return self._progress(length)

    def _progress(self, length: int) -> dict[str, Any]:
        if self._off < length:
            return {"off": self._off}
        assert self._session is not None
        sha = self._session[0]
        secondary = self.record.firmware.secondary
        match = secondary is not None and (sha is None or secondary.sha256 == sha.hex())
        return {"off": self._off, "match": match}

    def states(self) -> list[dict[str, Any]]:
        """The ``images`` list of a state response."""
        firmware = self.record.firmware
        images = []
        if firmware.primary is not None:
            images.append(
                {
                    "slot": 0,
                    "version": firmware.primary.version,
                    "hash": bytes.fromhex(firmware.primary.sha256),
                    "bootable": True,
                    "active": True,
                    "confirmed": firmware.confirmed,
                    "permanent": firmware.confirmed,
                }
            )
        if firmware.secondary is not None:
            images.append(
                {
                    "slot": 1,
                    "version": firmware.secondary.version,
                    "hash": bytes.fromhex(firmware.secondary.sha256),
                    "bootable": image_version(self._secondary_head()) is not None,
                    "pending": firmware.pending,
                }
            )
        return images

    def set_state(self, request: smpimg.ImageStatesWriteRequest) -> None:
        """Mark the secondary for test, or confirm the running image.

        Raises:
            Refusal: NO_IMAGE / INVALID_HASH / INVALID_IMAGE_HEADER_MAGIC.
        """
        firmware = self.record.firmware
        if request.confirm:
            if request.hash is not None and (
                firmware.primary is None or bytes(request.hash).hex() != firmware.primary.sha256
            ):
                raise Refusal(
                    _ERR.IMAGE_CONFIRMATION_DENIED, "only the running image can be confirmed"
                )
            firmware.confirmed = True
        else:
            secondary = firmware.secondary
            if secondary is None:
                raise Refusal(_ERR.NO_IMAGE, "no image in the secondary slot")
            if request.hash is None or bytes(request.hash).hex() != secondary.sha256:
                raise Refusal(_ERR.INVALID_HASH, "hash does not name the secondary image")
            if image_version(self._secondary_head()) is None:
                raise Refusal(
                    _ERR.INVALID_IMAGE_HEADER_MAGIC, "secondary image has no MCUboot header"
                )
            firmware.pending = True
        save_record(self.flash, self.record)

    def _secondary_head(self) -> bytes:
        return self.flash.read(SECONDARY, 0, _HEADER.size)
