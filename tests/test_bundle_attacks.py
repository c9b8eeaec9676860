"""Every way a bundle or root can be wrong is refused, each with its own error."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from datetime import timedelta

import pytest

from firmware_bundles import (
    ArchiveLimits,
    BundleError,
    DuplicateMemberError,
    ExpiredError,
    HashMismatchError,
    MissingFileError,
    RollbackError,
    SigningKey,
    SizeLimitError,
    ThresholdError,
    TrustedRoot,
    UnlistedMemberError,
    UnsafeMemberError,
    build,
    verify,
)
from firmware_bundles.bundle import file_entries
from firmware_bundles.manifest import Manifest
from firmware_bundles.root import Root, sign_root
from firmware_bundles.signing import Envelope
from tests.cases import named_cases
from tests.conftest import MODEL_BYTES, NOW, Keys, manifest_draft


def craft(members: list[tuple[str, bytes, bytes]], keys: Keys, listed: dict[str, bytes]) -> bytes:
    """A hand-made archive: a manifest listing ``listed``, then raw (name, type, data) members."""
    manifest = Manifest.from_dict({**manifest_draft(), "files": file_entries(listed)})
    env = Envelope(signed=manifest.to_dict())
    for k in keys.release:
        env.sign(k)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in [("manifest.json", tarfile.REGTYPE, env.to_bytes()), *members]:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


REG = tarfile.REGTYPE
MODEL = ("model.onnx", REG, MODEL_BYTES)
LISTED = {"model.onnx": MODEL_BYTES}


def flip_model_byte(b: bytes, k: Keys) -> bytes:
    data = bytearray(b)
    data[data.find(MODEL_BYTES) + 100] ^= 0x01
    return bytes(data)


def change_signed_field(b: bytes, k: Keys) -> bytes:
    # Same length so the archive stays well-formed; only the signed manifest changes.
    return b.replace(b'"release_counter":7', b'"release_counter":9', 1)


def sign_with(signers: Callable[[Keys], list[SigningKey]]) -> Callable[[bytes, Keys], bytes]:
    def make(_: bytes, k: Keys) -> bytes:
        return build(manifest_draft(), LISTED, signers(k))

    return make


def duplicate_signature(_: bytes, k: Keys) -> bytes:
    env_bytes = build(manifest_draft(), LISTED, k.release[:1])
    from firmware_bundles import open_bundle
    from firmware_bundles.archive import pack

    env = open_bundle(env_bytes).envelope
    env.signatures = env.signatures * 2
    return pack(env.to_bytes(), LISTED)


BUNDLE_CASES = [
    ("flipped-model-byte", flip_model_byte, HashMismatchError, "SHA-256"),
    ("manifest-changed-after-signing", change_signed_field, ThresholdError, "invalid signature"),
    (
        "unknown-key",
        sign_with(lambda k: [k.release[0], SigningKey.generate()]),
        ThresholdError,
        "unknown key",
    ),
    ("below-threshold", sign_with(lambda k: k.release[:1]), ThresholdError, "1 of 2"),
    ("same-key-twice", duplicate_signature, ThresholdError, "counted once"),
    (
        "dotdot-member",
        lambda b, k: craft([MODEL, ("../x", REG, b"x")], k, LISTED),
        UnsafeMemberError,
        "'..'",
    ),
    (
        "absolute-member",
        lambda b, k: craft([MODEL, ("/etc/x", REG, b"x")], k, LISTED),
        UnsafeMemberError,
        "absolute",
    ),
    (
        "symlink-member",
        lambda b, k: craft([MODEL, ("link", tarfile.SYMTYPE, b"")], k, LISTED),
        UnsafeMemberError,
        "link",
    ),
    (
        "device-member",
        lambda b, k: craft([MODEL, ("dev", tarfile.CHRTYPE, b"")], k, LISTED),
        UnsafeMemberError,
        "not a regular file",
    ),
    (
        "duplicate-member",
        lambda b, k: craft([MODEL, MODEL], k, LISTED),
        DuplicateMemberError,
        "twice",
    ),
    (
        "unlisted-member",
        lambda b, k: craft([MODEL, ("extra.bin", REG, b"x")], k, LISTED),
        UnlistedMemberError,
        "not listed",
    ),
    ("missing-listed-file", lambda b, k: craft([], k, LISTED), MissingFileError, "missing"),
]


@named_cases(("mutate", "error", "message"), BUNDLE_CASES)
def test_bad_bundle_is_refused(
    bundle_bytes: bytes,
    keys: Keys,
    root: Root,
    mutate: Callable[[bytes, Keys], bytes],
    error: type[BundleError],
    message: str,
) -> None:
    bad = mutate(bundle_bytes, keys)
    with pytest.raises(error, match=message):
        verify(bad, root)


def test_member_over_size_cap_is_refused_before_hashing(bundle_bytes: bytes, root: Root) -> None:
    with pytest.raises(SizeLimitError, match="over the cap 1000"):
        verify(bundle_bytes, root, limits=ArchiveLimits(max_member_bytes=1000))


def test_total_over_cap_is_refused(bundle_bytes: bytes, root: Root) -> None:
    with pytest.raises(SizeLimitError):
        verify(bundle_bytes, root, limits=ArchiveLimits(max_total_bytes=5000))


def test_sound_bundle_verifies(bundle_bytes: bytes, keys: Keys, root: Root) -> None:
    verified = verify(bundle_bytes, root, with_bundle_sha256=True)
    assert verified.release_keyids == {k.keyid for k in keys.release}
    assert verified.file("model.onnx") == MODEL_BYTES
    assert verified.manifest.release_counter == 7


# -- roots -------------------------------------------------------------------------------------


def _expired(k: Keys) -> bytes:
    return k.make_root(expires=NOW - timedelta(seconds=1))[1].to_bytes()


def _rotated_by_new_keys_only(k: Keys, new: Keys) -> bytes:
    return new.make_root(version=2)[1].to_bytes()


ROOT_CASES = [
    (
        "expired-root",
        lambda k, new: TrustedRoot.from_pinned(_expired(k), NOW),
        ExpiredError,
        "expired",
    ),
    (
        "rotated-root-signed-only-by-new-keys",
        lambda k, new: TrustedRoot.from_pinned(k.make_root()[1].to_bytes(), NOW).update(
            _rotated_by_new_keys_only(k, new)
        ),
        ThresholdError,
        "role root: 0 of 1",
    ),
    (
        "root-version-going-back",
        lambda k, new: TrustedRoot.from_pinned(k.make_root(version=3)[1].to_bytes(), NOW).update(
            k.make_root(version=2)[1].to_bytes()
        ),
        RollbackError,
        "went back",
    ),
    (
        "root-version-skipped",
        lambda k, new: TrustedRoot.from_pinned(k.make_root()[1].to_bytes(), NOW).update(
            k.make_root(version=3)[1].to_bytes()
        ),
        RollbackError,
        "skipped",
    ),
    (
        "pinned-root-not-self-signed",
        lambda k, new: TrustedRoot.from_pinned(k.make_root(signers=[])[1].to_bytes(), NOW),
        ThresholdError,
        "role root: 0 of 1",
    ),
]


@pytest.fixture(scope="module")
def new_keys() -> Keys:
    return Keys(
        root=[SigningKey.generate()],
        release=[SigningKey.generate(), SigningKey.generate()],
        director=[SigningKey.generate()],
        hil=[SigningKey.generate()],
    )


@named_cases(("attempt", "error", "message"), ROOT_CASES)
def test_bad_root_is_refused(
    keys: Keys,
    new_keys: Keys,
    attempt: Callable[[Keys, Keys], object],
    error: type[BundleError],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        attempt(keys, new_keys)


def test_rotation_signed_by_old_and_new_root_keys_is_accepted(keys: Keys, new_keys: Keys) -> None:
    trusted = TrustedRoot.from_pinned(keys.make_root()[1].to_bytes(), NOW)
    root2, _ = new_keys.make_root(version=2)
    env = sign_root(root2, keys.root + new_keys.root)
    accepted = trusted.update(env.to_bytes(), NOW)
    assert accepted.version == 2
    # Bundles signed by the old release keys no longer verify; the new ones do.
    old_bundle = build(manifest_draft(), LISTED, keys.release)
    with pytest.raises(ThresholdError):
        verify(old_bundle, trusted.root)
    verify(build(manifest_draft(), LISTED, new_keys.release), trusted.root)


def test_revoked_release_key_stops_counting(keys: Keys) -> None:
    """Rotating a release key out (revocation) makes its signatures worthless."""
    trusted = TrustedRoot.from_pinned(keys.make_root()[1].to_bytes(), NOW)
    replacement = SigningKey.generate()
    revoked = Keys(keys.root, [keys.release[0], replacement], keys.director, keys.hil)
    trusted.update(revoked.make_root(version=2)[1].to_bytes(), NOW)
    with pytest.raises(ThresholdError, match="unknown key"):
        verify(build(manifest_draft(), LISTED, keys.release), trusted.root)


@pytest.mark.parametrize("piece", [1, 7, 512, 4096, 1 << 20])
def test_pieces_of_any_size_verify_to_the_same_bundle(
    bundle_bytes: bytes, root: Root, piece: int
) -> None:
    from firmware_bundles import BundleReader, hash_bundle

    reader = BundleReader(root=root, with_bundle_sha256=True)
    for start in range(0, len(bundle_bytes), piece):
        reader.feed(bundle_bytes[start : start + piece])
    bundle = reader.finish_verified()
    assert bundle.contents.bundle_sha256 == hash_bundle(bundle_bytes)
    assert bundle.file("model.onnx") == MODEL_BYTES
    assert bundle.release_keyids == verify(bundle_bytes, root).release_keyids


def test_bundle_padded_to_tar_records_as_before_still_verifies(keys: Keys, root: Root) -> None:
    """Archives written before blocks-only padding carry zeros up to 10 KiB records."""
    new = build(manifest_draft(), LISTED, keys.release)
    old = new + bytes(-len(new) % tarfile.RECORDSIZE)
    assert len(old) % tarfile.RECORDSIZE == 0 and len(new) % 512 == 0 and len(new) < len(old)
    assert verify(old, root).manifest == verify(new, root).manifest


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b + b"\x01", "after the end of the archive"),
        (lambda b: b[:1000], "ends inside"),
        (lambda b: b[:700], "ends inside"),
    ],
    ids=["data-after-end", "truncated-member", "truncated-header"],
)
def test_damaged_archive_is_refused(
    bundle_bytes: bytes, root: Root, mutate: Callable[[bytes], bytes], message: str
) -> None:
    from firmware_bundles import ArchiveError

    with pytest.raises(ArchiveError, match=message):
        verify(mutate(bundle_bytes), root)


def test_header_longer_than_the_manifest_says_is_refused_before_its_bytes(
    keys: Keys, root: Root
) -> None:
    """The reader refuses on the header: none of the member's bytes is needed to say no."""
    from firmware_bundles import BundleReader, LengthMismatchError

    bad = craft([("model.onnx", REG, MODEL_BYTES + b"x")], keys, LISTED)
    with tarfile.open(fileobj=io.BytesIO(bad)) as tar:
        header_end = tar.getmember("model.onnx").offset_data
    reader = BundleReader(root=root)
    with pytest.raises(LengthMismatchError, match="manifest says 10240"):
        reader.feed(bad[:header_end])
