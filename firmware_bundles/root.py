"""The trusted root: which keys may sign for which role, and its rotation chain.

A device pins one root out of band; it accepts root N+1 only when a threshold of root N's root
keys and a threshold of root N+1's own root keys signed it (as in TUF and Uptane).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field, model_validator

from firmware_bundles.errors import ExpiredError, RollbackError, SchemaError
from firmware_bundles.schema import Document
from firmware_bundles.signing import Envelope, PublicKey, SigningKey, verify_threshold

ROLES = ("root", "release", "director", "hil")
Role = Literal["root", "release", "director", "hil"]


class KeySpec(Document):
    """A public key as stored in ``root.json``."""

    keytype: Literal["ed25519"] = "ed25519"
    scheme: Literal["ed25519"] = "ed25519"
    public: str = Field(pattern=r"^[0-9a-f]{64}$")


class RoleSpec(Document):
    """Which keys sign for a role, and how many must."""

    keyids: list[str]
    threshold: int = Field(ge=1)


class Root(Document):
    """The signed part of ``root.json``."""

    type: Literal["root"] = Field(default="root", alias="_type")
    version: int = Field(ge=1)
    expires: datetime
    keys: dict[str, KeySpec]
    roles: dict[Role, RoleSpec]

    @model_validator(mode="after")
    def _consistent(self) -> Root:
        missing_roles = [r for r in ROLES if r not in self.roles]
        if missing_roles:
            raise ValueError(f"roles lack {', '.join(missing_roles)}")
        for keyid, key_spec in self.keys.items():
            if PublicKey.from_dict(key_spec.to_dict()).keyid != keyid:
                raise ValueError(f"key id {keyid[:12]} does not match its public key")
        for role, spec in self.roles.items():
            unknown = [k for k in spec.keyids if k not in self.keys]
            if unknown:
                raise ValueError(f"role {role} names unknown key {unknown[0][:12]}")
            distinct = len(set(spec.keyids))
            if distinct < spec.threshold:
                raise ValueError(
                    f"role {role} threshold {spec.threshold} exceeds its {distinct} keys"
                )
        if self.expires.tzinfo is None:
            raise ValueError("expires must carry a timezone (UTC)")
        return self

    def public_keys(self) -> dict[str, PublicKey]:
        """Key id to public key."""
        return {k: PublicKey.from_dict(v.to_dict()) for k, v in self.keys.items()}

    def verify(self, envelope: Envelope, role: Role) -> set[str]:
        """Check ``envelope`` carries a threshold of ``role`` signatures under this root.

        Returns:
            The key ids that verified.

        Raises:
            ThresholdError: If too few authorised keys signed.
        """
        spec = self.roles[role]
        return verify_threshold(
            envelope,
            role=role,
            keys=self.public_keys(),
            authorised=spec.keyids,
            threshold=spec.threshold,
            roles_of=self.roles_of(),
        )

    def roles_of(self) -> dict[str, list[str]]:
        """Key id to the roles it signs for."""
        held: dict[str, list[str]] = {}
        for name, spec in self.roles.items():
            for keyid in spec.keyids:
                held.setdefault(keyid, []).append(name)
        return held

    def is_expired(self, now: datetime) -> bool:
        """Whether this root has expired at ``now``."""
        return now >= self.expires


def new_root(
    *,
    version: int,
    expires: datetime,
    role_keys: dict[str, list[PublicKey]],
    thresholds: dict[str, int],
) -> Root:
    """Build a root from public keys per role.

    Raises:
        SchemaError: If a role is missing or a threshold exceeds its keys.
    """
    keys: dict[str, KeySpec] = {}
    roles: dict[str, RoleSpec] = {}
    for role in ROLES:
        pubs = role_keys.get(role, [])
        for pub in pubs:
            keys[pub.keyid] = KeySpec(public=pub.raw.hex())
        roles[role] = RoleSpec(
            keyids=sorted({p.keyid for p in pubs}), threshold=thresholds.get(role, 1)
        )
    return Root.from_dict(
        {
            "_type": "root",
            "version": version,
            "expires": expires.astimezone(UTC).isoformat(),
            "keys": {k: v.to_dict() for k, v in keys.items()},
            "roles": {k: v.to_dict() for k, v in roles.items()},
        }
    )


def sign_root(root: Root, keys: list[SigningKey]) -> Envelope:
    """An envelope of ``root`` signed by each of ``keys``."""
    envelope = Envelope(signed=root.to_dict())
    for key in keys:
        envelope.sign(key)
    return envelope


def parse_root(data: bytes) -> tuple[Envelope, Root]:
    """Parse ``root.json`` bytes without trusting them.

    Raises:
        SchemaError: If the bytes are not a root envelope.
    """
    envelope = Envelope.from_bytes(data, "root")
    return envelope, Root.from_dict(envelope.signed)


class TrustedRoot:
    """The root a device or server currently trusts, advanced only along a signed chain.

    Takes bytes, makes trust decisions, does no I/O.
    """

    def __init__(self, root: Root, envelope: Envelope) -> None:
        self.root = root
        self.envelope = envelope

    @classmethod
    def from_pinned(cls, data: bytes, now: datetime) -> TrustedRoot:
        """Accept the root provisioned out of band.

        It must be self-signed by a threshold of its own root keys and not expired.

        Raises:
            SchemaError: If malformed.
            ThresholdError: If not self-signed by a threshold of its root keys.
            ExpiredError: If expired at ``now``.
        """
        envelope, root = parse_root(data)
        root.verify(envelope, "root")
        trusted = cls(root, envelope)
        trusted.check_expiry(now)
        return trusted

    def update(self, data: bytes, now: datetime | None = None) -> Root:
        """Rotate to the next root.

        Root N+1 needs a threshold of root N's root keys and of its own; versions only go up by
        one. Expiry of intermediate roots is not checked (as in TUF); pass ``now`` to check the
        result, or call :meth:`check_expiry` once the chain is walked.

        Raises:
            SchemaError: If malformed.
            RollbackError: If the version is not exactly one above the trusted one.
            ThresholdError: If either threshold is not met.
            ExpiredError: If ``now`` is given and the new root has expired.
        """
        envelope, new = parse_root(data)
        if new.version <= self.root.version:
            raise RollbackError(
                f"root version went back: trusted {self.root.version}, offered {new.version}"
            )
        if new.version != self.root.version + 1:
            raise RollbackError(
                f"root version skipped: trusted {self.root.version}, offered {new.version};"
                " every version in between is needed"
            )
        self.root.verify(envelope, "root")
        new.verify(envelope, "root")
        self.root, self.envelope = new, envelope
        if now is not None:
            self.check_expiry(now)
        return new

    def check_expiry(self, now: datetime) -> None:
        """Raise :class:`ExpiredError` if the trusted root has expired at ``now``."""
        if self.root.is_expired(now):
            raise ExpiredError(
                f"root version {self.root.version} expired at {self.root.expires.isoformat()}"
            )

    def to_bytes(self) -> bytes:
        """The trusted root's envelope bytes, for saving."""
        return self.envelope.to_bytes()


__all__ = [
    "ROLES",
    "KeySpec",
    "Role",
    "RoleSpec",
    "Root",
    "SchemaError",
    "TrustedRoot",
    "new_root",
    "parse_root",
    "sign_root",
]
