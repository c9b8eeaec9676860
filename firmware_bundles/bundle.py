"""Building, signing, inspecting and verifying bundles: the bytes-level API.

``build`` turns a manifest draft and files into signed archive bytes; ``verify`` takes archive
bytes and a trusted root and returns the verified manifest and files, or raises why not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from firmware_bundles.archive import (
    ArchiveLimits,
    bundle_id,
    check_files,
    pack,
    read_members,
)
from firmware_bundles.catalogue import TargetCatalogue
from firmware_bundles.errors import SchemaError
from firmware_bundles.manifest import Manifest
from firmware_bundles.root import Root
from firmware_bundles.signing import Envelope, SigningKey


def created_at_from_env(environ: Mapping[str, str]) -> datetime | None:
    """The build time from ``SOURCE_DATE_EPOCH``, if set (reproducible builds convention).

    Raises:
        SchemaError: If the variable is set but not an integer.
    """
    raw = environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return None
    try:
        return datetime.fromtimestamp(int(raw), tz=UTC)
    except ValueError as exc:
        raise SchemaError(
            "environment", [f"SOURCE_DATE_EPOCH={raw!r} is not an integer"], []
        ) from exc


def file_entries(files: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """Manifest ``files`` entries for ``files``, sorted by path."""
    return [
        {"path": p, "sha256": hashlib.sha256(files[p]).hexdigest(), "length": len(files[p])}
        for p in sorted(files)
    ]


def build(draft: Mapping[str, Any], files: Mapping[str, bytes], keys: list[SigningKey]) -> bytes:
    """Complete a manifest draft with the files' entries, sign it and pack the bundle.

    ``draft`` holds every manifest field but ``files`` (which this fills in). It must carry
    ``created_at``; packing never reads the clock.

    Raises:
        SchemaError: If the completed manifest is invalid (naming the field).
        ArchiveError: If a file path is unsafe.
    """
    if "files" in draft:
        raise SchemaError("manifest", ["draft must not list files; they are computed"], ["files"])
    manifest = Manifest.from_dict({**draft, "files": file_entries(files)})
    envelope = Envelope(signed=manifest.to_dict())
    for key in keys:
        envelope.sign(key)
    return pack(envelope.to_bytes(), files)


@dataclass(frozen=True)
class BundleContents:
    """A parsed bundle; nothing in it is trusted until :func:`verify` returned it."""

    id: str | None
    envelope: Envelope
    manifest: Manifest
    files: dict[str, memoryview]
    size: int


def open_bundle(
    data: bytes, limits: ArchiveLimits | None = None, *, with_id: bool = False
) -> BundleContents:
    """Parse a bundle and check that its files match its manifest (not its signatures).

    Args:
        data: The archive bytes.
        limits: Caps on size and member count.
        with_id: Also hash the whole archive for its identity (one more pass over the bytes).

    Raises:
        ArchiveError: On unsafe members, missing or extra files, or hash and length mismatches.
        SchemaError: If the manifest is malformed.
    """
    contents = read_members(data, limits or ArchiveLimits())
    envelope = Envelope.from_bytes(contents.manifest_bytes, "manifest")
    manifest = Manifest.from_dict(envelope.signed)
    check_files(manifest, contents.members)
    return BundleContents(
        id=bundle_id(data) if with_id else None,
        envelope=envelope,
        manifest=manifest,
        files=contents.members,
        size=len(data),
    )


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose release signatures and file hashes checked out."""

    contents: BundleContents
    release_keyids: set[str]

    @property
    def manifest(self) -> Manifest:
        return self.contents.manifest

    def file(self, path: str) -> bytes:
        """The bytes of a listed file."""
        return bytes(self.contents.files[path])


def verify(
    data: bytes,
    root: Root,
    *,
    limits: ArchiveLimits | None = None,
    target_id: str | None = None,
    catalogue: TargetCatalogue | None = None,
    with_id: bool = False,
) -> VerifiedBundle:
    """Verify a bundle against a trusted root.

    Checks the archive's safety, the release-signature threshold over the manifest, every file's
    length and SHA-256, and, given ``target_id``, that the bundle is built for that target and fits
    it in the catalogue.

    Raises:
        ArchiveError: On any archive problem (a specific subclass).
        SchemaError: If the manifest is malformed.
        ThresholdError: If release signatures fall short.
        CatalogueError: If the bundle is not built for ``target_id`` or does not fit it.
    """
    contents = read_members(data, limits or ArchiveLimits())
    envelope = Envelope.from_bytes(contents.manifest_bytes, "manifest")
    keyids = root.verify(envelope, "release")
    manifest = Manifest.from_dict(envelope.signed)
    check_files(manifest, contents.members)
    if target_id is not None:
        (catalogue or TargetCatalogue.load_default()).check_fits(manifest, target_id, len(data))
    bundle = BundleContents(
        id=bundle_id(data) if with_id else None,
        envelope=envelope,
        manifest=manifest,
        files=contents.members,
        size=len(data),
    )
    return VerifiedBundle(contents=bundle, release_keyids=keyids)


def add_signature(data: bytes, key: SigningKey, limits: ArchiveLimits | None = None) -> bytes:
    """Return a new bundle with ``key``'s signature added to the manifest envelope.

    The files are unchanged but the archive bytes, and so the bundle's identity, are new.

    Raises:
        ArchiveError: If the input bundle is not sound.
        SchemaError: If its manifest is malformed.
    """
    contents = open_bundle(data, limits)
    contents.envelope.sign(key)
    files = {p: bytes(v) for p, v in contents.files.items()}
    return pack(contents.envelope.to_bytes(), files)
