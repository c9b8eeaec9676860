"""Rollout gate configuration: which gates are on and their thresholds (a rollout plan's
``gates``), and the error for samples that cannot be judged. Used by :mod:`server.gates`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from server.errors import ServerError

#: Fewest devices per arm a gate may ever be judged on: below this the device-level CLT behind
#: the sequences is not trusted, so a config cannot ask for less.
MIN_DEVICES_FLOOR = 10
#: The two-arm gates on one value per device (a rate, or the log of a latency quantile).
RATE_GATES = ("error_rate", "selftest", "feedback", "accuracy", "latency")


class GateInputError(ServerError, ValueError):
    """A sample cannot be judged: the message names the device and the field."""


class _Gate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = True
    #: When False, too little evidence is "no-data" and does not hold the stage.
    required: bool = True


class RateGate(_Gate):
    """Harm when the treatment's per-device rate exceeds the control's by more than this."""

    max_increase: float = Field(gt=0, le=1)


class InstallGate(_Gate):
    """Harm when more than this share of treatment devices fail to install and self-test."""

    max_failure_rate: float = Field(default=0.10, gt=0, lt=1)


class LatencyGate(_Gate):
    quantile: float = Field(default=0.95, gt=0, lt=1)
    max_relative_increase: float = Field(default=0.10, gt=0)
    #: A device's own quantile is used once it has this many latencies.
    min_inferences_per_device: int = Field(default=20, ge=1)


class OutputShiftGate(_Gate):
    max_js_bits: float = Field(default=0.02, gt=0, le=1)


class InputDriftGate(_Gate):
    max_psi: float = Field(default=0.10, gt=0)


class FeedbackGate(RateGate):
    max_increase: float = Field(default=0.005, gt=0, le=1)
    negative_kinds: tuple[str, ...] = ("thumbs_down", "negative")


class AccuracyGate(_Gate):
    required: bool = False  # labels may never come for a model without label feedback
    max_drop: float = Field(default=0.015, gt=0, le=1)
    min_labels_per_arm: int = Field(default=300, ge=1)


class ShadowAgreementGate(_Gate):
    """A shadow rollout's candidate must agree with the answering version on at least this
    share of the compared calls (judged by :mod:`server.shadow_gates`)."""

    min_agreement: float = Field(default=0.9, gt=0, le=1)
    min_compared: int = Field(default=300, ge=1)


class DataQualityGate(_Gate):
    """Harm when the treatment's share of calls with a data-quality problem (refused by the
    schema check, or a missing value) exceeds the control's by more than this (judged by
    :mod:`server.shadow_gates`); off unless a plan turns it on."""

    enabled: bool = False
    max_increase: float = Field(default=0.01, gt=0, le=1)


class GateConfig(BaseModel):
    """Which gates are on and their thresholds; the defaults need no flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    #: Chance, over all looks, that an A/A rollout fails any gate (split over enabled gates).
    alpha: float = Field(default=0.05, gt=0, lt=1)
    min_devices_per_arm: int = Field(default=30, ge=MIN_DEVICES_FLOOR)
    min_inferences_per_arm: int = Field(default=2000, ge=1)
    #: ``k`` in the device weight ``n / (n + k)``.
    device_weight_half_count: float = Field(default=50.0, gt=0)
    error_rate: RateGate = RateGate(max_increase=0.0025)
    selftest: RateGate = RateGate(max_increase=0.01)  # self-test failures per window
    install: InstallGate = InstallGate()
    latency: LatencyGate = LatencyGate()
    output_shift: OutputShiftGate = OutputShiftGate()
    input_drift: InputDriftGate = InputDriftGate()
    feedback: FeedbackGate = FeedbackGate()
    accuracy: AccuracyGate = AccuracyGate()
    srm_alpha: float = Field(default=0.001, gt=0, lt=1)
    min_completeness: float = Field(default=0.7, ge=0, le=1)
    #: Judged only for shadow rollouts.
    shadow_agreement: ShadowAgreementGate = ShadowAgreementGate()
    data_quality: DataQualityGate = DataQualityGate()

    def enabled_gates(self) -> tuple[str, ...]:
        names = (*RATE_GATES, "install", "output_shift", "input_drift")
        return tuple(n for n in names if getattr(self, n).enabled)
