"""Fetch the dashboard's JavaScript and CSS from the npm registry at pinned versions and check them.

``server/ui/static/vendor/VENDOR.json`` is the record: per package its version, tarball URL and
the registry's SHA-512 integrity of the tarball, and per file taken from it the name it is stored
under and its SHA-256. ``make vendor`` runs this script: it downloads each tarball, checks it
against the recorded integrity, takes the files out, checks each SHA-256 and only then writes
them (and VENDOR.md, the same record for people). ``--check`` checks the files on disk against the
record without the network; ``--update`` takes the integrity from the registry and records new
hashes (after changing a version in VENDOR.json). Exit status 1 names every mismatch.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx

VENDOR_DIR = Path(__file__).resolve().parent.parent / "server" / "ui" / "static" / "vendor"
RECORD = VENDOR_DIR / "VENDOR.json"
REGISTRY = "https://registry.npmjs.org"
#: A tarball larger than this is refused before it is read whole.
MAX_TARBALL_BYTES = 16 * 1024 * 1024
TIMEOUT_S = 60.0


class VendorError(Exception):
    """A download or file does not match the record."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm_integrity(data: bytes) -> str:
    """The npm ``dist.integrity`` form of ``data``: ``sha512-`` and the base64 digest."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def load_record() -> dict[str, Any]:
    record: dict[str, Any] = json.loads(RECORD.read_text())
    return record


def registry_dist(client: httpx.Client, name: str, version: str) -> dict[str, Any]:
    """The registry's ``dist`` entry (tarball URL and integrity) of ``name@version``."""
    r = client.get(f"{REGISTRY}/{name}/{version}")
    if r.status_code != 200:
        raise VendorError(f"{name}@{version}: the registry answered {r.status_code}")
    dist: dict[str, Any] = r.json()["dist"]
    return dist


def fetch_tarball(client: httpx.Client, url: str) -> bytes:
    with client.stream("GET", url) as r:
        if r.status_code != 200:
            raise VendorError(f"{url}: {r.status_code}")
        chunks, size = [], 0
        for chunk in r.iter_bytes():
            size += len(chunk)
            if size > MAX_TARBALL_BYTES:
                raise VendorError(f"{url}: over {MAX_TARBALL_BYTES} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def members(tarball: bytes, wanted: list[str]) -> dict[str, bytes]:
    """The files ``wanted`` (paths inside the package) out of an npm tarball (``package/...``).

    Raises:
        VendorError: If one is missing or not a regular file.
    """
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for info in archive.getmembers():
            path = info.name.removeprefix("package/")
            if path in wanted and info.isfile():
                extracted = archive.extractfile(info)
                assert extracted is not None
                found[path] = extracted.read()
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise VendorError(f"not in the tarball: {', '.join(missing)}")
    return found


def vendor(*, update: bool) -> list[str]:
    """Download, check and write every package's files; the mismatches (none: all written)."""
    record = load_record()
    problems: list[str] = []
    staged: dict[Path, bytes] = {}
    with httpx.Client(timeout=TIMEOUT_S, follow_redirects=True) as client:
        for package in record["packages"]:
            label = f"{package['name']}@{package['version']}"
            if update:
                dist = registry_dist(client, package["name"], package["version"])
                package["tarball"] = dist["tarball"]
                package["integrity"] = dist["integrity"]
            data = fetch_tarball(client, package["tarball"])
            if npm_integrity(data) != package["integrity"]:
                problems.append(f"{label}: tarball integrity {npm_integrity(data)[:24]}... differs")
                continue
            files = members(data, list(package["files"]))
            for source, entry in package["files"].items():
                digest = sha256(files[source])
                if update:
                    entry["sha256"] = digest
                elif digest != entry["sha256"]:
                    problems.append(
                        f"{label}: {source} has SHA-256 {digest}, recorded {entry['sha256']}"
                    )
                    continue
                staged[VENDOR_DIR / entry["path"]] = files[source]
    if problems:
        return problems
    for path, content in staged.items():
        path.write_bytes(content)
    if update:
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
    (VENDOR_DIR / "VENDOR.md").write_text(markdown(record))
    return []


def check() -> list[str]:
    """Mismatches between the files on disk and the record (no network)."""
    problems = []
    for package in load_record()["packages"]:
        for source, entry in package["files"].items():
            path = VENDOR_DIR / entry["path"]
            if not path.is_file():
                problems.append(f"{entry['path']} ({package['name']} {source}) is missing")
            elif sha256(path.read_bytes()) != entry["sha256"]:
                problems.append(f"{entry['path']} differs from its recorded SHA-256")
    return problems


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Vendored front-end files",
        "",
        "Written by `make vendor` (`tools/vendor.py`) from `VENDOR.json`; served by the fleet",
        "server under `/ui/static/vendor/`, so nothing is fetched from the internet at run time.",
        "",
    ]
    for package in record["packages"]:
        lines += [
            f"## {package['name']} {package['version']} ({package['license']})",
            "",
            f"- tarball: {package['tarball']}",
            f"- integrity (npm, of the tarball): `{package['integrity']}`",
            f"- why this version: {package['why']}",
            "",
            "| file in the package | stored as | SHA-256 |",
            "| --- | --- | --- |",
        ]
        for source, entry in package["files"].items():
            lines.append(f"| `{source}` | `{entry['path']}` | `{entry['sha256']}` |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="check the files on disk only")
    mode.add_argument("--update", action="store_true", help="record new integrity and hashes")
    args = parser.parse_args(argv)
    try:
        problems = check() if args.check else vendor(update=args.update)
    except (VendorError, httpx.HTTPError, tarfile.TarError) as exc:
        problems = [str(exc)]
    for problem in problems:
        print(f"vendor: {problem}", file=sys.stderr)
    if not problems:
        print(f"vendor: every file matches {RECORD}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
