"""Deterministic, uncompressed bundle archives and their safe, incremental reading.

A bundle is a POSIX ustar archive: ``manifest.json`` (the signed envelope) first, then the
manifest's files sorted by path, each with mtime 0, owner 0:0, no owner names and mode 0644, each
padded to a 512-byte block, then the two zero blocks that end an archive (no padding to tar's
10 KiB records: a ring pays for every byte). The same manifest and files therefore give
byte-identical archives on any machine, and a bundle's identity is the SHA-256 of those bytes.

:class:`ArchiveReader` takes the archive in pieces that its caller reads (this package does no
I/O). Every tar header is checked against the caps, and every file's header against the
manifest's entry, before any byte of that member is taken; members are hashed as they stream
by, so memory stays bounded by the manifest cap and the caller's piece, whatever a header claims.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from firmware_bundles.errors import (
    ArchiveError,
    DuplicateMemberError,
    HashMismatchError,
    LengthMismatchError,
    MissingFileError,
    SizeLimitError,
    UnlistedMemberError,
    UnsafeMemberError,
)
from firmware_bundles.manifest import MANIFEST_PATH, FileEntry, Manifest

_MIB = 1024 * 1024
BLOCK = 512
#: Largest piece :meth:`ArchiveReader.wants` asks for, so a caller's read buffer stays small.
PIECE_BYTES = _MIB
#: Tar's record padding that archives written before format 2 carry after their end blocks.
_OLD_RECORD_BYTES = 20 * BLOCK


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps applied while reading a bundle, before anything is trusted or written."""

    max_member_bytes: int = 256 * _MIB
    max_total_bytes: int = 512 * _MIB
    max_members: int = 256
    max_manifest_bytes: int = 4 * _MIB

    @property
    def max_archive_bytes(self) -> int:
        """Largest archive these caps allow: members, a header and padding each, end, records."""
        headers = 2 * BLOCK * (self.max_members + 1)
        return self.max_total_bytes + self.max_manifest_bytes + headers + _OLD_RECORD_BYTES


def hash_bundle(data: bytes) -> str:
    """A bundle's identity, its ``bundle_sha256``: the SHA-256 (hex) of its archive bytes."""
    return hashlib.sha256(data).hexdigest()


def check_member_path(name: str) -> None:
    """Refuse a member path that could escape the extraction directory.

    Raises:
        UnsafeMemberError: On an empty, absolute, backslashed or ``..`` path.
    """
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafeMemberError(f"unsafe member path {name!r}: absolute or malformed", name)
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeMemberError(f"unsafe member path {name!r}: '..', '.' or empty part", name)
    if posixpath.normpath(name) != name:
        raise UnsafeMemberError(f"unsafe member path {name!r}: not normalised", name)


def pack(envelope_bytes: bytes, files: Mapping[str, bytes]) -> bytes:
    """Pack a signed manifest and its files into deterministic archive bytes.

    The caller is responsible for the manifest listing exactly ``files``; reading checks it.

    Raises:
        UnsafeMemberError: If a file path is unsafe.
        ArchiveError: If a path is too long for ustar or reuses ``manifest.json``.
    """
    members = [(MANIFEST_PATH, envelope_bytes)]
    for path in sorted(files):
        check_member_path(path)
        if path == MANIFEST_PATH:
            raise ArchiveError(f"{MANIFEST_PATH} is reserved", path)
        members.append((path, files[path]))
    out = bytearray()
    for path, data in members:
        info = tarfile.TarInfo(path)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        try:
            out += info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
        except ValueError as exc:
            raise ArchiveError(f"cannot store {path!r}: {exc}", path) from exc
        out += data
        out += bytes(-len(data) % BLOCK)
    out += bytes(2 * BLOCK)
    return bytes(out)


@dataclass
class ArchiveContents:
    """What an :class:`ArchiveReader` read: the manifest and the files it kept, all checked."""

    manifest_bytes: bytes
    manifest: Manifest
    files: dict[str, memoryview]
    size: int
    bundle_sha256: str | None


@dataclass
class _Member:
    """The member being read: its hash so far, and its bytes if they are kept."""

    name: str
    size: int
    entry: FileEntry | None
    keep: bool
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    pieces: list[memoryview] = field(default_factory=list)

    def take(self, piece: memoryview) -> None:
        if self.entry is not None:
            self.digest.update(piece)
        if self.keep:
            self.pieces.append(piece)

    def content(self) -> memoryview:
        # One piece is a view into the caller's bytes (the whole-bytes API copies nothing).
        if len(self.pieces) == 1:
            return self.pieces[0]
        return memoryview(b"".join(self.pieces))


class ArchiveReader:
    """Reads a bundle archive from pieces the caller supplies, refusing as early as it can.

    Usage: while the source has bytes, feed it ``wants()`` bytes at a time; then ``finish()``.
    ``on_manifest`` turns the manifest member's bytes into a :class:`Manifest` (and may check its
    signatures) as soon as it is complete, so every later header is held against its entry.

    Args:
        limits: Caps on members, sizes and their total.
        on_manifest: Parses (and may verify) the manifest member.
        keep_files: Keep each file's bytes for :meth:`finish` (else hash the model file only, and
            keep the other files no bigger than ``limits.max_manifest_bytes``).
        with_bundle_sha256: Hash the whole archive for its identity as it streams by.
    """

    def __init__(
        self,
        limits: ArchiveLimits,
        on_manifest: Callable[[bytes], Manifest],
        *,
        keep_files: bool = True,
        with_bundle_sha256: bool = False,
    ) -> None:
        self._limits = limits
        self._on_manifest = on_manifest
        self._keep = keep_files
        self._bundle_hash = hashlib.sha256() if with_bundle_sha256 else None
        self._size = 0
        self._state = "header"  # header -> data -> pad -> header ... -> end
        self._need = BLOCK
        self._header = bytearray()
        self._member: _Member | None = None
        self._seen: set[str] = set()
        self._total = 0
        self._manifest_bytes = b""
        self._manifest: Manifest | None = None
        self._listed: dict[str, FileEntry] = {}
        self._files: dict[str, memoryview] = {}

    def wants(self) -> int:
        """How many bytes to feed next (the rest of the current header, member or padding)."""
        return PIECE_BYTES if self._state == "end" else min(self._need, PIECE_BYTES)

    def feed(self, data: bytes | memoryview) -> None:
        """Take the next bytes of the archive.

        Raises:
            SizeLimitError: If the archive, a member, the member count or the total is over a cap.
            UnsafeMemberError: On an unsafe path or a member that is not a regular file.
            DuplicateMemberError: If a path appears twice.
            MissingFileError: If ``manifest.json`` is not the first member.
            UnlistedMemberError: If a member is not listed in the manifest.
            LengthMismatchError: If a member's header disagrees with the manifest's length.
            HashMismatchError: If a member's SHA-256 differs from the manifest's.
            ArchiveError: If the bytes are not a tar archive.
        """
        view = memoryview(data)
        self._size += len(view)
        if self._size > self._limits.max_archive_bytes:
            raise SizeLimitError(
                f"bundle is over {self._limits.max_archive_bytes} bytes, over the cap"
            )
        if self._bundle_hash is not None:
            self._bundle_hash.update(view)
        while view:
            if self._state == "end":
                if view.tobytes().strip(b"\0"):
                    raise ArchiveError("data after the end of the archive")
                return
            piece, view = view[: self._need], view[self._need :]
            self._need -= len(piece)
            if self._state == "header":
                self._header += piece
                if self._need == 0:
                    self._read_header(bytes(self._header))
                    self._header.clear()
            elif self._state == "data":
                assert self._member is not None
                self._member.take(piece)
                if self._need == 0:
                    self._end_member()
            elif self._need == 0:  # padding after a member
                self._state, self._need = "header", BLOCK

    def finish(self) -> ArchiveContents:
        """The checked manifest and files, once the source has no more bytes.

        Raises:
            ArchiveError: If the archive ends inside a header or a member.
            MissingFileError: If the manifest or a listed file is missing.
        """
        if self._state == "data" or self._header:
            name = self._member.name if self._member and self._state == "data" else None
            what = f"member {name!r}" if name else "a header"
            raise ArchiveError(f"not a bundle archive: it ends inside {what}", name)
        if self._manifest is None:
            raise MissingFileError(f"{MANIFEST_PATH} must be the first member", MANIFEST_PATH)
        for path in self._listed:
            if path not in self._seen:
                raise MissingFileError(f"listed file {path!r} is missing from the bundle", path)
        return ArchiveContents(
            manifest_bytes=self._manifest_bytes,
            manifest=self._manifest,
            files=self._files,
            size=self._size,
            bundle_sha256=None if self._bundle_hash is None else self._bundle_hash.hexdigest(),
        )

    def _read_header(self, block: bytes) -> None:
        if block == bytes(BLOCK):
            self._state = "end"
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ArchiveError(f"not a bundle archive: {exc}") from exc
        name = info.name
        if info.issym() or info.islnk():
            raise UnsafeMemberError(f"member {name!r} is a link; only regular files allowed", name)
        if not info.isreg():
            raise UnsafeMemberError(f"member {name!r} is not a regular file", name)
        check_member_path(name)
        if name in self._seen:
            raise DuplicateMemberError(f"member {name!r} appears twice", name)
        self._seen.add(name)
        limits = self._limits
        if len(self._seen) > limits.max_members:
            raise SizeLimitError(f"bundle has over {limits.max_members} members, over the cap")
        if self._manifest is None and name != MANIFEST_PATH:
            raise MissingFileError(f"{MANIFEST_PATH} must be the first member", MANIFEST_PATH)
        cap = limits.max_manifest_bytes if name == MANIFEST_PATH else limits.max_member_bytes
        if info.size > cap:
            raise SizeLimitError(f"member {name!r} is {info.size} bytes, over the cap {cap}", name)
        self._total += info.size
        if self._total > limits.max_total_bytes:
            raise SizeLimitError(f"members total over the cap {limits.max_total_bytes} bytes", name)
        entry = None
        if name != MANIFEST_PATH:
            entry = self._listed.get(name)
            if entry is None:
                raise UnlistedMemberError(f"member {name!r} is not listed in the manifest", name)
            if info.size != entry.length:
                raise LengthMismatchError(
                    f"file {name!r} is {info.size} bytes, manifest says {entry.length}", name
                )
        keep = self._keep or entry is None or self._is_metadata(name, info.size)
        self._member = _Member(name, info.size, entry, keep)
        self._state, self._need = "data", info.size
        if info.size == 0:
            self._end_member()

    def _is_metadata(self, name: str, size: int) -> bool:
        # Without keep_files, the files beside the model (self-test vectors, references) are
        # still kept when they are no bigger than a manifest may be: memory stays bounded.
        assert self._manifest is not None
        return name != self._manifest.runtime.model_file and size <= self._limits.max_manifest_bytes

    def _end_member(self) -> None:
        member = self._member
        assert member is not None
        self._member = None
        if member.entry is None:
            self._manifest_bytes = member.content().tobytes()
            self._manifest = self._on_manifest(self._manifest_bytes)
            self._listed = {f.path: f for f in self._manifest.files}
        else:
            digest = member.digest.hexdigest()
            if digest != member.entry.sha256:
                raise HashMismatchError(
                    f"file {member.name!r} has SHA-256 {digest[:16]}…,"
                    f" manifest says {member.entry.sha256[:16]}…",
                    member.name,
                )
            if member.keep:
                self._files[member.name] = member.content()
        pad = -member.size % BLOCK
        self._state, self._need = ("pad", pad) if pad else ("header", BLOCK)
