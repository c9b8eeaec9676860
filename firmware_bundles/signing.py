"""Canonical JSON, Ed25519 keys and signed envelopes.

A signed document travels as ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``; the
signature covers the canonical JSON bytes of ``signed`` only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware_bundles.errors import SchemaError, SignatureError, ThresholdError

KEYTYPE = "ed25519"


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` to canonical JSON bytes.

    Keys sorted, no insignificant whitespace, UTF-8, floats in Python's shortest round-trip form;
    NaN and infinities are refused because they have no JSON spelling.

    Raises:
        SchemaError: If the value holds NaN, an infinity or a type JSON cannot express.
    """
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (ValueError, TypeError) as exc:
        raise SchemaError("canonical json", [str(exc)], []) from exc
    return text.encode("utf-8")


def parse_json(data: bytes, document: str) -> Any:
    """Parse JSON bytes, mapping decode errors to :class:`SchemaError`.

    Raises:
        SchemaError: If the bytes are not UTF-8 JSON.
    """
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise SchemaError(document, [f"not valid JSON: {exc}"], []) from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


class PublicKey:
    """An Ed25519 public key, identified by the SHA-256 of its raw bytes."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise SchemaError("key", [f"ed25519 public key must be 32 bytes, got {len(raw)}"], [])
        self.raw = raw
        self._key = Ed25519PublicKey.from_public_bytes(raw)
        self.keyid = hashlib.sha256(raw).hexdigest()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Return whether ``signature`` is this key's signature over ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def to_dict(self) -> dict[str, str]:
        """The key as it appears in ``root.json``."""
        return {"keytype": KEYTYPE, "scheme": KEYTYPE, "public": self.raw.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PublicKey:
        """Read a key as it appears in ``root.json``.

        Raises:
            SchemaError: On an unknown key type or malformed public bytes.
        """
        if data.get("keytype") != KEYTYPE or data.get("scheme") != KEYTYPE:
            raise SchemaError("key", [f"unsupported key type {data.get('keytype')!r}"], ["keytype"])
        try:
            raw = bytes.fromhex(str(data.get("public", "")))
        except ValueError as exc:
            raise SchemaError("key", ["public is not hex"], ["public"]) from exc
        return cls(raw)

    def to_pem(self) -> bytes:
        """PEM (SubjectPublicKeyInfo) encoding."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)


class SigningKey:
    """An Ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = PublicKey(raw)
        self.keyid = self.public.keyid

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Load an unencrypted PKCS#8 PEM private key.

        Raises:
            SchemaError: If the bytes are not an Ed25519 private key.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SchemaError("key", [f"not a PEM private key: {exc}"], []) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SchemaError("key", ["private key is not Ed25519"], [])
        return cls(key)

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM; store it with mode 0600."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``."""
        return self._key.sign(message)


def load_public_key(data: bytes) -> PublicKey:
    """Load a public key from PEM, or take the public half of a PEM private key.

    Raises:
        SchemaError: If the bytes hold neither.
    """
    if b"PRIVATE KEY" in data:
        return SigningKey.from_pem(data).public
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SchemaError("key", [f"not a PEM key: {exc}"], []) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SchemaError("key", ["public key is not Ed25519"], [])
    return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


@dataclass(frozen=True)
class Signature:
    """One signature on an envelope."""

    keyid: str
    sig: bytes

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": base64.b64encode(self.sig).decode("ascii")}


@dataclass
class Envelope:
    """A signed document: the ``signed`` payload and its signatures."""

    signed: dict[str, Any]
    signatures: list[Signature] = field(default_factory=list)

    def signed_bytes(self) -> bytes:
        """The canonical bytes that signatures cover."""
        return canonical_json(self.signed)

    def sign(self, key: SigningKey) -> None:
        """Add ``key``'s signature, replacing an earlier one by the same key."""
        sig = Signature(key.keyid, key.sign(self.signed_bytes()))
        self.signatures = [s for s in self.signatures if s.keyid != key.keyid] + [sig]
        self.signatures.sort(key=lambda s: s.keyid)

    def to_dict(self) -> dict[str, Any]:
        return {"signed": self.signed, "signatures": [s.to_dict() for s in self.signatures]}

    def to_bytes(self) -> bytes:
        """Canonical JSON of the whole envelope."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, document: str = "envelope") -> Envelope:
        """Read an envelope dict.

        Raises:
            SchemaError: If the shape is wrong.
        """
        if not isinstance(data, dict):
            raise SchemaError(document, ["envelope must be an object"], [])
        extra = sorted(set(data) - {"signed", "signatures"})
        if extra:
            raise SchemaError(document, [f"unknown field {extra[0]!r}"], extra)
        if not isinstance(data.get("signed"), dict):
            raise SchemaError(document, ["field 'signed' missing or not an object"], ["signed"])
        raw_sigs = data.get("signatures")
        if not isinstance(raw_sigs, list):
            raise SchemaError(
                document, ["field 'signatures' missing or not a list"], ["signatures"]
            )
        sigs = []
        for i, item in enumerate(raw_sigs):
            if not isinstance(item, dict) or set(item) != {"keyid", "sig"}:
                raise SchemaError(
                    document, [f"signatures[{i}] must have exactly keyid and sig"], ["signatures"]
                )
            try:
                sig = base64.b64decode(str(item["sig"]), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise SchemaError(
                    document, [f"signatures[{i}].sig is not base64"], ["signatures"]
                ) from exc
            sigs.append(Signature(str(item["keyid"]), sig))
        return cls(signed=data["signed"], signatures=sigs)

    @classmethod
    def from_bytes(cls, data: bytes, document: str = "envelope") -> Envelope:
        """Parse an envelope from JSON bytes.

        Raises:
            SchemaError: If the bytes are not a well-formed envelope.
        """
        return cls.from_dict(parse_json(data, document), document)


def verify_threshold(
    envelope: Envelope,
    *,
    role: str,
    keys: Mapping[str, PublicKey],
    authorised: Iterable[str],
    threshold: int,
    roles_of: Mapping[str, Iterable[str]] | None = None,
) -> set[str]:
    """Check that ``threshold`` distinct authorised keys signed ``envelope``.

    Each key counts once however many signatures it left. A signature by a key outside
    ``authorised`` or absent from ``keys`` never counts; when ``roles_of`` (key id -> the roles
    it holds) knows the key, the reason names those roles rather than calling it unknown.

    Returns:
        The key ids whose signature verified.

    Raises:
        ThresholdError: If fewer than ``threshold`` distinct keys verified; the error lists why
            each other signature did not count.
        SignatureError: If ``threshold`` is below one (a role must never be open).
    """
    if threshold < 1:
        raise SignatureError(f"role {role} has threshold {threshold}; it must be at least 1")
    allowed = set(authorised)
    message = envelope.signed_bytes()
    valid: set[str] = set()
    rejected: list[tuple[str, str]] = []
    for sig in envelope.signatures:
        if sig.keyid in valid:
            rejected.append((sig.keyid, "duplicate signature by the same key, counted once"))
        elif sig.keyid not in allowed or sig.keyid not in keys:
            rejected.append((sig.keyid, _not_authorised(sig.keyid, role, roles_of or {})))
        elif not keys[sig.keyid].verify(sig.sig, message):
            rejected.append((sig.keyid, "invalid signature"))
        else:
            valid.add(sig.keyid)
    if len(valid) < threshold:
        raise ThresholdError(role, len(valid), threshold, rejected)
    return valid


def _not_authorised(keyid: str, role: str, roles_of: Mapping[str, Iterable[str]]) -> str:
    """Why a signature by ``keyid`` does not count for ``role``, naming the roles it does hold."""
    held = sorted(roles_of.get(keyid, ()))
    if not held:
        return f"unknown key, not a {role} key"
    return f"a {' and '.join(held)} key, not a {role} key"


__all__ = [
    "Envelope",
    "PublicKey",
    "Signature",
    "SigningKey",
    "canonical_json",
    "load_public_key",
    "parse_json",
    "verify_threshold",
]
