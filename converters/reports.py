"""What a conversion reports: every variant tried, and per target the bundle or why not.

Written to ``build-report.json`` beside the bundles and printed by ``edgefleet convert``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class VariantReport:
    """One variant (ONNX or ``.tflite``) and how it scored; ``error`` when it could not run."""

    name: str
    scheme: str
    model_bytes: int
    quantised_ops: int
    same_as_float: bool
    metric: float | None
    ram_bytes: int | None
    single_ms: float | None
    batch_ms: float | None
    notes: str
    error: str | None
    detail: str | None = None


@dataclass
class TargetReport:
    """One target: the chosen variant and its bundle, or the reason nothing fits."""

    target_id: str
    ok: bool
    variant: str | None = None
    bundle: str | None = None
    #: The detached reference file beside the bundle (targets that detach it), to publish with it.
    reference: str | None = None
    sha256: str | None = None
    bundle_bytes: int | None = None
    model_bytes: int | None = None
    metric: float | None = None
    reason: str | None = None
    rejected: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ConvertReport:
    """The whole conversion: the float model's figures, every variant, every target."""

    name: str
    version: str
    task: str
    metric_name: str
    float_metric: float
    float_bytes: int
    parity_max_diff: float
    variants: list[VariantReport]
    targets: list[TargetReport]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
