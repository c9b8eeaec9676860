"""Packaging: the core and device side stay free of heavy or platform-bound dependencies."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("fastapi", "sqlmodel", "bleak", "bumble", "torch", "onnxruntime", "sklearn")


def test_core_dependencies_exclude_platform_bound_and_server_packages() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for name in ("fastapi", "bleak", "bumble", "torch", "sqlmodel"):
        assert name not in core
    device = " ".join(project["optional-dependencies"]["device"]).lower()
    assert "fastapi" not in device and "sqlmodel" not in device and "bleak" not in device
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["torch"])


def test_formats_and_cli_import_without_heavy_modules() -> None:
    code = (
        "import sys, firmware_bundles, edgefleet.bundle_cli, edgefleet.keys_cli\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
