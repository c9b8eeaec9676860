"""What telemetry keeps between flushes: buffers of a model's recent inferences, and the
aggregates of open windows.

:class:`InferenceTape` holds preallocated numpy buffers that the hot path copies one row into per
call; :class:`WindowAggregate` is one window's counts (the shared
:class:`~firmware_bundles.window_builder.TelemetryWindowBuilder`), mutable while it is open and
stored as canonical :class:`~firmware_bundles.messages.TelemetryWindow` JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.histograms import TelemetryPlan
from device_agent.runtime import LoadedModel, ModelIdentity
from firmware_bundles.messages import TelemetryWindow
from firmware_bundles.signing import canonical_json
from firmware_bundles.window_builder import TelemetryWindowBuilder

_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
    "string": object,
}


@dataclass(eq=False)
class WindowAggregate(TelemetryWindowBuilder):
    """One open window of the recorder: the shared window builder, and the outbox row it is
    stored in (None until first written)."""

    row_id: int | None = None

    @classmethod
    def open(
        cls, device_id: str, identity: ModelIdentity, start: int, window_s: int
    ) -> WindowAggregate:
        """A new, empty window of ``identity`` starting at ``start`` (Unix seconds)."""
        return cls(
            device_id, identity.name, identity.version, identity.bundle_sha256, start, window_s
        )

    @classmethod
    def from_body(cls, row_id: int, body: bytes) -> WindowAggregate:
        """The window stored in outbox row ``row_id``.

        Raises:
            SchemaError: If the stored body is not a valid window.
        """
        window = cls.from_window(TelemetryWindow.from_bytes(body))
        window.row_id = row_id
        return window

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.model, self.version, self.bundle_sha256)

    def body(self) -> bytes:
        """Canonical TelemetryWindow JSON. Not validated here (this runs every flush, and every
        field is ours); the outbox validates each window when it builds a batch."""
        return canonical_json(self.to_dict())


class InferenceTape:
    """Preallocated buffers of one model version's recent inferences."""

    def __init__(self, model: LoadedModel, capacity: int) -> None:
        self.identity = model.identity
        self.plan = TelemetryPlan.from_manifest(model.manifest)
        self.input_groups = tuple(self.plan.by_input().items())
        self.capacity = capacity
        self.n = 0
        # Lists: appending an int or float is cheaper than a numpy item assignment.
        self.latency_ns: list[int] = []
        self.when: list[float] = []
        #: Failed calls: (when, the input a refused call named, or None).
        self.errors: list[tuple[float, str | None]] = []
        self.idle_flushes = 0
        #: Set when the recorder let go of this tape; a caller holding it must get the live one.
        self.released = False
        #: Calls that did not fit the buffers (batches, dynamic shapes): (when, ns, ins, outs).
        self.overflow: list[tuple[float, int, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self.output_index = {name: i for i, name in enumerate(model.output_names)}
        specs = {s.name: s for s in (*model.manifest.inputs, *model.manifest.outputs)}
        self.fast_inputs = tuple(
            (name, *self._buffer(specs[name].shape, specs[name].dtype))
            for name in sorted(self.plan.input_names())
        )
        self.fast_outputs = tuple(
            (self.output_index[name], *self._buffer(specs[name].shape, specs[name].dtype))
            for name in sorted(self.plan.output_names())
            if name in self.output_index
        )
        self.fits = all(b is not None for _, b, _ in (*self.fast_inputs, *self.fast_outputs))
        if self.fits and len(self.fast_inputs) == 1 and len(self.fast_outputs) == 1:
            # The usual model (one input, one output histogrammed): no loops per call.
            self._in_name, self._in_buffer, self._in_row = self.fast_inputs[0]
            self._out_index, self._out_buffer, self._out_row = self.fast_outputs[0]
            self.append = self._append_one  # type: ignore[method-assign]

    def _buffer(self, shape: list[int | None], dtype: str) -> tuple[Any, tuple[int, ...]]:
        """A buffer for single-row calls, and the shape such a call has; None for shapes that
        vary beyond the batch axis (those calls go to ``overflow``)."""
        if any(d is None for d in shape[1:]):
            return None, ()
        row = tuple(1 if d is None else d for d in shape)
        return np.zeros((self.capacity, *row), dtype=_NP_DTYPES[dtype]), row

    def _append_one(self, when: float, latency_ns: int, feed: Any, outs: list[Any]) -> bool:
        value, output = feed[self._in_name], outs[self._out_index]
        if value.shape != self._in_row or output.shape != self._out_row:
            return self._overflow(when, latency_ns, feed, outs)
        i = self.n
        self._in_buffer[i] = value
        self._out_buffer[i] = output
        self.latency_ns.append(latency_ns)
        self.when.append(when)
        self.n = i = i + 1
        return i == self.capacity

    def append(self, when: float, latency_ns: int, feed: Any, outs: list[Any]) -> bool:
        """Record one successful call; True when the buffers are full."""
        i = self.n
        if self.fits:
            for name, buffer, row in self.fast_inputs:
                value = feed[name]
                if value.shape != row:
                    return self._overflow(when, latency_ns, feed, outs)
                buffer[i] = value
            for index, buffer, row in self.fast_outputs:
                value = outs[index]
                if value.shape != row:
                    return self._overflow(when, latency_ns, feed, outs)
                buffer[i] = value
        else:
            return self._overflow(when, latency_ns, feed, outs)
        self.latency_ns.append(latency_ns)
        self.when.append(when)
        self.n = i + 1
        return self.n == self.capacity

    def _overflow(self, when: float, latency_ns: int, feed: Any, outs: list[Any]) -> bool:
        ins = {h.input: np.array(feed[h.input]) for h in self.plan.inputs}
        got = {
            h.output: np.array(outs[self.output_index[h.output]])
            for h in self.plan.outputs
            if h.output in self.output_index
        }
        self.overflow.append((when, latency_ns, ins, got))
        return len(self.overflow) >= self.capacity
