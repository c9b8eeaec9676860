"""The rig against real boards and rings: opt-in, skipped with the reason when none is attached.

    pytest tests/hil/test_real_hardware.py --hil-serial=/dev/ttyACM0 --hil-root=lab/root.json \\
        --hil-director-key=lab/director.pem --hil-bundle=lab/b.efb --hil-data=lab/heldout.npz

The device must run firmware with the model group (docs/device-protocol.md) and trust the root;
the bundles must be signed by that root's release keys. Power cuts need a power switch the rig
does not drive, so that fault is not injected here.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from firmware_bundles import SigningKey, TrustedRoot
from hil.director import LabDirector
from hil.rig import RigPlan, RigSettings, load_data, run_rig

NEEDED = ("--hil-root", "--hil-director-key", "--hil-data")


@pytest.mark.parametrize(("option", "kind"), [("--hil-serial", "serial"), ("--hil-ble", "ble")])
def test_rig_on_a_real_device(
    request: pytest.FixtureRequest, tmp_path: Path, option: str, kind: str
) -> None:
    config = request.config
    address = config.getoption(option, default=None)
    if not address:
        pytest.skip(f"no real device: pass {option}=... with {', '.join(NEEDED)}, --hil-bundle")
    missing = [o for o in NEEDED if not config.getoption(o, default=None)]
    if missing or not config.getoption("--hil-bundle", default=[]):
        pytest.skip(f"a real device needs {', '.join(missing or ['--hil-bundle'])}")
    root = TrustedRoot.from_pinned(
        Path(config.getoption("--hil-root")).read_bytes(), datetime.now(UTC)
    ).root
    director = LabDirector(
        SigningKey.from_pem(Path(config.getoption("--hil-director-key")).read_bytes())
    )
    x, y = load_data(Path(config.getoption("--hil-data")))
    bundles = [Path(b).read_bytes() for b in config.getoption("--hil-bundle")]
    plan = RigPlan(bundles, [f"{kind}:{address}"], x, y, ["disconnect", "bitflip"])
    report = asyncio.run(
        run_rig(plan, root=root, director=director, work_dir=tmp_path, settings=RigSettings())
    )
    failed = [(c.name, c.detail) for run in report.runs for c in run.checks if c.status == "fail"]
    assert report.passed, failed
