"""EdgeFleet's shared formats: manifests, signatures, trusted root, archives, catalogue, messages.

Pure: bytes in, objects out; no network, no database, no clock (callers pass ``now``).
"""

from firmware_bundles.archive import ArchiveLimits, hash_bundle, pack
from firmware_bundles.bundle import (
    BundleContents,
    BundleReader,
    VerifiedBundle,
    add_signature,
    build,
    created_at_from_env,
    open_bundle,
    verify,
)
from firmware_bundles.catalogue import DeviceTarget, TargetCatalogue
from firmware_bundles.errors import (
    ArchiveError,
    AssignmentError,
    BundleError,
    CatalogueError,
    DuplicateMemberError,
    ExpiredError,
    HashMismatchError,
    LengthMismatchError,
    MissingFileError,
    ReplayError,
    RollbackError,
    RootError,
    SchemaError,
    SignatureError,
    SizeLimitError,
    ThresholdError,
    UnlistedMemberError,
    UnsafeMemberError,
    WrongDeviceError,
    WrongHardwareError,
)
from firmware_bundles.manifest import Manifest
from firmware_bundles.root import Root, TrustedRoot, new_root, parse_root, sign_root
from firmware_bundles.signing import Envelope, PublicKey, SigningKey, canonical_json

__version__ = "0.1.0"

__all__ = [
    "ArchiveError",
    "ArchiveLimits",
    "AssignmentError",
    "BundleContents",
    "BundleError",
    "BundleReader",
    "CatalogueError",
    "DeviceTarget",
    "DuplicateMemberError",
    "Envelope",
    "ExpiredError",
    "HashMismatchError",
    "LengthMismatchError",
    "Manifest",
    "MissingFileError",
    "PublicKey",
    "ReplayError",
    "RollbackError",
    "Root",
    "RootError",
    "SchemaError",
    "SignatureError",
    "SigningKey",
    "SizeLimitError",
    "TargetCatalogue",
    "ThresholdError",
    "TrustedRoot",
    "UnlistedMemberError",
    "UnsafeMemberError",
    "VerifiedBundle",
    "WrongDeviceError",
    "WrongHardwareError",
    "add_signature",
    "build",
    "canonical_json",
    "created_at_from_env",
    "hash_bundle",
    "new_root",
    "open_bundle",
    "pack",
    "parse_root",
    "sign_root",
    "verify",
]
