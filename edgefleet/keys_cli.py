"""``edgefleet keys`` and ``edgefleet root``: signing keys and the trusted root."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.common import (
    JsonFlag,
    bundle_errors,
    console,
    fail,
    literal,
    load_signing_key,
    print_json,
    read_file,
    write_file,
)
from firmware_bundles import PublicKey, SigningKey, TrustedRoot, parse_root, sign_root
from firmware_bundles.root import ROLES, Root, new_root
from firmware_bundles.signing import load_public_key

keys_app = typer.Typer(help="Create Ed25519 signing keys.", no_args_is_help=True)
root_app = typer.Typer(
    help="Create, sign, rotate and check the trusted root (root.json).", no_args_is_help=True
)

KeyList = Annotated[list[Path] | None, typer.Option(help="Key file (PEM, private or public).")]


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Private key file to write (0600).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing key file.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Generate an Ed25519 key: OUT (private, mode 0600) and OUT.pub (public)."""
    key = SigningKey.generate()
    write_file(out, key.to_pem(), private=True, force=force)
    pub = out.with_name(out.name + ".pub")
    write_file(pub, key.public.to_pem(), force=True)
    if json_out:
        print_json({"keyid": key.keyid, "private": str(out), "public": str(pub)})
    else:
        console.print(
            f"key [bold]{key.keyid}[/]\n  private {literal(out)} (keep it offline)"
            f"\n  public  {literal(pub)}"
        )


def _parse_thresholds(items: list[str] | None) -> dict[str, int]:
    result: dict[str, int] = {}
    for item in items or []:
        role, _, num = item.partition("=")
        if role not in ROLES or not num.isdigit() or int(num) < 1:
            fail(
                f"--threshold {item!r}: expected ROLE=N with ROLE in {', '.join(ROLES)}, N >= 1", 2
            )
        result[role] = int(num)
    return result


def _public_keys(paths: list[Path] | None) -> list[PublicKey]:
    keys = []
    for path in paths or []:
        with bundle_errors(f"{path}: "):
            keys.append(load_public_key(read_file(path, "key file")))
    return keys


def _expiry(days: int) -> datetime:
    if days < 1:
        fail("--expires-days must be at least 1", 2)
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


@root_app.command("init")
def root_init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write root.json.")],
    root_key: Annotated[
        list[Path], typer.Option(help="Private root key; signs this root. Repeat for several.")
    ],
    release_key: KeyList = None,
    director_key: KeyList = None,
    hil_key: KeyList = None,
    threshold: Annotated[
        list[str] | None, typer.Option(help="ROLE=N, e.g. release=2 (default 1 each).")
    ] = None,
    expires_days: Annotated[int, typer.Option(help="Days until this root expires.")] = 365,
    force: Annotated[bool, typer.Option(help="Overwrite OUT.")] = False,
) -> None:
    """Create version 1 of the trusted root, self-signed by the root keys."""
    signers = [load_signing_key(p) for p in root_key]
    role_keys = {
        "root": [k.public for k in signers],
        "release": _public_keys(release_key),
        "director": _public_keys(director_key),
        "hil": _public_keys(hil_key),
    }
    empty = [r for r, ks in role_keys.items() if not ks]
    if empty:
        fail(f"no keys for role(s) {', '.join(empty)}; pass --{empty[0]}-key", 2)
    with bundle_errors():
        root = new_root(
            version=1,
            expires=_expiry(expires_days),
            role_keys=role_keys,
            thresholds=_parse_thresholds(threshold),
        )
        envelope = sign_root(root, signers)
        TrustedRoot.from_pinned(envelope.to_bytes(), datetime.now(UTC))
    write_file(out, envelope.to_bytes(), force=force)
    console.print(f"root version 1 written to {literal(out)}, expires {root.expires.isoformat()}")


@root_app.command("sign")
def root_sign(
    root_file: Annotated[Path, typer.Argument(help="root.json to add a signature to.")],
    key: Annotated[list[Path], typer.Option(help="Private key to sign with. Repeatable.")],
    out: Annotated[Path | None, typer.Option(help="Output (default: in place).")] = None,
) -> None:
    """Add signatures to a root (for thresholds above one, or rotation by several holders)."""
    with bundle_errors(f"{root_file}: "):
        envelope, root = parse_root(read_file(root_file, "root"))
    for path in key:
        envelope.sign(load_signing_key(path))
    write_file(out or root_file, envelope.to_bytes())
    console.print(f"root version {root.version} now has {len(envelope.signatures)} signature(s)")


@root_app.command("rotate")
def root_rotate(
    root_file: Annotated[Path, typer.Argument(help="The current root.json (version N).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write version N+1.")],
    sign_key: Annotated[
        list[Path],
        typer.Option(help="Private key to sign N+1 with: old and new root keys. Repeatable."),
    ],
    root_key: KeyList = None,
    release_key: KeyList = None,
    director_key: KeyList = None,
    hil_key: KeyList = None,
    threshold: Annotated[list[str] | None, typer.Option(help="ROLE=N for changed roles.")] = None,
    expires_days: Annotated[int, typer.Option(help="Days until N+1 expires.")] = 365,
) -> None:
    """Make root N+1: roles given here replace N's, others carry over; sign with old and new."""
    with bundle_errors(f"{root_file}: "):
        _, old = parse_root(read_file(root_file, "root"))
    given = {"root": root_key, "release": release_key, "director": director_key, "hil": hil_key}
    old_keys = old.public_keys()
    role_keys = {
        role: _public_keys(paths) if paths else [old_keys[k] for k in old.roles[role].keyids]  # type: ignore[index]
        for role, paths in given.items()
    }
    thresholds = {r: s.threshold for r, s in old.roles.items()} | _parse_thresholds(threshold)
    with bundle_errors():
        new = new_root(
            version=old.version + 1,
            expires=_expiry(expires_days),
            role_keys=role_keys,
            thresholds=thresholds,
        )
        envelope = sign_root(new, [load_signing_key(p) for p in sign_key])
    write_file(out, envelope.to_bytes())
    console.print(f"root version {new.version} written to {literal(out)}")
    _report_chain_check(old, envelope.to_bytes())


def _report_chain_check(old: Root, new_bytes: bytes) -> None:
    trusted = TrustedRoot(old, parse_root(new_bytes)[0])
    try:
        trusted.update(new_bytes)
        console.print("  chain check: accepted by holders of the old root")
    except Exception as exc:
        console.print(
            f"  [yellow]chain check: not yet accepted[/] ({literal(exc)}); add signatures"
        )


@root_app.command("verify")
def root_verify(
    trusted: Annotated[Path, typer.Option(help="The pinned root a device trusts.")],
    chain: Annotated[
        list[Path] | None, typer.Argument(help="Roots N+1, N+2, ... in order.")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Walk a root chain from a pinned root as a device would; exit 1 on the first refusal."""
    now = datetime.now(UTC)
    with bundle_errors(f"{trusted}: "):
        envelope, root = parse_root(read_file(trusted, "root"))
        root.verify(envelope, "root")
        state = TrustedRoot(root, envelope)
    for path in chain or []:
        with bundle_errors(f"{path}: "):
            state.update(read_file(path, "root"))
    with bundle_errors():
        state.check_expiry(now)
    result = {"version": state.root.version, "expires": state.root.expires.isoformat()}
    if json_out:
        print_json({"ok": True, **result})
    else:
        console.print(f"trusted root version {result['version']}, expires {result['expires']}")
