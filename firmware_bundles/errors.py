"""Errors raised by the bundle formats, one root split by what went wrong.

BundleError
├── SchemaError            a document is malformed (names the field)
├── SignatureError         signatures do not establish trust
│   └── ThresholdError     fewer valid signatures than a role's threshold
├── RootError              a trusted root cannot be accepted
│   ├── ExpiredError       a root or assignment is past its expiry
│   └── RollbackError      a version or release counter went back (model, floor, offered)
├── AssignmentError        a signed assignment set is not for this device and check-in
│   ├── WrongDeviceError   addressed to another device id
│   ├── WrongHardwareError for another hardware id
│   └── ReplayError        carries another nonce than the one sent
├── ArchiveError           the archive itself is unsafe or inconsistent
│   ├── UnsafeMemberError  absolute path, `..`, link, device, directory
│   ├── DuplicateMemberError
│   ├── UnlistedMemberError
│   ├── MissingFileError
│   ├── LengthMismatchError
│   ├── HashMismatchError
│   └── SizeLimitError     a member or the total is over a configured cap
└── CatalogueError         a target catalogue is malformed or lacks an id
"""

from __future__ import annotations


class BundleError(Exception):
    """Root of every error raised by ``firmware_bundles``."""


class SchemaError(BundleError):
    """A document does not match its schema.

    Attributes:
        document: Which kind of document (``manifest``, ``root``, ...).
        fields: Dotted paths of the offending fields.
    """

    def __init__(self, document: str, problems: list[str], fields: list[str]) -> None:
        self.document = document
        self.fields = fields
        self.problems = problems
        super().__init__(f"invalid {document}: " + "; ".join(problems))


class SignatureError(BundleError):
    """Signatures on a document do not establish trust."""


class ThresholdError(SignatureError):
    """Fewer distinct valid signatures than the role's threshold.

    Attributes:
        role: The role whose threshold was not met.
        valid: Number of distinct authorised keys whose signature verified.
        threshold: Number required.
        rejected: ``(keyid, reason)`` for every signature that did not count.
    """

    def __init__(
        self, role: str, valid: int, threshold: int, rejected: list[tuple[str, str]]
    ) -> None:
        self.role = role
        self.valid = valid
        self.threshold = threshold
        self.rejected = rejected
        msg = f"signature threshold not met for role {role}: {valid} of {threshold}"
        if rejected:
            msg += " (" + "; ".join(f"key {k[:12]}: {r}" for k, r in rejected) + ")"
        super().__init__(msg)


class RootError(BundleError):
    """A trusted root cannot be accepted."""


class ExpiredError(RootError):
    """A root (or a signed document checked against one) is past its expiry."""


class RollbackError(RootError):
    """A version or counter that may only grow went back.

    Attributes:
        model: The model whose release counter went back (None for a root version).
        floor: The lowest acceptable value (for a model: the highest release counter seen).
        offered: The value offered.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        floor: int | None = None,
        offered: int | None = None,
    ) -> None:
        self.model = model
        self.floor = floor
        self.offered = offered
        super().__init__(message)


class AssignmentError(BundleError):
    """A director-signed assignment set verified but is not meant for this device and check-in.

    Attributes:
        expected: What this device has or sent.
        found: What the set says.
    """

    def __init__(self, message: str, *, expected: str, found: str) -> None:
        self.expected = expected
        self.found = found
        super().__init__(message)


class WrongDeviceError(AssignmentError):
    """The set is addressed to another device id."""


class WrongHardwareError(AssignmentError):
    """The set is for another hardware id (catalogue target id)."""


class ReplayError(AssignmentError):
    """The set carries another nonce than the one this check-in sent: an old answer replayed."""


class ArchiveError(BundleError):
    """The bundle archive is unsafe or disagrees with its manifest.

    Attributes:
        member: The archive member concerned, if any.
    """

    def __init__(self, message: str, member: str | None = None) -> None:
        self.member = member
        super().__init__(message)


class UnsafeMemberError(ArchiveError):
    """A member has an absolute path, a `..` part, or is not a regular file."""


class DuplicateMemberError(ArchiveError):
    """The same path appears twice in the archive."""


class UnlistedMemberError(ArchiveError):
    """A member is not listed in the manifest's files."""


class MissingFileError(ArchiveError):
    """A file listed in the manifest is not in the archive."""


class LengthMismatchError(ArchiveError):
    """A member's length differs from the manifest's."""


class HashMismatchError(ArchiveError):
    """A member's SHA-256 differs from the manifest's."""


class SizeLimitError(ArchiveError):
    """A member, the member count or the total is over a configured cap."""


class CatalogueError(BundleError):
    """A device target catalogue is malformed or lacks the requested id."""
