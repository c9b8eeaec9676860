"""The checks the rig runs for one bundle on one device: install, evaluation, injected faults.

Each step appends named checks with their figures to a :class:`~hil.report.DeviceRun`; a step
whose prerequisite failed is not run. Faults re-install the same bundle into the other slot so
the device always has a known model to fall back to.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.errors import InputError
from device_agent.link import (
    DeviceClient,
    DeviceRejected,
    Disconnected,
    LinkError,
    ModelRc,
    UploadMismatch,
)
from device_agent.link import model_group as mg
from device_agent.runtime import ModelRuntime
from firmware_bundles import (
    BundleContents,
    BundleError,
    Manifest,
    TargetCatalogue,
    open_bundle,
    verify,
)
from firmware_bundles.manifest import SelfTestFile
from firmware_bundles.root import Root
from hil.director import LabDirector
from hil.errors import Refusal
from hil.faults import FaultyLink
from hil.report import Check, DeviceRun
from hil.targets import DeviceUnderTest
from hil.tflm_runtime import TflmRuntime


@dataclass(frozen=True)
class Limits:
    """What the evaluation's figures must meet."""

    max_samples: int
    latency_p95_max_ms: float
    accuracy_drop_max: float


@dataclass
class BundleOnDevice:
    """Runs one bundle's checks on one connected device."""

    dut: DeviceUnderTest
    bundle: bytes
    identity: mg.IdentityResponse
    director: LabDirector
    root: Root
    catalogue: TargetCatalogue
    limits: Limits
    rng: random.Random
    work_dir: Path

    @property
    def manifest(self) -> Manifest:
        return open_bundle(self.bundle).manifest

    async def client(self) -> DeviceClient:
        return self.dut.client if self.dut.client is not None else await self.dut.connect()

    # --- install ------------------------------------------------------------------------

    def check_bundle(self, run: DeviceRun) -> bool:
        """The bundle's release signatures, files and fit for the device's target."""
        try:
            verify(
                self.bundle,
                self.root,
                hardware_id=self.identity.hardware_id,
                catalogue=self.catalogue,
            )
        except BundleError as exc:
            run.add(Check("bundle-verified", "fail", len(self.bundle), "bytes", detail=str(exc)))
            return False
        run.add(Check("bundle-verified", "pass", len(self.bundle), "bytes"))
        return True

    async def install(self, run: DeviceRun) -> bool:
        """Upload, activate and self-test, each a check."""
        client = await self.client()
        try:
            identity = await client.identity()
            uploaded = await client.upload_model(self.bundle)
        except LinkError as exc:
            run.add(Check("upload", "fail", detail=str(exc)))
            return False
        ceiling = self.dut.ceiling_bytes_per_s
        share = f"{uploaded.throughput_bytes_per_s / ceiling:.0%} of the link's" if ceiling else ""
        run.add(
            Check(
                "upload",
                "pass",
                round(uploaded.throughput_bytes_per_s),
                "B/s",
                detail=f"{uploaded.length} bytes in {uploaded.requests} requests, window"
                f" {uploaded.window}; {share} {ceiling:,.0f} B/s ceiling".strip()
                if ceiling
                else f"{uploaded.length} bytes in {uploaded.requests} requests",
            )
        )
        try:
            activated = await client.activate(self.director.assign(identity, [self.bundle]))
            run.add(Check("activate", "pass", activated.slot, "slot", detail=activated.state))
        except LinkError as exc:
            run.add(Check("activate", "fail", detail=str(exc)))
            return False
        try:
            tested = await client.self_test()
        except LinkError as exc:
            run.add(Check("self-test", "fail", detail=str(exc)))
            return False
        tolerance = self.manifest.self_test.tolerance
        run.add(
            Check(
                "self-test",
                "pass",
                tested.worst_error,
                "abs error",
                f"<= {tolerance:g}",
                f"{tested.vectors} vectors",
            )
        )
        return True

    # --- evaluation ---------------------------------------------------------------------

    async def evaluate(self, run: DeviceRun, x: np.ndarray, y: np.ndarray | None) -> None:
        """Held-out data through the device against the host's reference, then telemetry."""
        manifest = self.manifest
        contents = open_bundle(self.bundle)
        model = bytes(contents.files[manifest.runtime.model_file])
        host = _host_reference(manifest, model)
        spec = manifest.inputs[0]
        client = await self.client()
        worst, latencies, arena, predicted = 0.0, [], 0, []
        samples = x[: self.limits.max_samples]
        try:
            for row in samples:
                inputs = {spec.name: np.asarray(row[None, ...], dtype=spec.dtype)}
                got = await client.infer(inputs)
                want = host.run(inputs)
                for name, value in want.items():
                    diff = np.abs(got.outputs[name].astype(np.float64) - value.astype(np.float64))
                    worst = max(worst, float(diff.max()) if diff.size else 0.0)
                latencies.append(got.latency_us / 1000)
                arena = max(arena, got.arena_bytes)
                predicted.append(int(np.argmax(got.outputs[manifest.outputs[0].name])))
        except (LinkError, InputError, KeyError, Refusal) as exc:
            run.add(Check("parity", "fail", detail=f"held-out data did not run: {exc}"))
            return
        # The same .tflite in TFLM on the host must give the device's outputs exactly; an
        # ONNX bundle is held to the manifest's tolerance against ONNX Runtime on the host.
        tolerance = 0.0 if host.exact else manifest.self_test.tolerance
        run.add(
            Check(
                "parity",
                "pass" if worst <= tolerance else "fail",
                worst,
                "abs error",
                f"<= {tolerance:g}",
                f"{len(samples)} samples against {host.name} on the host",
            )
        )
        float_runs = await self._float_original(run, client, manifest, contents)
        if float_runs is None:
            return
        self._accuracy(run, manifest, predicted, y)
        p95 = round(float(np.percentile(latencies, 95)), 4)
        limit = self.limits.latency_p95_max_ms
        run.add(
            Check("latency-p95", "pass" if p95 <= limit else "fail", p95, "ms", f"<= {limit:g}")
        )
        budget = self.identity.ram_arena_bytes
        run.add(
            Check(
                "peak-memory",
                "pass" if arena <= budget else "fail",
                arena,
                "bytes",
                f"<= {budget}",
                self._runtime_named(),
            )
        )
        await self._telemetry(run, client, len(samples) + float_runs)

    async def _float_original(
        self, run: DeviceRun, client: DeviceClient, manifest: Manifest, contents: BundleContents
    ) -> int | None:
        """The device's outputs on the self-test inputs against the float original's.

        The bundle carries the original (pre-export, pre-quantisation) model's outputs for its
        self-test inputs; the device must stay within the manifest's ``float_tolerance`` of
        them. A bundle without them (format 1, or built without) skips the check.

        Returns:
            How many inferences it ran on the device (telemetry counts them), None if they
            did not run.
        """
        test = contents.manifest.self_test
        if not isinstance(test, SelfTestFile) or test.float_tolerance is None:
            run.add(Check("float-original", "skip", detail="the bundle carries no float outputs"))
            return 0
        spec = manifest.inputs[0]
        worst = 0.0
        try:
            for vector, floats in zip(test.vectors, test.float_vectors, strict=True):
                inputs = {k: np.asarray(v, dtype=spec.dtype) for k, v in vector.inputs.items()}
                got = await client.infer(inputs)
                for name, value in floats.items():
                    diff = np.abs(got.outputs[name].astype(np.float64) - np.asarray(value))
                    worst = max(worst, float(diff.max()) if diff.size else 0.0)
        except (LinkError, InputError, KeyError) as exc:
            run.add(Check("float-original", "fail", detail=f"self-test inputs did not run: {exc}"))
            return None
        run.add(
            Check(
                "float-original",
                "pass" if worst <= test.float_tolerance else "fail",
                worst,
                "abs error",
                f"<= {test.float_tolerance:g}",
                f"{test.count} self-test inputs against the float original's outputs in the"
                f" bundle (precision {manifest.runtime.precision})",
            )
        )
        return test.count

    def _runtime_named(self) -> str:
        """The device's runtime, version and arena kind, as an emulated device reports it."""
        if self.dut.emulated is None:
            return "tensor arena the device reported"
        running = self.dut.call(lambda d: d.store.running)
        if running is None:
            return "tensor arena"
        runtime = running.runtime
        kind = "measured" if runtime.name == "TFLM" else "planned"
        return f"runtime {runtime.name} {runtime.version}; arena {kind} by the runtime"

    def _accuracy(
        self, run: DeviceRun, manifest: Manifest, predicted: list[int], y: np.ndarray | None
    ) -> None:
        if y is None or manifest.task != "classification":
            return
        labels = np.asarray(y[: len(predicted)]).astype(np.int64)
        correct = int((np.asarray(predicted) == labels).sum())
        accuracy = correct / len(labels)
        claimed = manifest.metrics.get("accuracy")
        if claimed is None:
            run.add(Check("accuracy", "pass", accuracy, detail="the manifest claims none"))
            return
        floor = claimed - self.limits.accuracy_drop_max
        # A few hundred samples cannot pin accuracy to a point: fail only when even the upper
        # end of the 95% (Wilson) interval falls below the floor.
        upper = _wilson_upper(correct, len(labels))
        run.add(
            Check(
                "accuracy",
                "pass" if upper >= floor else "fail",
                accuracy,
                "",
                f"95% upper bound >= {floor:.4g}",
                f"manifest claims {claimed:.4g}; {len(labels)} samples, upper bound {upper:.4g}",
            )
        )

    async def _telemetry(self, run: DeviceRun, client: DeviceClient, expected: int) -> None:
        try:
            read = await client.read_telemetry()
            counted = sum(w.inference_count for _, w in read.windows)
            if read.windows:
                await client.ack_telemetry(read.windows[-1][0])
        except LinkError as exc:
            run.add(Check("telemetry", "fail", detail=str(exc)))
            return
        run.add(
            Check(
                "telemetry",
                "pass" if counted >= expected else "fail",
                counted,
                "inferences",
                f">= {expected}",
                f"{len(read.windows)} window pieces",
            )
        )

    # --- faults -------------------------------------------------------------------------

    async def fault_disconnect(self, run: DeviceRun) -> None:
        """Drop the link at a random acknowledged offset; the upload must resume there."""
        cut = self.rng.randrange(max(1, len(self.bundle) // 10), max(2, len(self.bundle) * 6 // 10))
        await self.dut.disconnect()
        self.dut.wrap = lambda link: FaultyLink(link, cut_at_offset=cut, on_cut=self.dut.drop)
        try:
            client = await self.dut.connect()
            await client.upload_model(self.bundle)
            run.add(Check("fault:disconnect", "fail", detail="the injected disconnect never fired"))
            return
        except Disconnected:
            pass
        finally:
            self.dut.wrap = None
        client = await self.dut.connect()
        staged = (await client.slots()).slots
        device_off = max(
            (s.off or (s.len or 0) if s.state in ("uploading", "uploaded") else 0) for s in staged
        )
        resumed = await client.upload_model(self.bundle)
        # Finish the install, so the next fault starts with nothing staged.
        identity = await client.identity()
        await client.activate(self.director.assign(identity, [self.bundle]))
        await client.self_test()
        ok = 0 < resumed.resumed_from == device_off
        run.add(
            Check(
                "fault:disconnect",
                "pass" if ok else "fail",
                resumed.resumed_from,
                "bytes",
                "> 0, = device offset",
                f"cut once {cut}+ bytes were acknowledged; device held {device_off}; the"
                " resumed install activated and passed its self-test",
            )
        )

    async def fault_bitflip(self, run: DeviceRun) -> None:
        """Flip one bit of the bundle in transit; the device must refuse to activate it."""
        where = self.rng.randrange(len(self.bundle))
        await self.dut.disconnect()
        self.dut.wrap = lambda link: FaultyLink(link, flip_bit_at=where)
        try:
            client = await self.dut.connect()
            identity = await client.identity()
            try:
                await client.upload_model(self.bundle)
                detected = "no"
            except UploadMismatch:
                detected = "upload"
            try:
                await client.activate(self.director.assign(identity, [self.bundle]))
                refused = "activated"
            except DeviceRejected as exc:
                refused = exc.rc_name
        finally:
            self.dut.wrap = None
        ok = detected == "upload" and refused == ModelRc.HASH_MISMATCH.name
        run.add(
            Check(
                "fault:bitflip",
                "pass" if ok else "fail",
                where,
                "byte offset",
                "upload mismatch and HASH_MISMATCH",
                f"upload: {detected}; activate: {refused}",
            )
        )

    async def fault_power_cut(self, run: DeviceRun, probe: np.ndarray) -> None:
        """Cut power at a random flash write of an install; the old model must still answer."""
        if self.dut.emulated is None:
            run.add(Check("fault:power-cut", "skip", detail="needs an emulated device"))
            return
        spec = self.manifest.inputs[0]
        inputs = {spec.name: np.asarray(probe[None, ...], dtype=spec.dtype)}
        await self.dut.disconnect()
        await self.dut.restart()
        snapshot = self.work_dir / f"{self.identity.device_id}.before-power-cut"
        flash_file = self.dut.call(lambda d: d.flash.path)
        self.dut.call(lambda d: shutil.copyfile(d.flash.path, snapshot))
        client = await self.dut.connect()
        before = (await client.slots(), await client.infer(inputs))
        # A clean install from this state counts the flash writes an install takes.
        start = self.dut.call(lambda d: d.flash.operations)
        if not await self.install(DeviceRun(run.spec)):
            run.add(Check("fault:power-cut", "fail", detail="the clean install failed"))
            return
        writes = self.dut.call(lambda d: d.flash.operations) - start
        await self.dut.disconnect()
        self.dut.call(lambda d: shutil.copyfile(snapshot, flash_file))
        await self.dut.restart()
        cut = self.rng.randint(1, writes)
        self.dut.call(lambda d: d.cut_power_at(cut))
        # install() reports link failures as failed checks; the device going silent is the point.
        await self.install(DeviceRun(run.spec))
        died = not self.dut.call(lambda d: d.alive)
        await self.dut.drop()
        await self.dut.restart()
        client = await self.dut.connect()
        after = (await client.slots(), await client.infer(inputs))
        same_slot = after[0].active == before[0].active and after[0].confirmed
        same_model = all(
            np.array_equal(after[1].outputs[k], v) for k, v in before[1].outputs.items()
        )
        ok = died and same_slot and same_model
        run.add(
            Check(
                "fault:power-cut",
                "pass" if ok else "fail",
                f"write {cut} of {writes}",
                "",
                "old model answers after restart",
                f"power cut {'happened' if died else 'never happened'}; active slot"
                f" {before[0].active} -> {after[0].active}; outputs"
                f" {'unchanged' if same_model else 'changed'}",
            )
        )


class _HostReference:
    """The bundle's model on the host: TFLM for ``.tflite`` (exact), else ONNX Runtime."""

    def __init__(self, manifest: Manifest, model: bytes) -> None:
        self.exact = manifest.runtime.format == "tflite"
        if self.exact:
            self._tflm: TflmRuntime | None = TflmRuntime(manifest, model, 1 << 24)
            self.name = f"TFLM {self._tflm.version}"
        else:
            self._tflm = None
            self._ort = ModelRuntime().load("reference", manifest, model)
            self.name = "ONNX Runtime"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._tflm is not None:
            return self._tflm.run(inputs)[0]
        return self._ort.run(inputs)


def _host_reference(manifest: Manifest, model: bytes) -> _HostReference:
    return _HostReference(manifest, model)


def _wilson_upper(successes: int, n: int, z: float = 1.96) -> float:
    """Upper end of the Wilson score interval of a proportion."""
    if n == 0:
        return 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))
