"""Building, signing, inspecting and verifying bundles: the bytes-level API.

``build`` turns a manifest draft and files into signed archive bytes; ``verify`` takes archive
bytes and a trusted root and returns the verified manifest and files, or raises why not.
:class:`BundleReader` does the same from pieces its caller reads, so a bundle on disk is checked
without holding it in memory (the release signatures before any file is read).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from firmware_bundles.archive import ArchiveLimits, ArchiveReader, pack
from firmware_bundles.catalogue import TargetCatalogue
from firmware_bundles.errors import SchemaError, SizeLimitError
from firmware_bundles.manifest import Manifest, SelfTestFile
from firmware_bundles.reference import ReferenceFile, attach
from firmware_bundles.root import Root
from firmware_bundles.selftest import attach_vectors
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

    bundle_sha256: str | None
    envelope: Envelope
    manifest: Manifest
    files: dict[str, memoryview]
    size: int


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


class BundleReader:
    """Opens or verifies a bundle from pieces its caller reads (see :class:`ArchiveReader`).

    With a ``root``, the manifest's release signatures are checked as soon as the manifest
    member is complete, before any file is read.

    Args:
        limits: Caps on size and member count.
        root: Verify release signatures against this root (else only open the bundle).
        keep_files: Keep every file's bytes (else only hash the model file, and keep the files
            beside it that are no bigger than a manifest may be). The self-test vectors and the
            reference file are decoded whenever their file was kept.
        with_bundle_sha256: Hash the whole archive for its identity.
    """

    def __init__(
        self,
        limits: ArchiveLimits | None = None,
        *,
        root: Root | None = None,
        keep_files: bool = True,
        with_bundle_sha256: bool = False,
    ) -> None:
        self._root = root
        self._keep_files = keep_files
        self._envelope: Envelope | None = None
        self._keyids: set[str] = set()
        self._archive = ArchiveReader(
            limits or ArchiveLimits(),
            self._manifest,
            keep_files=keep_files,
            with_bundle_sha256=with_bundle_sha256,
        )
        self.wants = self._archive.wants
        self.feed = self._archive.feed

    def _manifest(self, data: bytes) -> Manifest:
        envelope = Envelope.from_bytes(data, "manifest")
        if self._root is not None:
            self._keyids = self._root.verify(envelope, "release")
        self._envelope = envelope
        return Manifest.from_dict(envelope.signed)

    def finish(self) -> BundleContents:
        """The bundle, once every byte was fed.

        Raises:
            ArchiveError: If the archive ends early, lacks a listed file, or its self-test file
                does not hold the vectors the manifest lists.
            SchemaError: If its reference file is not a valid one.
        """
        archive = self._archive.finish()
        assert self._envelope is not None  # finish() raised if there was no manifest
        test = archive.manifest.self_test
        if self._keep_files or (isinstance(test, SelfTestFile) and test.file in archive.files):
            attach_vectors(archive.manifest, archive.files)
        refs = archive.manifest.reference_histograms
        if isinstance(refs, ReferenceFile) and not refs.detached and refs.file in archive.files:
            attach(refs, archive.files[refs.file])
        return BundleContents(
            bundle_sha256=archive.bundle_sha256,
            envelope=self._envelope,
            manifest=archive.manifest,
            files=archive.files,
            size=archive.size,
        )

    def finish_verified(self) -> VerifiedBundle:
        """The bundle with the release keys that signed it (a ``root`` was given).

        Raises:
            ArchiveError: If the archive ends early or lacks a listed file.
        """
        assert self._root is not None, "finish_verified needs a root"
        return VerifiedBundle(contents=self.finish(), release_keyids=self._keyids)


def _read_all(data: bytes, reader: BundleReader, limits: ArchiveLimits | None) -> None:
    cap = (limits or ArchiveLimits()).max_archive_bytes
    if len(data) > cap:
        raise SizeLimitError(f"bundle is {len(data)} bytes, over the cap {cap}")
    reader.feed(data)


def open_bundle(
    data: bytes, limits: ArchiveLimits | None = None, *, with_bundle_sha256: bool = False
) -> BundleContents:
    """Parse a bundle and check that its files match its manifest (not its signatures).

    Args:
        data: The archive bytes.
        limits: Caps on size and member count.
        with_bundle_sha256: Also hash the whole archive for its identity (one more pass over
            the bytes).

    Raises:
        ArchiveError: On unsafe members, missing or extra files, or hash and length mismatches.
        SchemaError: If the manifest or its reference file is malformed.
    """
    reader = BundleReader(limits, with_bundle_sha256=with_bundle_sha256)
    _read_all(data, reader, limits)
    return reader.finish()


def verify(
    data: bytes,
    root: Root,
    *,
    limits: ArchiveLimits | None = None,
    hardware_id: str | None = None,
    catalogue: TargetCatalogue | None = None,
    with_bundle_sha256: bool = False,
) -> VerifiedBundle:
    """Verify a bundle against a trusted root.

    Checks the archive's safety, the release-signature threshold over the manifest, every file's
    length and SHA-256, and, given ``hardware_id``, that the bundle is built for that target and
    fits it in the catalogue.

    Raises:
        ArchiveError: On any archive problem (a specific subclass).
        SchemaError: If the manifest or its reference file is malformed.
        ThresholdError: If release signatures fall short.
        CatalogueError: If the bundle is not built for ``hardware_id`` or does not fit it.
    """
    reader = BundleReader(limits, root=root, with_bundle_sha256=with_bundle_sha256)
    _read_all(data, reader, limits)
    bundle = reader.finish_verified()
    if hardware_id is not None:
        check_target(bundle.manifest, hardware_id, bundle.contents.size, catalogue)
    return bundle


def check_target(
    manifest: Manifest, hardware_id: str, size: int, catalogue: TargetCatalogue | None = None
) -> None:
    """Check that a bundle of ``size`` bytes is built for ``hardware_id`` and fits it.

    Raises:
        CatalogueError: If it is not built for the target or does not fit it.
    """
    (catalogue or TargetCatalogue.load_default()).check_fits(manifest, hardware_id, size)


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
