"""``edgefleet bundle``: pack, sign, inspect and verify signed model bundles."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.common import (
    JsonFlag,
    bundle_errors,
    console,
    fail,
    feed_file,
    literal,
    load_signing_key,
    print_json,
    read_file,
    write_file,
)
from edgefleet.renamed import OldTargetOpt, renamed
from firmware_bundles import (
    BundleContents,
    BundleReader,
    TargetCatalogue,
    TrustedRoot,
    add_signature,
    build,
    created_at_from_env,
    hash_bundle,
)
from firmware_bundles.bundle import check_target
from firmware_bundles.reference import ReferenceFile, ReferenceHistograms, detached_name
from firmware_bundles.signing import parse_json


def detached_reference(path: Path, data: bytes) -> bytes | None:
    """The reference file beside the bundle ``path`` (bytes ``data``) if the bundle detaches its
    reference histograms, else None; exits naming the file if it is not there."""
    reader = BundleReader(keep_files=False)
    with bundle_errors(f"{path}: "):
        reader.feed(data)
        refs = reader.finish().manifest.reference_histograms
    if not isinstance(refs, ReferenceFile) or not refs.detached:
        return None
    beside = path.with_name(detached_name(path.name))
    if not beside.is_file():
        fail(
            f"{path} detaches its reference histograms; their file {beside} is not beside it"
            " (edgefleet convert writes it there)"
        )
    return read_file(beside, "reference file")


bundle_app = typer.Typer(help="Pack, sign, inspect and verify model bundles.", no_args_is_help=True)

CatalogueOpt = Annotated[
    Path | None,
    typer.Option(envvar="EDGEFLEET_CATALOGUE", help="Target catalogue TOML (default: built in)."),
]


def load_catalogue(path: Path | None) -> TargetCatalogue:
    """The operator's catalogue file if given, else the built-in one."""
    with bundle_errors(f"{path}: " if path else ""):
        if path is None:
            return TargetCatalogue.load_default()
        return TargetCatalogue.from_bytes(read_file(path, "catalogue"))


@bundle_app.command("pack")
def bundle_pack(
    manifest: Annotated[Path, typer.Option(help="Manifest draft (JSON): every field but 'files'.")],
    file: Annotated[
        list[str], typer.Option(help="File to include: PATH or NAME=PATH. Repeatable.")
    ],
    key: Annotated[list[Path], typer.Option(help="Release key to sign with. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write.")],
    created_at: Annotated[
        str | None,
        typer.Option(help="ISO 8601 build time; else the draft's, else SOURCE_DATE_EPOCH."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Pack files and a signed manifest into a deterministic bundle.

    Packing never reads the clock: the build time comes from --created-at, the draft, or
    SOURCE_DATE_EPOCH, so the same inputs give byte-identical bundles.
    """
    draft: Any = parse_or_fail(read_file(manifest, "manifest draft"), manifest)
    if not isinstance(draft, dict):
        fail(f"{manifest}: manifest draft must be a JSON object", 2)
    files: dict[str, bytes] = {}
    for item in file:
        name, sep, path = item.partition("=")
        src = Path(path if sep else item)
        arcname = name if sep else src.name
        if arcname in files:
            fail(f"--file {item!r}: {arcname} given twice", 2)
        files[arcname] = read_file(src, "file")
    with bundle_errors():
        env_time = created_at_from_env(os.environ)
    if created_at is not None:
        draft["created_at"] = created_at
    elif "created_at" not in draft:
        if env_time is None:
            fail(
                "no build time: pass --created-at, set created_at in the draft,"
                " or set SOURCE_DATE_EPOCH",
                2,
            )
        draft["created_at"] = env_time.isoformat()
    keys = [load_signing_key(p) for p in key]
    with bundle_errors(f"{manifest}: "):
        data = build(draft, files, keys)
    _write_bundle(out, data, "packed", json_out)


def parse_or_fail(data: bytes, path: Path) -> Any:
    """Parse JSON, exiting with the file's name on error."""
    with bundle_errors(f"{path}: "):
        return parse_json(data, "manifest draft")


@bundle_app.command("sign")
def bundle_sign(
    bundle: Annotated[Path, typer.Argument(help="Bundle to add a signature to.")],
    key: Annotated[list[Path], typer.Option(help="Release key to sign with. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New bundle file.")],
    json_out: JsonFlag = False,
) -> None:
    """Add release signatures. The result is a new bundle with a new SHA-256."""
    data = read_file(bundle, "bundle")
    with bundle_errors(f"{bundle}: "):
        for path in key:
            data = add_signature(data, load_signing_key(path))
    _write_bundle(out, data, "signed", json_out)


def _write_bundle(out: Path, data: bytes, done: str, json_out: bool) -> None:
    """Write a new bundle to ``out`` and say what was ``done`` (its size and SHA-256)."""
    write_file(out, data)
    bundle_sha256 = hash_bundle(data)
    if json_out:
        print_json({"bundle": str(out), "sha256": bundle_sha256, "bytes": len(data)})
    else:
        console.print(f"{done} {literal(out)}: {len(data)} bytes, sha256 {bundle_sha256}")


def _summary(contents: BundleContents) -> dict[str, Any]:
    m = contents.manifest
    return {
        "sha256": contents.bundle_sha256,
        "bytes": contents.size,
        "name": m.name,
        "version": m.version,
        "release_counter": m.release_counter,
        "created_at": m.created_at.isoformat(),
        "manifest_format": m.format,
        "targets": [t.hardware_id for t in m.targets],
        "format": m.runtime.format,
        "precision": m.runtime.precision,
        "quantisation": m.quantisation.scheme,
        "op_types": m.runtime.op_types,
        "ram_estimate_bytes": m.runtime.ram_estimate.bytes,
        "metrics": m.metrics,
        "reference": _reference_place(m.reference_histograms),
        "files": [f.to_dict() for f in m.files],
        "signatures": [s.keyid for s in contents.envelope.signatures],
    }


def _reference_place(refs: ReferenceHistograms | ReferenceFile) -> str:
    """Where a manifest keeps its reference histograms, in words."""
    if not isinstance(refs, ReferenceFile):
        return "in the manifest (JSON)"
    if refs.detached:
        return f"detached: {refs.file} beside the bundle, {refs.length} B, sha256 {refs.sha256}"
    return f"{refs.file} in the bundle"


def _print_summary(summary: dict[str, Any], title: str) -> None:
    table = Table(title=literal(title), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key in (
        "name",
        "version",
        "release_counter",
        "sha256",
        "bytes",
        "created_at",
        "manifest_format",
        "targets",
        "format",
        "precision",
        "quantisation",
        "ram_estimate_bytes",
        "reference",
    ):
        value = summary[key]
        table.add_row(key, literal(", ".join(value) if isinstance(value, list) else value))
    metrics = ", ".join(f"{k}={v:g}" for k, v in summary["metrics"].items())
    table.add_row("metrics", literal(metrics))
    for f in summary["files"]:
        table.add_row("file", literal(f"{f['path']}  {f['length']} B  {f['sha256'][:16]}…"))
    for s in summary["signatures"]:
        table.add_row("signed by", literal(s))
    console.print(table)


@bundle_app.command("inspect")
def bundle_inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle file.")],
    json_out: JsonFlag = False,
) -> None:
    """Show a bundle's manifest and files without trusting it (files are still hash-checked)."""
    reader = BundleReader(keep_files=False, with_bundle_sha256=True)
    with bundle_errors(f"{bundle}: "):
        feed_file(bundle, "bundle", reader)
        contents = reader.finish()
    summary = _summary(contents)
    if json_out:
        print_json({**summary, "manifest": contents.manifest.to_dict()})
    else:
        _print_summary(summary, f"{bundle}")


@bundle_app.command("verify")
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle file.")],
    root: Annotated[Path, typer.Option(help="Trusted root.json to verify against.")],
    hardware_id: Annotated[
        str | None,
        typer.Option(help="Also check the bundle is built for and fits this hardware id."),
    ] = None,
    catalogue: CatalogueOpt = None,
    json_out: JsonFlag = False,
    target: OldTargetOpt = None,
) -> None:
    """Verify release signatures, every file's hash and length, and optionally target fit.

    Exits 0 when the bundle is trusted, 1 with the reason when it is not.
    """
    hardware_id = renamed(hardware_id, target, "--hardware-id", "--target")
    root_bytes = read_file(root, "root")
    now = datetime.now(UTC)
    try:
        with bundle_errors(f"{root}: "):
            trusted = TrustedRoot.from_pinned(root_bytes, now)
        fit_catalogue = load_catalogue(catalogue) if hardware_id else None
        reader = BundleReader(root=trusted.root, keep_files=False, with_bundle_sha256=True)
        with bundle_errors(f"{bundle}: "):
            feed_file(bundle, "bundle", reader)
            verified = reader.finish_verified()
            if hardware_id is not None:
                check_target(verified.manifest, hardware_id, verified.contents.size, fit_catalogue)
    except typer.Exit:
        if json_out:
            print_json({"ok": False, "bundle": str(bundle)})
        raise
    summary = _summary(verified.contents)
    if json_out:
        print_json({"ok": True, **summary, "release_keys": sorted(verified.release_keyids)})
    else:
        role = trusted.root.roles["release"]
        console.print(
            f"[green]verified[/] {literal(bundle)}: {literal(summary['name'])}"
            f" {literal(summary['version'])}"
            f" (release counter {summary['release_counter']}), sha256 {summary['sha256']},"
            f" {len(verified.release_keyids)} of {role.threshold} release signature(s) needed"
            + (f", fits {literal(hardware_id)}" if hardware_id else "")
        )
