"""What a running server holds: settings, database engine, trust material, blob store."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from firmware_bundles import SigningKey, TargetCatalogue, TrustedRoot
from firmware_bundles.errors import BundleError
from firmware_bundles.root import parse_root
from server.config import Settings
from server.errors import ConfigError
from server.offers import OfferCache


class BlobStore:
    """Content-addressed files: ``blobs/ab/abcdef...``; written atomically, never changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, bundle_sha256: str) -> Path:
        return self.directory / bundle_sha256[:2] / bundle_sha256

    def spool(self) -> BlobSpool:
        """A file to write a blob into as it arrives; :meth:`BlobSpool.keep` files it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".spool-")
        return BlobSpool(self, Path(tmp), os.fdopen(fd, "wb"))

    def put(self, data: bytes) -> str:
        """Store ``data``; returns its SHA-256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return digest


class BlobSpool:
    """A blob being written: appended to, then kept under its SHA-256 or discarded."""

    def __init__(self, store: BlobStore, path: Path, fh: Any) -> None:
        self._store, self._path, self._fh = store, path, fh

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def keep(self, sha256: str) -> None:
        """Make the bytes durable and file them as blob ``sha256`` (its caller hashed them)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        target = self._store.path(sha256)
        if target.exists():
            self._path.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)

    def discard(self) -> None:
        """Drop what was written (no-op once kept)."""
        if not self._fh.closed:
            self._fh.close()
        self._path.unlink(missing_ok=True)


@dataclass
class ServerState:
    """Shared by every request (read-only after start, but for the offer cache)."""

    settings: Settings
    engine: Engine
    trusted: TrustedRoot
    root_chain: dict[int, bytes]
    director_key: SigningKey
    catalogue: TargetCatalogue
    blobs: BlobStore
    #: Check-in's single-statement store (raw driver connection; asyncio pool on PostgreSQL).
    check_in_store: Any = None
    #: Telemetry ingest's lookups and coalesced appends (server.ingest_store).
    ingest_store: Any = None
    #: What devices are offered, dropped after each commit that changes it (server.offers).
    offers: OfferCache = field(init=False)
    #: Sessions for requests; their commits keep ``offers`` current.
    sessions: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        self.offers = OfferCache(ttl_s=self.settings.release_cache_ttl_s)
        self.sessions = sessionmaker(self.engine, class_=Session, expire_on_commit=False)
        self.offers.watch(self.sessions)


def load_trust(settings: Settings) -> tuple[TrustedRoot, dict[int, bytes], SigningKey]:
    """Load the trusted root chain and the director key.

    The root file may be followed by rotated versions saved as ``N.root.json`` beside it; the
    server walks them and serves every version at ``/v1/roots/N.json``.

    Raises:
        ConfigError: If a file is missing or does not verify, or the director key is not in the
            root's director role.
    """
    root_path = settings.resolved_root_path()
    key_path = settings.resolved_director_key_path()
    try:
        first = root_path.read_bytes()
        trusted = TrustedRoot.from_pinned(first, datetime.now(UTC))
        chain = {trusted.root.version: first}
        n = trusted.root.version + 1
        while (root_path.parent / f"{n}.root.json").exists():
            data = (root_path.parent / f"{n}.root.json").read_bytes()
            trusted.update(data, datetime.now(UTC))
            chain[n] = data
            n += 1
        director = SigningKey.from_pem(key_path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{exc.filename} not found; pass --root and --director-key, or start once with"
            " `edgefleet serve --init` to create a local root and keys"
        ) from exc
    except BundleError as exc:
        raise ConfigError(f"trust material does not verify: {exc}") from exc
    if director.keyid not in trusted.root.roles["director"].keyids:
        raise ConfigError(f"director key {director.keyid[:12]} is not in the root's director role")
    # parse_root keeps the envelope of each version byte for byte
    for data in chain.values():
        parse_root(data)
    return trusted, chain, director


def load_catalogue(settings: Settings) -> TargetCatalogue:
    try:
        if settings.catalogue_path:
            return TargetCatalogue.from_bytes(settings.catalogue_path.read_bytes())
        return TargetCatalogue.load_default()
    except (OSError, BundleError) as exc:
        raise ConfigError(f"catalogue: {exc}") from exc
