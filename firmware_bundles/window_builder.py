"""The one place a :class:`~firmware_bundles.messages.TelemetryWindow` is built and checked.

:class:`TelemetryWindowBuilder` is one open window's counts, mutable while a device aggregates
into it (the agent and the emulated devices both use it); :class:`TelemetryLayout` is what a
bundle's manifest says its windows may hold (histogram names and bin counts, label classes), which
the server checks every window against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Self

from firmware_bundles import telemetry as sketches
from firmware_bundles.manifest import Histogram, Manifest
from firmware_bundles.messages import TelemetryWindow
from firmware_bundles.reference import ReferenceHistograms

#: Name under which a late label is counted when the prediction it corrects is not known.
UNKNOWN_PREDICTION = "unknown"
#: Name under which a refused call is counted when it named none of the model's inputs.
UNKNOWN_INPUT = "unknown"


def histogram_size(histogram: Histogram) -> int:
    """Counts a window carries for ``histogram``: bins plus under/overflow, or categories plus
    unseen."""
    if histogram.kind == "numeric":
        return len(histogram.edges) + 1
    return len(histogram.categories) + 1


def counted_histograms(manifest: Manifest) -> ReferenceHistograms:
    """The histograms a device counts for ``manifest``'s bundle.

    The reference's (:meth:`Manifest.telemetry_histograms`: none when it is detached); without
    reference output histograms, one argmax histogram per float output with class labels (its
    counts here are zeros: it names bins, it is no reference).
    """
    refs = manifest.telemetry_histograms()
    if refs.outputs:
        return refs
    argmax = [
        Histogram(
            name=spec.name,
            kind="categorical",
            categories=spec.class_labels,
            counts=[0] * (len(spec.class_labels) + 1),
        )
        for spec in manifest.outputs
        if spec.class_labels and spec.dtype in ("float32", "float16")
    ]
    return ReferenceHistograms(inputs=refs.inputs, outputs=argmax)


@dataclass(frozen=True)
class TelemetryLayout:
    """What windows of one bundle may hold, from its manifest.

    Attributes:
        model: The manifest's model name.
        version: Its version.
        inputs: Input histogram name -> number of counts.
        outputs: Output histogram name -> number of counts (see :func:`counted_histograms`).
        classes: The label classes (decimal spelling for integer labels), or None when no output
            declares any (then any tally name is a label).
        input_names: The model's input tensors (what refused calls are counted under).
    """

    model: str
    version: str
    inputs: dict[str, int]
    outputs: dict[str, int]
    classes: frozenset[str] | None
    input_names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, manifest: Manifest) -> TelemetryLayout:
        """The layout ``manifest`` gives its windows."""
        counted = counted_histograms(manifest)
        labelled = [str(c) for spec in manifest.outputs for c in spec.class_labels or []]
        return cls(
            model=manifest.name,
            version=manifest.version,
            inputs={h.name: histogram_size(h) for h in counted.inputs},
            outputs={h.name: histogram_size(h) for h in counted.outputs},
            classes=frozenset(labelled) if labelled else None,
            input_names=frozenset(spec.name for spec in manifest.inputs),
        )

    def problems(self, window: TelemetryWindow) -> list[str]:
        """What in ``window`` disagrees with this layout, each naming its field; empty if none."""
        found = []
        if (window.model, window.version) != (self.model, self.version):
            found.append(
                f"field 'model'/'version': {window.model} {window.version}, but the bundle is"
                f" {self.model} {self.version}"
            )
        for kind, expected in (("outputs", self.outputs), ("inputs", self.inputs)):
            for histogram in getattr(window, kind):
                size = expected.get(histogram.name)
                if size is None:
                    found.append(
                        f"field '{kind}': no histogram {histogram.name!r} in the bundle's"
                        f" manifest (it has {sorted(expected)})"
                    )
                elif len(histogram.counts) != size:
                    found.append(
                        f"field '{kind}': histogram {histogram.name!r} has"
                        f" {len(histogram.counts)} counts, the bundle's manifest gives it {size}"
                    )
        if self.classes is not None:
            for predicted, counts in window.labels.items():
                if predicted != UNKNOWN_PREDICTION and predicted not in self.classes:
                    found.append(f"field 'labels': {predicted!r} is not a class of the model")
                found.extend(
                    f"field 'labels.{predicted}': {label!r} is not a class of the model"
                    for label in counts
                    if label not in self.classes
                )
        found.extend(
            f"field 'quality.missing': no input histogram {name!r} in the bundle's manifest"
            f" (it has {sorted(self.inputs)})"
            for name in window.quality.missing
            if name not in self.inputs
        )
        known = self.input_names | {UNKNOWN_INPUT}
        found.extend(
            f"field 'quality.refused': {name!r} is not an input of the model ({sorted(known)})"
            for name in window.quality.refused
            if name not in known
        )
        refused = sum(window.quality.refused.values())
        if refused > window.error_count:
            found.append(
                f"field 'quality.refused': {refused} refused calls, but error_count is"
                f" {window.error_count} (each refused call is an error)"
            )
        return found

    def label_problem(self, label: str) -> str | None:
        """Why ``label`` cannot be counted as a class of this model, or None if it can."""
        if self.classes is None or label in self.classes:
            return None
        return f"one of the model's classes {sorted(self.classes)}"


@dataclass(eq=False)
class TelemetryWindowBuilder:
    """One open window's aggregates, mutable; :meth:`to_dict` and :meth:`to_window` give the
    wire message.

    Errors count as inferences too (``inference_count`` is every call, ``error_count`` those that
    failed); the latency sketch holds one value per successful call.
    """

    device_id: str
    model: str
    version: str
    bundle_sha256: str
    #: Unix seconds of the window's start.
    start: int
    window_s: int
    relative_accuracy: float = sketches.DEFAULT_RELATIVE_ACCURACY
    inference_count: int = 0
    error_count: int = 0
    selftest_failure_count: int = 0
    latency: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    inputs: dict[str, list[int]] = field(default_factory=dict)
    feedback: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Data quality: ``missing`` per input histogram, ``refused`` per input.
    missing: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    #: Per candidate bundle in shadow: its ShadowCounts JSON form.
    shadow: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.latency:
            self.latency = sketches.new_sketch(self.relative_accuracy)

    # -- counting -------------------------------------------------------------------------------

    def count_inference(self, latency_s: float) -> None:
        """Count one successful call that took ``latency_s`` seconds."""
        self.inference_count += 1
        sketches.add(self.latency, latency_s)

    def merge_latency(self, sketch: dict[str, Any], inferences: int) -> None:
        """Count ``inferences`` successful calls whose latencies ``sketch`` holds."""
        self.inference_count += inferences
        sketches.merge(self.latency, sketch)

    def count_error(self, *, self_test: bool = False) -> None:
        """Count a failed call, or a failed self-test."""
        if self_test:
            self.selftest_failure_count += 1
        else:
            self.inference_count += 1
            self.error_count += 1

    def add_counts(
        self, kind: Literal["inputs", "outputs"], name: str, counts: Iterable[int]
    ) -> None:
        """Add ``counts`` to histogram ``name`` of ``kind``."""
        into = self.inputs if kind == "inputs" else self.outputs
        into[name] = sketches.merge_counts(into.get(name, []), counts)

    def count_missing(self, name: str, count: int) -> None:
        """Count ``count`` missing values (NaN, None) of input histogram ``name``."""
        if count:
            self.missing[name] = self.missing.get(name, 0) + count

    def count_refused(self, input_name: str) -> None:
        """Count a call the schema check refused for input ``input_name`` (its error is counted
        by :meth:`count_error`)."""
        self.refused[input_name] = self.refused.get(input_name, 0) + 1

    def count_shadow(
        self,
        version: str,
        bundle_sha256: str,
        *,
        sampled: int = 0,
        dropped: int = 0,
        errors: int = 0,
        compared: int = 0,
        agreed: int = 0,
        latency: dict[str, Any] | None = None,
    ) -> None:
        """Add a candidate's shadow counts (and its latency sketch of the ``compared`` calls)."""
        entry = self.shadow.get(bundle_sha256)
        if entry is None:
            entry = self.shadow[bundle_sha256] = {
                "version": version,
                "bundle_sha256": bundle_sha256,
                "sampled": 0,
                "dropped": 0,
                "compared": 0,
                "agreed": 0,
                "errors": 0,
                "latency": sketches.new_sketch(self.relative_accuracy),
            }
        entry["sampled"] += sampled
        entry["dropped"] += dropped
        entry["errors"] += errors
        entry["compared"] += compared
        entry["agreed"] += agreed
        if latency is not None:
            sketches.merge(entry["latency"], latency)

    def count_feedback(self, kind: str) -> None:
        """Count one piece of user feedback of ``kind``."""
        self.feedback[kind] = self.feedback.get(kind, 0) + 1

    def count_label(self, label: str, predicted: str | None = None) -> None:
        """Count a late ground-truth ``label`` against the ``predicted`` class, if known."""
        counts = self.labels.setdefault(UNKNOWN_PREDICTION if predicted is None else predicted, {})
        counts[label] = counts.get(label, 0) + 1

    # -- the message -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The window's JSON form, not validated (cheap enough to run at every flush)."""
        return {
            "device_id": self.device_id,
            "model": self.model,
            "version": self.version,
            "bundle_sha256": self.bundle_sha256,
            "window_start": datetime.fromtimestamp(self.start, tz=UTC).isoformat(),
            "window_s": self.window_s,
            "inference_count": self.inference_count,
            "error_count": self.error_count,
            "selftest_failure_count": self.selftest_failure_count,
            "latency": self.latency,
            "outputs": [{"name": k, "counts": v} for k, v in self.outputs.items()],
            "inputs": [{"name": k, "counts": v} for k, v in self.inputs.items()],
            "feedback": self.feedback,
            "labels": self.labels,
            **(
                {"quality": {"missing": self.missing, "refused": self.refused}}
                if self.missing or self.refused
                else {}
            ),
            **({"shadow": list(self.shadow.values())} if self.shadow else {}),
        }

    def to_window(self) -> TelemetryWindow:
        """The validated message.

        Raises:
            SchemaError: If a count or the sketch is out of range.
        """
        return TelemetryWindow.from_dict(self.to_dict())

    @classmethod
    def from_window(cls, window: TelemetryWindow) -> Self:
        """A builder that continues ``window``."""
        latency = window.latency.to_dict()
        latency["bins"] = {str(k): v for k, v in window.latency.bins.items()}
        return cls(
            device_id=window.device_id,
            model=window.model,
            version=window.version,
            bundle_sha256=window.bundle_sha256,
            start=int(window.window_start.timestamp()),
            window_s=window.window_s,
            relative_accuracy=window.latency.relative_accuracy,
            inference_count=window.inference_count,
            error_count=window.error_count,
            selftest_failure_count=window.selftest_failure_count,
            latency=latency,
            outputs={h.name: list(h.counts) for h in window.outputs},
            inputs={h.name: list(h.counts) for h in window.inputs},
            feedback=dict(window.feedback),
            labels={k: dict(v) for k, v in window.labels.items()},
            missing=dict(window.quality.missing),
            refused=dict(window.quality.refused),
            shadow={s.bundle_sha256: _shadow_dict(s.to_dict()) for s in window.shadow},
        )


def _shadow_dict(entry: dict[str, Any]) -> dict[str, Any]:
    # JSON object keys: the sketch's integer bucket keys as strings, as the builder keeps them.
    entry["latency"]["bins"] = {str(k): v for k, v in entry["latency"]["bins"].items()}
    return entry
