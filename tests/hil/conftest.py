"""Fixtures for the emulated-device tests: sample bundles, the lab director, hardware options.

Real hardware is opt-in (pytest tests/hil ...): ``--hil-serial=/dev/ttyACM0`` or
``--hil-ble=AA:BB:CC:DD:EE:FF``, with the lab's ``--hil-root=root.json`` (the devices' root),
``--hil-director-key=director.pem``, ``--hil-bundle=B.efb`` (repeatable; signed by that root's
release keys) and ``--hil-data=heldout.npz``.
"""

from __future__ import annotations

import pytest

from hil.director import LabDirector
from hil.samples import sample_bundle
from tests.conftest import Keys

ALL_TARGETS = ["ring-gen3", "ring-gen4", "devboard-nrf52840"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop (real devices, opt-in)")
    group.addoption("--hil-serial", default=None, help="serial port of a real board (SMP)")
    group.addoption("--hil-ble", default=None, help="BLE address of a real ring or board")
    group.addoption("--hil-root", default=None, help="root.json the real devices trust")
    group.addoption("--hil-director-key", default=None, help="director key of that root (PEM)")
    group.addoption("--hil-bundle", action="append", default=[], help="bundle to run (repeatable)")
    group.addoption("--hil-data", default=None, help="held-out data (.npz with X, y)")


@pytest.fixture(scope="session")
def bundles(keys: Keys) -> dict[str, bytes]:
    """Sample bundles for every emulated target: two versions, an older one and an oversized one."""
    release = keys.release
    return {
        "v1": sample_bundle(release, ALL_TARGETS, version="1.0.0", release_counter=5, seed=0),
        "v2": sample_bundle(release, ALL_TARGETS, version="1.1.0", release_counter=6, seed=1),
        "old": sample_bundle(release, ALL_TARGETS, version="0.9.0", release_counter=3, seed=2),
        # Four times the pipelining window of the devices, so a disconnect can fall mid-upload.
        "padded": sample_bundle(
            release, ALL_TARGETS, version="1.0.1", release_counter=5, padding_bytes=30_000
        ),
        "huge": sample_bundle(
            release, ALL_TARGETS, version="1.2.0", release_counter=7, padding_bytes=340_000
        ),
    }


@pytest.fixture(scope="session")
def director(keys: Keys) -> LabDirector:
    return LabDirector(keys.director[0])
