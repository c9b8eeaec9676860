"""The hardware-in-the-loop rig's signed report: which bundles ran on which devices, each
check's figure and verdict. The rig (``hil/report.py``) writes it; the server's release gate
(``--require-hil-report``) reads it with :func:`verify_hil_report`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from firmware_bundles.manifest import Sha256
from firmware_bundles.root import Root
from firmware_bundles.schema import Document
from firmware_bundles.signing import Envelope

HilStatus = Literal["pass", "fail", "skip"]


class HilCheck(Document):
    """One named check of a hardware-in-the-loop run, with its figure and verdict."""

    name: str
    status: HilStatus
    figure: float | int | str | None = None
    unit: str = ""
    limit: str = ""
    detail: str = ""


class HilBundleRef(Document):
    """A bundle a rig ran; ``bundle_sha256`` is ``sha256`` in the signed report."""

    name: str
    version: str
    release_counter: int = Field(ge=0)
    bundle_sha256: Sha256 = Field(alias="sha256")
    bytes: int = Field(gt=0)
    targets: list[str]


class HilRun(Document):
    """One bundle on one device (``emulated:ring-gen3``, ``serial:/dev/ttyACM0``, ...)."""

    spec: str
    hardware_id: str = ""
    device_id: str = ""
    firmware_version: str = ""
    bundle: HilBundleRef | None = None
    checks: list[HilCheck]
    passed: bool


class HilReport(Document):
    """A rig's verdict on bundles, signed by a key of the root's ``hil`` role.

    The release gate asks :meth:`passed_for` of each bundle and target generation it releases.
    """

    type: Literal["hil-report"] = Field(default="hil-report", alias="_type")
    format: Literal[1] = 1
    started_at: datetime
    finished_at: datetime
    faults: list[str] = Field(default_factory=list)
    data: dict[str, Any] = Field(default_factory=dict)
    bundles: list[HilBundleRef]
    runs: list[HilRun]
    passed: bool

    def runs_of(self, bundle_sha256: str, hardware_id: str) -> list[HilRun]:
        """The runs of the bundle on devices of ``hardware_id``."""
        return [
            r
            for r in self.runs
            if r.hardware_id == hardware_id
            and r.bundle is not None
            and r.bundle.bundle_sha256 == bundle_sha256
        ]

    def passed_for(self, bundle_sha256: str, hardware_id: str) -> bool:
        """Whether the bundle ran on at least one device of ``hardware_id`` and every such run
        passed."""
        runs = self.runs_of(bundle_sha256, hardware_id)
        return bool(runs) and all(r.passed for r in runs)


def verify_hil_report(data: bytes, root: Root) -> HilReport:
    """A rig report, if a threshold of the root's ``hil`` keys signed it.

    Raises:
        SchemaError: If it is not a signed rig report.
        ThresholdError: If the ``hil`` signature threshold is not met.
    """
    envelope = Envelope.from_bytes(data, "hil report")
    root.verify(envelope, "hil")
    return HilReport.from_dict(envelope.signed)
