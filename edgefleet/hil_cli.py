"""``edgefleet hil``: run bundles on real or emulated devices and sign the report.

    edgefleet hil run --bundle B [--bundle B2 ...] --device emulated:ring-gen3 \\
        --device serial:/dev/ttyACM0 --device ble:AA:BB:CC:DD:EE:FF --data HELDOUT.npz \\
        [--faults disconnect,bitflip,power-cut] --report DIR \\
        --root root.json --director-key director.pem --hil-key hil.pem
    edgefleet hil samples --key release1.pem --key release2.pem --out DIR
    edgefleet hil verify-report DIR/report.json --root root.json
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefleet.common import (
    EXIT_FAILED,
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
from edgefleet.renamed import OldTargetListOpt, renamed
from firmware_bundles import TrustedRoot
from firmware_bundles.root import Root

hil_app = typer.Typer(
    help="Hardware in the loop: run bundles on devices (emulated or real), signed reports.",
    no_args_is_help=True,
)

RootOpt = Annotated[Path, typer.Option(help="Trusted root.json (the devices' root).")]


def _root(path: Path) -> Root:
    data = read_file(path, "root")
    with bundle_errors(f"{path}: "):
        return TrustedRoot.from_pinned(data, datetime.now(UTC)).root


@hil_app.command("run")
def hil_run(
    bundle: Annotated[list[Path], typer.Option(help="Bundle to run. Repeatable.")],
    device: Annotated[
        list[str],
        typer.Option(
            help="emulated:TARGET, serial:PORT or ble:ADDRESS. Repeatable. Real devices must"
            " trust --root and its director key."
        ),
    ],
    data: Annotated[Path, typer.Option(help="Held-out data: .npz with X (and y for accuracy).")],
    report: Annotated[Path, typer.Option(help="Directory for report.json, junit.xml, summary.md.")],
    root: RootOpt,
    director_key: Annotated[
        Path, typer.Option(help="Key of the root's director role: signs the devices' assignments.")
    ],
    hil_key: Annotated[Path, typer.Option(help="Key of the root's hil role: signs the report.")],
    faults: Annotated[
        str, typer.Option(help="Comma-separated faults: disconnect, bitflip, power-cut.")
    ] = "",
    max_samples: Annotated[int, typer.Option(min=1, help="Held-out samples per device.")] = 200,
    latency_p95_max_ms: Annotated[float, typer.Option(help="p95 latency limit.")] = 50.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the fault injection.")] = None,
    baud: Annotated[int, typer.Option(help="UART speed of emulated boards.")] = 115_200,
    timeout_s: Annotated[
        float, typer.Option(min=0.1, help="How long a device may take to answer a request.")
    ] = 5.0,
    json_out: JsonFlag = False,
) -> None:
    """Run every bundle on every device built for it; exit 1 if any check fails.

    Each device gets the bundles built for its hardware id: verify, upload, activate (under an
    assignment set signed with --director-key), self-test, the held-out data through the device
    against ONNX Runtime on the host, latency and peak memory, telemetry, then the faults.
    """
    from device_agent.link import LinkSettings
    from hil.director import LabDirector
    from hil.errors import HilError
    from hil.report import write
    from hil.rig import RigPlan, RigSettings, check_faults, load_data, run_rig

    trusted = _root(root)
    director = LabDirector(load_signing_key(director_key))
    signer = load_signing_key(hil_key)
    if signer.keyid not in trusted.roles["hil"].keyids:
        fail(f"--hil-key {hil_key} is not a key of the root's hil role", 2)
    try:
        fault_list = check_faults([f.strip() for f in faults.split(",") if f.strip()])
        x, y = load_data(data)
        settings = RigSettings(
            max_samples=max_samples,
            latency_p95_max_ms=latency_p95_max_ms,
            seed=seed,
            emulated_baud=baud,
        )
        plan = RigPlan([read_file(b, "bundle") for b in bundle], device, x, y, fault_list)
        with tempfile.TemporaryDirectory(prefix="edgefleet-hil-") as tmp:
            link = LinkSettings(
                request_timeout_s=timeout_s,
                upload_timeout_s=timeout_s,
                activate_timeout_s=max(timeout_s, 30.0),
            )
            result = asyncio.run(
                run_rig(
                    plan,
                    root=trusted,
                    director=director,
                    work_dir=Path(tmp),
                    settings=settings,
                    link=link,
                )
            )
    except HilError as exc:
        fail(str(exc), 2)
    paths = write(result, report, signer)
    if json_out:
        print_json(result.to_dict() | {"files": {k: str(v) for k, v in paths.items()}})
    else:
        _print(result)
        console.print(
            f"report: {literal(paths['json'])}  junit: {literal(paths['junit'])}"
            f"  summary: {literal(paths['markdown'])}"
        )
    if not result.passed:
        raise typer.Exit(EXIT_FAILED)


def _print(result: object) -> None:
    from hil.report import RigReport

    assert isinstance(result, RigReport)
    table = Table(title="HIL checks", show_lines=False)
    for column in ("device", "bundle", "check", "result", "figure", "limit"):
        table.add_column(column)
    for run in result.runs:
        bundle = f"{run.bundle['name']} {run.bundle['version']}" if run.bundle else ""
        for check in run.checks:
            style = {"pass": "green", "fail": "bold red", "skip": "yellow"}[check.status]
            figure = "" if check.figure is None else f"{check.figure} {check.unit}".strip()
            table.add_row(
                literal(run.spec),
                literal(bundle),
                literal(check.name),
                f"[{style}]{literal(check.status)}[/]",
                literal(figure),
                literal(check.limit),
            )
    console.print(table)
    console.print("[green]PASSED[/]" if result.passed else "[bold red]FAILED[/]")


@hil_app.command("samples")
def hil_samples(
    key: Annotated[list[Path], typer.Option(help="Release key to sign with. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")],
    hardware_ids: Annotated[
        list[str] | None,
        typer.Option(
            "--hardware-id",
            help="Hardware id to build for. Repeatable (default: the emulated ones).",
        ),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Rows of held-out data.")] = 200,
    target: OldTargetListOpt = None,
) -> None:
    """Write a small sample bundle per target and heldout.npz, for trying the rig."""
    import numpy as np

    from hil.profiles import emulated_targets
    from hil.samples import heldout, sample_bundle

    keys = [load_signing_key(k) for k in key]
    hardware_ids = renamed(hardware_ids, target, "--hardware-id", "--target")
    for hardware_id in hardware_ids or emulated_targets():
        with bundle_errors():
            data = sample_bundle(keys, [hardware_id])
        write_file(out / f"sample-{hardware_id}.efb", data)
        console.print(f"wrote {literal(out / f'sample-{hardware_id}.efb')} ({len(data)} bytes)")
    x, y = heldout(samples)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "heldout.npz", X=x, y=y)
    console.print(f"wrote {literal(out / 'heldout.npz')} ({samples} rows)")


@hil_app.command("verify-report")
def hil_verify_report(
    report_file: Annotated[Path, typer.Argument(help="report.json written by hil run.")],
    root: RootOpt,
    json_out: JsonFlag = False,
) -> None:
    """Check a report's hil signature; exit 1 if it does not verify or did not pass."""
    from hil.errors import RigError
    from hil.report import verify_report

    trusted = _root(root)
    try:
        report = verify_report(read_file(report_file, "report"), trusted)
    except RigError as exc:
        fail(str(exc))
    if json_out:
        print_json(report.to_dict())
    else:
        verdict = "passed" if report.passed else "FAILED"
        console.print(f"{literal(report_file)}: signature ok; the run {verdict}")
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)
