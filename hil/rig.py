"""The hardware-in-the-loop rig: every bundle on every device it is built for, with faults.

For each device spec (``emulated:ring-gen3``, ``serial:/dev/ttyACM0``, ``ble:AA:...``) the rig
connects, asks the device who it is, and runs each bundle built for its hardware id: verify,
upload, activate under an assignment set signed by the lab's director key, self-test, the
held-out data through the device against ONNX Runtime on the host, latency and peak memory,
telemetry, then the injected faults. The report names each check with its figure and verdict.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from device_agent.link import LinkError, LinkSettings
from firmware_bundles import BundleError, TargetCatalogue, hash_bundle, open_bundle
from firmware_bundles.root import Root
from hil.director import LabDirector
from hil.errors import HilError, RigError
from hil.faults import FAULT_KINDS
from hil.report import Check, DeviceRun, RigReport
from hil.rig_checks import BundleOnDevice, Limits
from hil.serial_device import UartTiming
from hil.targets import open_device


class RigSettings(BaseSettings):
    """Limits of a rig run (env prefix ``EDGEFLEET_HIL_``)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_HIL_", extra="forbid")

    #: Held-out samples run through each device (one inference each).
    max_samples: int = Field(default=200, ge=1)
    #: The p95 inference latency a device may take.
    latency_p95_max_ms: float = Field(default=50.0, gt=0)
    #: How far accuracy on the device may fall below the manifest's claim.
    accuracy_drop_max: float = Field(default=0.02, ge=0)
    #: UART speed of emulated boards.
    emulated_baud: int = Field(default=115_200, gt=0)
    #: Seed of the fault injection (offsets, bits, power-cut writes); None draws one.
    seed: int | None = None


@dataclass(frozen=True)
class RigPlan:
    """What to run: bundles, devices, held-out data and faults."""

    bundles: list[bytes]
    devices: list[str]
    x: np.ndarray
    y: np.ndarray | None
    faults: list[str]


def check_faults(faults: list[str]) -> list[str]:
    """The fault kinds, validated.

    Raises:
        RigError: Naming an unknown kind and the known ones.
    """
    for fault in faults:
        if fault not in FAULT_KINDS:
            raise RigError(f"unknown fault {fault!r}; known: {', '.join(FAULT_KINDS)}")
    return faults


def load_data(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out data from an ``.npz`` with ``X`` and optionally ``y``.

    Raises:
        RigError: If the file is missing, not an npz, or has no ``X``.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if "X" not in data:
                raise RigError(f"{path}: no array named X (has {', '.join(data.files) or 'none'})")
            x = np.asarray(data["X"])
            y = np.asarray(data["y"]) if "y" in data else None
    except (OSError, ValueError) as exc:
        raise RigError(f"{path}: cannot read held-out data: {exc}") from exc
    if len(x) == 0:
        raise RigError(f"{path}: X is empty")
    if y is not None and len(y) != len(x):
        raise RigError(f"{path}: X has {len(x)} rows, y has {len(y)}")
    return x, y


async def run_rig(
    plan: RigPlan,
    *,
    root: Root,
    director: LabDirector,
    work_dir: Path,
    settings: RigSettings | None = None,
    link: LinkSettings | None = None,
    catalogue: TargetCatalogue | None = None,
) -> RigReport:
    """Run every bundle on every device; never raises for a device's failure (it is reported).

    Raises:
        RigError: If a bundle cannot even be parsed.
    """
    settings = settings or RigSettings()
    link = link or LinkSettings()
    catalogue = catalogue or TargetCatalogue.load_default()
    seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**32)
    report = RigReport(
        started_at=_now(),
        faults=list(plan.faults),
        data={"samples": min(len(plan.x), settings.max_samples), "seed": seed},
        bundles=[_describe(b) for b in plan.bundles],
    )
    limits = Limits(settings.max_samples, settings.latency_p95_max_ms, settings.accuracy_drop_max)
    # Devices run side by side, as on a real rig; each has its own seeded random source.
    results = await asyncio.gather(
        *(
            _run_device(
                spec,
                index,
                plan,
                root,
                director,
                work_dir,
                settings,
                link,
                catalogue,
                limits,
                random.Random(f"{seed}:{index}"),
            )
            for index, spec in enumerate(plan.devices)
        )
    )
    for runs in results:
        report.runs.extend(runs)
    report.finished_at = _now()
    return report


async def _run_device(
    spec: str,
    index: int,
    plan: RigPlan,
    root: Root,
    director: LabDirector,
    work_dir: Path,
    settings: RigSettings,
    link: LinkSettings,
    catalogue: TargetCatalogue,
    limits: Limits,
    rng: random.Random,
) -> list[DeviceRun]:
    try:
        dut = open_device(
            spec,
            work_dir=work_dir,
            root=root,
            settings=link,
            index=index,
            uart=UartTiming(settings.emulated_baud),
        )
        await dut.start()
    except (HilError, LinkError, OSError) as exc:
        return [DeviceRun(spec, checks=[Check("connect", "fail", detail=str(exc))])]
    runs: list[DeviceRun] = []
    try:
        try:
            client = await dut.connect()
            identity = await client.identity()
        except LinkError as exc:
            return [DeviceRun(spec, checks=[Check("connect", "fail", detail=str(exc))])]
        mine = [b for b in plan.bundles if open_bundle(b).manifest.target(identity.hardware_id)]
        if not mine:
            built = ", ".join(
                sorted(
                    {t.hardware_id for b in plan.bundles for t in open_bundle(b).manifest.targets}
                )
            )
            return [
                DeviceRun(
                    spec,
                    identity.hardware_id,
                    identity.device_id,
                    identity.firmware_version,
                    checks=[
                        Check(
                            "bundle-for-target",
                            "fail",
                            detail=f"no bundle built for {identity.hardware_id} ({built})",
                        )
                    ],
                )
            ]
        for bundle in mine:
            run = DeviceRun(
                spec,
                identity.hardware_id,
                identity.device_id,
                identity.firmware_version,
                bundle=_describe(bundle),
            )
            runs.append(run)
            job = BundleOnDevice(
                dut, bundle, identity, director, root, catalogue, limits, rng, work_dir
            )
            try:
                await _run_bundle(job, run, plan)
            except (LinkError, HilError) as exc:
                run.add(Check("link", "fail", detail=f"the run stopped: {exc}"))
    finally:
        await dut.stop()
    return runs


async def _run_bundle(job: BundleOnDevice, run: DeviceRun, plan: RigPlan) -> None:
    if not job.check_bundle(run) or not await job.install(run):
        return
    await job.evaluate(run, plan.x, plan.y)
    if "disconnect" in plan.faults:
        await job.fault_disconnect(run)
    if "bitflip" in plan.faults:
        await job.fault_bitflip(run)
    if "power-cut" in plan.faults:
        await job.fault_power_cut(run, plan.x[0])


def _describe(bundle: bytes) -> dict[str, object]:
    try:
        manifest = open_bundle(bundle).manifest
    except BundleError as exc:
        raise RigError(f"a bundle cannot be read: {exc}") from exc
    return {
        "name": manifest.name,
        "version": manifest.version,
        "release_counter": manifest.release_counter,
        "sha256": hash_bundle(bundle),
        "bytes": len(bundle),
        "targets": [t.hardware_id for t in manifest.targets],
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
