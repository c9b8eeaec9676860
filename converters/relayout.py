"""A converted bundle with its reference histograms laid out another way, signed again.

The same model, self-test and manifest fields, with the reference as JSON in a format-2 manifest
(what converters wrote before format 3), as a file in the bundle, or detached beside it: what
``bench/bench_convert.py`` measures each layout's bytes with, and how tests get a format-2
bundle of a real conversion.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from firmware_bundles import SigningKey, build, open_bundle
from firmware_bundles.reference import REFERENCE_FILE, ReferenceFile, decode

#: ``inline``: format 2, JSON in the manifest; ``bundle`` and ``detached``: format 3.
Layout = Literal["inline", "bundle", "detached"]


def relayout(
    bundle: bytes, detached_reference: bytes | None, keys: list[SigningKey], layout: Layout
) -> tuple[bytes, bytes | None]:
    """``bundle`` (format 3) re-signed with ``keys`` and its reference laid out as ``layout``.

    Args:
        bundle: A format-3 bundle.
        detached_reference: Its reference file, if the bundle detaches it.
        keys: Release keys to sign the new manifest with.
        layout: Where the reference goes.

    Returns:
        The new bundle, and its reference file when ``layout`` detaches it.

    Raises:
        ValueError: If ``bundle`` is not format 3, or detaches its reference and
            ``detached_reference`` is None.
        BundleError: If the bundle or the reference file is unsound.
    """
    contents = open_bundle(bundle)
    refs = contents.manifest.reference_histograms
    if not isinstance(refs, ReferenceFile):
        raise ValueError("relayout takes a format-3 bundle")
    files = {path: bytes(data) for path, data in contents.files.items()}
    reference = files.pop(refs.file, None) if not refs.detached else detached_reference
    if reference is None:
        raise ValueError("the bundle detaches its reference: pass the file beside it")
    draft: dict[str, Any] = {k: v for k, v in contents.envelope.signed.items() if k != "files"}
    if layout == "inline":
        draft.update(format=2, reference_histograms=decode(reference).to_dict())
        return build(draft, files, keys), None
    if layout == "bundle":
        draft["reference_histograms"] = {"file": REFERENCE_FILE}
        return build(draft, {**files, REFERENCE_FILE: reference}, keys), None
    draft["reference_histograms"] = {
        "file": REFERENCE_FILE,
        "sha256": hashlib.sha256(reference).hexdigest(),
        "length": len(reference),
    }
    return build(draft, files, keys), reference
