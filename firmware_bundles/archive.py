"""Deterministic, uncompressed bundle archives and their safe reading.

A bundle is a POSIX ustar archive: ``manifest.json`` (the signed envelope) first, then the
manifest's files sorted by path, each with mtime 0, owner 0:0, no owner names and mode 0644.
The same manifest and files therefore give byte-identical archives on any machine, and a bundle's
identity is the SHA-256 of those bytes. Reading checks every member before returning anything,
and hashes members in place (no copies), so verifying costs about one pass over the bytes.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass

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
from firmware_bundles.manifest import MANIFEST_PATH, Manifest

_MIB = 1024 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps applied while reading a bundle, before anything is trusted or written."""

    max_member_bytes: int = 256 * _MIB
    max_total_bytes: int = 512 * _MIB
    max_members: int = 256
    max_manifest_bytes: int = 4 * _MIB


def bundle_id(data: bytes) -> str:
    """A bundle's identity: the SHA-256 of its archive bytes."""
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

    The caller is responsible for the manifest listing exactly ``files``; :func:`read` checks it.

    Raises:
        UnsafeMemberError: If a file path is unsafe.
        ArchiveError: If a path is too long for ustar or reuses ``manifest.json``.
    """
    buf = io.BytesIO()
    members = [(MANIFEST_PATH, envelope_bytes)]
    for path in sorted(files):
        check_member_path(path)
        if path == MANIFEST_PATH:
            raise ArchiveError(f"{MANIFEST_PATH} is reserved", path)
        members.append((path, files[path]))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data in members:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            try:
                tar.addfile(info, io.BytesIO(data))
            except ValueError as exc:
                raise ArchiveError(f"cannot store {path!r}: {exc}", path) from exc
    return buf.getvalue()


@dataclass(frozen=True)
class ArchiveContents:
    """The members of a checked archive, as views into the archive bytes."""

    manifest_bytes: bytes
    members: dict[str, memoryview]


def read_members(data: bytes, limits: ArchiveLimits) -> ArchiveContents:
    """Parse archive bytes and refuse anything unsafe, without checking hashes.

    Raises:
        SizeLimitError: If the archive, a member or the member count is over a cap.
        UnsafeMemberError: On an unsafe path or a member that is not a regular file.
        DuplicateMemberError: If a path appears twice.
        MissingFileError: If ``manifest.json`` is missing or not first.
        ArchiveError: If the bytes are not a tar archive.
    """
    if len(data) > limits.max_total_bytes + limits.max_manifest_bytes + 512 * (
        limits.max_members + 4
    ):
        raise SizeLimitError(f"bundle is {len(data)} bytes, over the cap")
    view = memoryview(data)
    members: dict[str, memoryview] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            infos = tar.getmembers()
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"not a bundle archive: {exc}") from exc
    if len(infos) > limits.max_members:
        raise SizeLimitError(f"bundle has {len(infos)} members, over the cap {limits.max_members}")
    for info in infos:
        name = info.name
        if info.issym() or info.islnk():
            raise UnsafeMemberError(f"member {name!r} is a link; only regular files allowed", name)
        if not info.isreg():
            raise UnsafeMemberError(f"member {name!r} is not a regular file", name)
        check_member_path(name)
        if name in members:
            raise DuplicateMemberError(f"member {name!r} appears twice", name)
        cap = limits.max_manifest_bytes if name == MANIFEST_PATH else limits.max_member_bytes
        if info.size > cap:
            raise SizeLimitError(f"member {name!r} is {info.size} bytes, over the cap {cap}", name)
        total += info.size
        if total > limits.max_total_bytes:
            raise SizeLimitError(f"members total over the cap {limits.max_total_bytes} bytes", name)
        end = info.offset_data + info.size
        if end > len(data):
            raise ArchiveError(f"member {name!r} is truncated", name)
        members[name] = view[info.offset_data : end]
    if not infos or infos[0].name != MANIFEST_PATH:
        raise MissingFileError(f"{MANIFEST_PATH} must be the first member", MANIFEST_PATH)
    manifest_bytes = bytes(members.pop(MANIFEST_PATH))
    return ArchiveContents(manifest_bytes=manifest_bytes, members=members)


def check_files(manifest: Manifest, members: Mapping[str, memoryview]) -> None:
    """Check that the archive holds exactly the manifest's files, with their lengths and hashes.

    Raises:
        UnlistedMemberError: If a member is not listed in the manifest.
        MissingFileError: If a listed file is absent.
        LengthMismatchError: If a length differs.
        HashMismatchError: If a SHA-256 differs.
    """
    listed = {f.path: f for f in manifest.files}
    for name in members:
        if name not in listed:
            raise UnlistedMemberError(f"member {name!r} is not listed in the manifest", name)
    for path, entry in listed.items():
        if path not in members:
            raise MissingFileError(f"listed file {path!r} is missing from the bundle", path)
        content = members[path]
        if len(content) != entry.length:
            raise LengthMismatchError(
                f"file {path!r} is {len(content)} bytes, manifest says {entry.length}", path
            )
        digest = hashlib.sha256(content).hexdigest()
        if digest != entry.sha256:
            raise HashMismatchError(
                f"file {path!r} has SHA-256 {digest[:16]}…, manifest says {entry.sha256[:16]}…",
                path,
            )
