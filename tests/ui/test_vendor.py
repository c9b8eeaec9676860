"""The vendored front-end files are the ones recorded (SHA-256 in VENDOR.json, no network), ship
in the wheel's package data, and are what the server serves."""

from __future__ import annotations

import hashlib
import json
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from fastapi.testclient import TestClient

from tests.server.conftest import running_fleet
from tools import vendor

REPO = Path(__file__).resolve().parent.parent.parent


def test_every_vendored_file_matches_its_recorded_sha256() -> None:
    assert vendor.check() == []
    record = json.loads(vendor.RECORD.read_text())
    names = {p["name"]: p for p in record["packages"]}
    assert names["uplot"]["version"] == "1.6.32" and names["htmx.org"]["version"].startswith("2.")
    for package in record["packages"]:
        assert any("LICENSE" in source for source in package["files"]), package["name"]


def test_a_changed_file_is_reported(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "vendor"
    copy.mkdir()
    for f in vendor.VENDOR_DIR.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "htmx.min.js").write_bytes(b"alert(1)")
    monkeypatch.setattr(vendor, "VENDOR_DIR", copy)
    monkeypatch.setattr(vendor, "RECORD", copy / "VENDOR.json")
    assert vendor.check() == ["htmx.min.js differs from its recorded SHA-256"]


def test_templates_and_static_files_are_package_data() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["server"]
    ui = REPO / "server"
    files = [p for p in (ui / "ui").rglob("*") if p.is_file() and p.suffix != ".py"]
    assert files
    for path in files:
        relative = path.relative_to(ui).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def test_the_server_serves_the_recorded_bytes(tmp_path: Path) -> None:
    record = json.loads(vendor.RECORD.read_text())
    with running_fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path) as fleet:
        client: TestClient = fleet.client
        for package in record["packages"]:
            for entry in package["files"].values():
                r = client.get(f"/ui/static/vendor/{entry['path']}")
                assert r.status_code == 200
                assert hashlib.sha256(r.content).hexdigest() == entry["sha256"]
