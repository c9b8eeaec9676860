"""Per-target choice of a model variant: fit the target's limits and the accuracy budget.

For each target, a variant is kept only if its bundle fits the byte budget, its RAM estimate the
arena, its ops the op list, its precision and format the target's, and its quality the budget;
of those, the smallest wins (ties: the fastest). Every rejected variant keeps its reasons, so a
target that nothing fits fails with a reason per variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from firmware_bundles.catalogue import DeviceTarget

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class VariantFacts:
    """What the fitting step needs to know about one variant (machine-independent, but latency).

    Attributes:
        name: Variant name, e.g. ``int8-static-per-channel-minmax``.
        scheme: Manifest quantisation scheme (``float32``, ``fp16``, ``int8-dynamic``,
            ``int8-static``).
        precision: Arithmetic precision (``float32``, ``float16``, ``int8``).
        model_bytes: Size of the model file in the target's format.
        op_types: ONNX op types the graph uses.
        ram_bytes: Peak RAM estimate.
        metric: Accuracy (classification) or mean absolute error (regression) on eval data.
        latency_s: Single-sample latency on this machine; only breaks ties, never recorded.
        same_as_float: True when quantisation left the graph unchanged (nothing was quantised).
    """

    name: str
    scheme: str
    precision: str
    model_bytes: int
    op_types: tuple[str, ...]
    ram_bytes: int
    metric: float
    latency_s: float = 0.0
    same_as_float: bool = False


@dataclass
class TargetChoice:
    """The outcome for one target: a chosen variant, or none and why."""

    hardware_id: str
    chosen: VariantFacts | None
    rejected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.chosen is not None

    def reason(self) -> str:
        """One line per rejected variant, for error messages and reports."""
        return "; ".join(f"{name}: {', '.join(r)}" for name, r in self.rejected.items())


def quality_loss(task: Task, float_metric: float, metric: float) -> float:
    """Loss against the float model, as a fraction on the budget's scale.

    Classification: accuracy points lost (0.01 is one point). Regression: relative increase of
    mean absolute error (0.01 is 1%).
    """
    if task == "classification":
        return float_metric - metric
    if float_metric == 0.0:
        return 0.0 if metric == 0.0 else float("inf")
    return (metric - float_metric) / float_metric


def describe_loss(task: Task, loss: float) -> str:
    """Human wording of a quality loss."""
    if task == "classification":
        return f"{-loss * 100:+.1f} points"
    return f"MAE {loss * 100:+.1f}%"


def misfit_reasons(
    target: DeviceTarget,
    variant: VariantFacts,
    *,
    task: Task,
    float_metric: float,
    budget: float,
    bundle_overhead_bytes: int,
) -> list[str]:
    """Every reason ``variant`` cannot be chosen for ``target``; empty if it can."""
    reasons: list[str] = []
    size = variant.model_bytes + bundle_overhead_bytes
    if size > target.max_bundle_bytes:
        reasons.append(f"too big by {size - target.max_bundle_bytes} bytes")
    if variant.ram_bytes > target.ram_arena_bytes:
        reasons.append(
            f"needs {variant.ram_bytes} bytes of RAM, {variant.ram_bytes - target.ram_arena_bytes}"
            " over the arena"
        )
    bad_ops = [op for op in variant.op_types if not target.allows_op(op)]
    if bad_ops:
        reasons.append(f"op {', '.join(bad_ops)} not allowed")
    if variant.precision not in target.precisions:
        reasons.append(f"precision {variant.precision} not supported")
    loss = quality_loss(task, float_metric, variant.metric)
    if loss > budget + 1e-12:
        reasons.append(f"{describe_loss(task, loss)}, over the budget")
    return reasons


def choose(
    target: DeviceTarget,
    variants: list[VariantFacts],
    *,
    task: Task,
    float_metric: float,
    budget: float,
    bundle_overhead_bytes: int,
) -> TargetChoice:
    """Pick the smallest variant that fits ``target`` and the budget (ties: see :func:`_smallest`).

    A variant whose quantisation changed nothing (``same_as_float``) is skipped in favour of the
    float model itself so that nothing is ever called quantised that is not.
    """
    choice = TargetChoice(hardware_id=target.hardware_id, chosen=None)
    fitting: list[VariantFacts] = []
    for variant in variants:
        if variant.same_as_float:
            choice.rejected[variant.name] = ["quantisation changed nothing; same as float32"]
            continue
        reasons = misfit_reasons(
            target,
            variant,
            task=task,
            float_metric=float_metric,
            budget=budget,
            bundle_overhead_bytes=bundle_overhead_bytes,
        )
        if reasons:
            choice.rejected[variant.name] = reasons
        else:
            fitting.append(variant)
    if fitting:
        choice.chosen = _smallest(fitting, lambda v: quality_loss(task, float_metric, v.metric))
    return choice


#: A tie in size goes to the fastest variant only when it is at least this much faster than every
#: other; closer timings are noise on a shared machine and would make bundles irreproducible.
LATENCY_TIE_RATIO = 1.5


def _smallest(fitting: list[VariantFacts], loss: Callable[[VariantFacts], float]) -> VariantFacts:
    """The smallest variant; among equal sizes the clearly fastest, else the least ``loss``, then
    the first by name (the choice decides the bundle's bytes, so it must not follow jitter)."""
    size = min(v.model_bytes for v in fitting)
    tied = sorted((v for v in fitting if v.model_bytes == size), key=lambda v: (loss(v), v.name))
    fastest = min(tied, key=lambda v: v.latency_s)
    others = [v for v in tied if v is not fastest]
    if all(fastest.latency_s * LATENCY_TIE_RATIO <= v.latency_s for v in others):
        return fastest
    return tied[0]
