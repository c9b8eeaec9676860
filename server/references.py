"""Reference histograms of published bundles: where the server keeps them and how it reads them.

A format-1 or format-2 manifest holds its reference as JSON. A format-3 one names a binary file
(docs/bundle-format.md): the server keeps its bytes with the bundle, taken from the bundle when
published or uploaded beside it when the bundle detaches it (rings never receive it), and
decodes them with the formats' one codec whenever it reads the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlmodel import Session

from firmware_bundles import BundleError, Manifest
from firmware_bundles.reference import ReferenceFile, ReferenceHistograms, attach
from firmware_bundles.window_builder import counted_histograms
from server.errors import ApiError
from server.models import Bundle
from server.registry import get_bundle
from server.schemas import ReferenceAttached


def manifest_of(manifest: Mapping[str, Any], reference: bytes | None) -> Manifest:
    """A stored manifest with its reference file attached, when the server has that file."""
    parsed = Manifest.from_dict(manifest)
    refs = parsed.reference_histograms
    if isinstance(refs, ReferenceFile) and reference is not None:
        attach(refs, reference)
    return parsed


def bundle_manifest(bundle: Bundle) -> Manifest:
    """The manifest of a published bundle, with its reference attached where the server has it."""
    return manifest_of(bundle.manifest, bundle.reference)


def has_reference(manifest: Manifest) -> bool:
    """Whether the manifest's reference histograms can be read (inline, or a file attached)."""
    refs = manifest.reference_histograms
    return not isinstance(refs, ReferenceFile) or refs.attached


def reference(manifest: Manifest) -> ReferenceHistograms:
    """The reference histograms drift is measured against.

    Raises:
        ApiError: 409 if the bundle detaches its reference and it was not uploaded.
    """
    if not has_reference(manifest):
        raise ApiError(
            409,
            f"{manifest.name} {manifest.version}: the bundle's reference histograms are detached"
            " and were not uploaded (edgefleet publish uploads the .reference.bin beside the"
            " bundle; POST /v1/bundles/{sha256}/reference)",
        )
    refs = manifest.reference_histograms
    return refs.histograms if isinstance(refs, ReferenceFile) else refs


def bins(manifest: Manifest) -> ReferenceHistograms:
    """Histograms that name the bins of this version's figures: the reference where the server
    has it, else what the bundle's devices count (:func:`counted_histograms`)."""
    return reference(manifest) if has_reference(manifest) else counted_histograms(manifest)


def attach_reference(*, session: Session, sha256: str, data: bytes) -> ReferenceAttached:
    """Keep the detached reference file of a published bundle (again: the same file is fine).

    Raises:
        ApiError: 404 for an unknown bundle; 409 if the bundle keeps its reference itself;
            400 if ``data`` is not the file its manifest pins (length, SHA-256) or not a valid
            reference file.
    """
    bundle = get_bundle(session, sha256)
    manifest = Manifest.from_dict(bundle.manifest)
    refs = manifest.reference_histograms
    if not isinstance(refs, ReferenceFile) or not refs.detached:
        where = "in its manifest" if not isinstance(refs, ReferenceFile) else "in the bundle"
        raise ApiError(409, f"bundle {sha256[:12]} keeps its reference histograms {where}")
    try:
        attach(refs, data)
    except BundleError as exc:
        raise ApiError(400, f"reference refused: {exc}") from exc
    bundle.reference = data
    session.add(bundle)
    session.commit()
    inputs, outputs = len(refs.inputs), len(refs.outputs)
    return ReferenceAttached(
        sha256=sha256, target_id=bundle.target_id, inputs=inputs, outputs=outputs
    )
