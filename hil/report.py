"""The rig's report: every check with its figure and verdict, signed by a ``hil`` key.

Written three ways into the report directory: ``report.json`` (the signed envelope; its
``signed`` part is the report), ``junit.xml`` (one test case per check, for CI) and
``summary.md`` (a table per device, for people).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree as ET

from firmware_bundles import BundleError, SigningKey
from firmware_bundles.rig_report import HilReport, verify_hil_report
from firmware_bundles.root import Root
from firmware_bundles.signing import Envelope
from hil.errors import RigError

REPORT_TYPE = "hil-report"
REPORT_FORMAT = 1
Status = Literal["pass", "fail", "skip"]


@dataclass
class Check:
    """One named check on one device.

    Attributes:
        name: What was checked (``upload``, ``parity``, ``fault:power-cut``).
        status: ``pass``, ``fail`` or ``skip``.
        figure: The measured figure, if any.
        unit: The figure's unit.
        limit: What the figure had to meet, in words (``<= 1e-05``).
        detail: Why it failed or was skipped, or extra context.
    """

    name: str
    status: Status
    figure: float | int | str | None = None
    unit: str = ""
    limit: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        # Canonical JSON has no spelling for NaN or infinities; such a figure becomes text.
        if isinstance(self.figure, float) and not math.isfinite(self.figure):
            self.figure = str(self.figure)


@dataclass
class DeviceRun:
    """One bundle on one device."""

    spec: str
    hardware_id: str = ""
    device_id: str = ""
    firmware_version: str = ""
    bundle: dict[str, Any] | None = None
    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks) and bool(self.checks)


@dataclass
class RigReport:
    """The whole run."""

    started_at: str
    finished_at: str = ""
    faults: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    bundles: list[dict[str, Any]] = field(default_factory=list)
    runs: list[DeviceRun] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.runs) and all(run.passed for run in self.runs)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.update(_type=REPORT_TYPE, format=REPORT_FORMAT, passed=self.passed)
        for run, raw in zip(self.runs, body["runs"], strict=True):
            raw["passed"] = run.passed
        return body


def sign(report: RigReport, key: SigningKey) -> bytes:
    """The report as a signed envelope (canonical JSON bytes)."""
    envelope = Envelope(signed=report.to_dict())
    envelope.sign(key)
    return envelope.to_bytes()


def verify_report(data: bytes, root: Root) -> HilReport:
    """The report inside a signed envelope, if a threshold of the root's ``hil`` keys signed it.

    Raises:
        RigError: If it is not a rig report or the signatures do not verify.
    """
    try:
        return verify_hil_report(data, root)
    except BundleError as exc:
        raise RigError(f"report does not verify: {exc}") from exc


def write(report: RigReport, directory: Path, key: SigningKey) -> dict[str, Path]:
    """Write ``report.json`` (signed), ``junit.xml`` and ``summary.md`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "report.json",
        "junit": directory / "junit.xml",
        "markdown": directory / "summary.md",
    }
    paths["json"].write_bytes(sign(report, key))
    paths["junit"].write_bytes(junit_xml(report))
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    return paths


def junit_xml(report: RigReport) -> bytes:
    """One ``testsuite`` per device run, one ``testcase`` per check."""
    suites = ET.Element("testsuites", name="edgefleet hil")
    for run in report.runs:
        failures = sum(c.status == "fail" for c in run.checks)
        skipped = sum(c.status == "skip" for c in run.checks)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"{run.spec} {_bundle_label(run)}".strip(),
            tests=str(len(run.checks)),
            failures=str(failures),
            skipped=str(skipped),
        )
        for check in run.checks:
            case = ET.SubElement(suite, "testcase", classname=run.spec, name=check.name)
            props = ET.SubElement(case, "properties")
            ET.SubElement(props, "property", name="figure", value=_figure(check))
            if check.limit:
                ET.SubElement(props, "property", name="limit", value=check.limit)
            if check.status == "fail":
                ET.SubElement(case, "failure", message=check.detail or "failed")
            elif check.status == "skip":
                ET.SubElement(case, "skipped", message=check.detail)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="utf-8")


def markdown(report: RigReport) -> str:
    """A short summary: the verdict, then a table of checks per device run."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [f"# Hardware-in-the-loop run: {verdict}", ""]
    lines.append(f"Started {report.started_at}, finished {report.finished_at}.")
    faults = ", ".join(report.faults) or "none"
    lines += [f"Faults injected: {faults}. Held-out samples: {report.data.get('samples', 0)}.", ""]
    for run in report.runs:
        bundle = _bundle_label(run) or "no bundle"
        state = "pass" if run.passed else "FAIL"
        lines += [f"## {run.spec} ({run.hardware_id or 'unknown'}): {bundle}: {state}", ""]
        lines += ["| check | result | figure | limit | detail |", "| --- | --- | --- | --- | --- |"]
        for check in run.checks:
            figure = f"{_figure(check)} {check.unit}".strip()
            detail = check.detail.replace("|", "\\|")
            lines.append(f"| {check.name} | {check.status} | {figure} | {check.limit} | {detail} |")
        lines.append("")
    return "\n".join(lines)


def _bundle_label(run: DeviceRun) -> str:
    return f"{run.bundle['name']} {run.bundle['version']}" if run.bundle else ""


def _figure(check: Check) -> str:
    if check.figure is None:
        return ""
    if isinstance(check.figure, float):
        return f"{check.figure:.6g}"
    return str(check.figure)
