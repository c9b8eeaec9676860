"""The agent facade that apps embed and the runner drives: enroll, check in, install, predict.

:class:`Agent` ties the parts together: :class:`~device_agent.trust.TrustedState` (every trust
decision), :class:`~device_agent.fetch.BundleFetcher` and :class:`~device_agent.updater.Updater`
(download and install into slots), the ONNX Runtime models of :mod:`device_agent.runtime`, and
telemetry (:mod:`device_agent.telemetry`, :mod:`device_agent.outbox`). Its state lives under
``state_dir`` (mode 0700; private files 0600); a new Agent on the same directory is the device
after a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

import httpx
import numpy as np

from device_agent.client import FleetClient
from device_agent.config import AgentSettings, DeviceConditions, FileConditions
from device_agent.errors import (
    AgentError,
    ConfigError,
    InputError,
    InstallError,
    UnknownModelError,
)
from device_agent.fetch import BundleFetcher, partial_bundles
from device_agent.fsutil import write_atomic
from device_agent.outbox import Outbox
from device_agent.runtime import LoadedModel, ModelRuntime
from device_agent.shadow import ShadowRunner
from device_agent.shadow_slot import ShadowSlots
from device_agent.slots import SlotStore
from device_agent.telemetry import Recorder, parse_prediction_time
from device_agent.telemetry_upload import UploadResult, upload_pending
from device_agent.trust import TrustedState
from device_agent.updater import Activated, CheckInResult, Updater, checkpoint_for
from firmware_bundles import BundleError, open_bundle, parse_root
from firmware_bundles.messages import (
    Assignment,
    CapabilityReport,
    CheckInRequest,
    InstalledModel,
)

DEVICE_ID_FILE = "device-id"
ROOT_FILE = "root.json"
COUNTERS_FILE = "trust.json"
STATUS_FILE = "agent.json"
OUTBOX_FILE = "outbox.sqlite"
#: A server that serves more rotations than this in one check-in is not followed further (as
#: python-tuf's ``max_root_rotations``).
MAX_ROOT_ROTATIONS = 32
_MAX_ERROR_CHARS = 500


class Agent:
    """One device's agent.

    Thread-safe: the runner calls :meth:`check_in` and :meth:`upload_telemetry` in one thread
    while the local API calls :meth:`predict` in others; predict never waits for a check-in.

    Args:
        settings: Where the server, root and state are, and every limit.
        http: HTTP client (tests hand one with a simulator's transport); one is made if None.
        conditions: Network and power conditions; ``<state_dir>/conditions.json`` if None.
        clock: The current time (UTC); also drives download timers when given.

    Raises:
        ConfigError: If the root file is missing, the target id unknown, or the state dir unusable.
        TrustError: If the pinned root is not self-signed.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        http: httpx.Client | None = None,
        conditions: DeviceConditions | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        if clock is None and settings.test_clock_offset_s:
            offset = timedelta(seconds=settings.test_clock_offset_s)
            clock = lambda: datetime.now(UTC) + offset  # noqa: E731 (tests only, see settings)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=settings.http_timeout_s)
        self._conditions = conditions or FileConditions(self.state_dir / "conditions.json")
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._target = settings.target()
        self.firmware_version = settings.resolved_firmware_version(self._target)
        self._prepare_state_dir()
        self._client = FleetClient(
            self._http, settings.server_url, self.state_dir, settings.http_timeout_s
        )
        self._device_id = self._load_device_id()
        self._slots = SlotStore(self.state_dir)
        self._trusted = self._load_trust()
        self._runtime = ModelRuntime(settings.ort_threads)
        self._active: dict[str, LoadedModel] = {}
        self._outbox = Outbox(self.state_dir / OUTBOX_FILE, settings.outbox_max_bytes)
        self._recorder = Recorder(
            self._outbox,
            self._device_id,
            window_s=settings.telemetry_window_s,
            flush_every=settings.telemetry_flush_every,
            # No wrapper around the default clock: predict reads it on every call.
            clock=None if clock is None else (lambda: self._clock().timestamp()),
            label_max_age_s=settings.label_max_age_s,
            label_clock_skew_s=settings.label_clock_skew_s,
        )
        self._shadow = ShadowRunner(
            self._recorder, queue_size=settings.shadow_queue_size, seed=settings.shadow_seed
        )
        timers: Callable[[], float] = (
            time.monotonic if clock is None else (lambda: self._clock().timestamp())
        )
        self._updater = Updater(
            settings=settings,
            trusted=self._trusted,
            slots=self._slots,
            fetcher=BundleFetcher(
                self._client, settings, monotonic=timers, checkpoint=checkpoint_for(settings)
            ),
            runtime=self._runtime,
            conditions=self._conditions,
            save_counters=self._save_counters,
            on_activated=self._activated,
            on_selftest_failure=self._selftest_failed,
            firmware_version=self.firmware_version,
            clock=self._clock,
        )
        self._updater.note_interrupted(self._slots.recover())
        self._shadows = ShadowSlots(
            self._shadow, self._updater, self._slots, self._runtime, self._model
        )
        for model in self._slots.models():
            # A candidate in a shadow slot keeps running after a restart.
            with contextlib.suppress(AgentError):
                self._shadows.restore(model)

    # -- state on disk ----------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.state_dir, 0o700)
        except OSError as exc:
            raise ConfigError(f"state dir {self.state_dir} is not usable: {exc}") from exc

    def _load_device_id(self) -> str:
        path = self.state_dir / DEVICE_ID_FILE
        with contextlib.suppress(FileNotFoundError):
            stored = path.read_text().strip()
            if self.settings.device_id and stored != self.settings.device_id:
                raise ConfigError(
                    f"state dir {self.state_dir} belongs to device {stored},"
                    f" not {self.settings.device_id}"
                )
            return stored
        device_id = self.settings.device_id or f"{self._target.hardware_id}-{uuid.uuid4().hex[:16]}"
        write_atomic(path, f"{device_id}\n".encode())
        return device_id

    def _load_trust(self) -> TrustedState:
        try:
            pinned = self.settings.root_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"pinned root {self.settings.root_path}: {exc}") from exc
        root_bytes = pinned
        # The state dir keeps the newest root this device rotated to along the signed chain.
        with contextlib.suppress(FileNotFoundError, BundleError):
            rotated = (self.state_dir / ROOT_FILE).read_bytes()
            if parse_root(rotated)[1].version >= parse_root(pinned)[1].version:
                root_bytes = rotated
        counters: bytes | None = None
        with contextlib.suppress(FileNotFoundError):
            counters = (self.state_dir / COUNTERS_FILE).read_bytes()
        trusted = TrustedState.from_bytes(root_bytes, counters, self._clock())
        # An activation may have been recorded in slots.json just before a crash kept the
        # counters file from following: the active slots are the floor too.
        for model in self._slots.models():
            active = self._slots.active(model)
            if active is not None:
                trusted.record_installed(model, active.release_counter)
        return trusted

    def _save_counters(self) -> None:
        write_atomic(self.state_dir / COUNTERS_FILE, self._trusted.counters_to_bytes())

    def _read_status(self) -> dict[str, Any]:
        try:
            data = json.loads((self.state_dir / STATUS_FILE).read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_status(self, **changes: Any) -> None:
        status = {**self._read_status(), **changes}
        write_atomic(self.state_dir / STATUS_FILE, json.dumps(status, sort_keys=True).encode())

    # -- enrollment -------------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        """This device's id (generated once and kept in the state dir, unless set)."""
        return self._device_id

    def capabilities(self) -> CapabilityReport:
        """What this device is and can hold, as sent at enrollment and each check-in."""
        try:
            ort_version: str | None = metadata.version("onnxruntime")
        except metadata.PackageNotFoundError:
            ort_version = None
        target = self._target
        free = (
            self.settings.resolved_free_flash_bytes(target),
            self.settings.resolved_free_ram_bytes(target),
        )
        return CapabilityReport.of_target(
            target, free, self.firmware_version, onnxruntime_version=ort_version
        )

    def enroll(self) -> str:
        """Enroll once with the enrollment token; later calls return at once.

        The credential is kept in ``<state_dir>/credentials.json`` (mode 0600).

        Returns:
            The device id.

        Raises:
            ConfigError: If not enrolled and no ``enroll_token`` is set.
            ServerUnreachable: If the server cannot be reached.
            AuthError: If the token is refused.
            ServerRejected: If the server refuses for another reason (409: id taken).
        """
        with self._lock:
            if self._client.credential() is None:
                if not self.settings.enroll_token:
                    raise ConfigError("not enrolled yet and no enroll_token is set")
                self._client.enroll(
                    self.settings.enroll_token, self._device_id, self.capabilities()
                )
            return self._device_id

    def _credential(self) -> str:
        self.enroll()
        credential = self._client.credential()
        if credential is None:  # enroll() writes it or raises
            raise ConfigError("enrollment left no credential")
        return credential

    # -- check-in ---------------------------------------------------------------------------

    def installed_models(self) -> list[InstalledModel]:
        """Every model's slots and last install outcome, as the next check-in reports them."""
        report = []
        for model in self._slots.models():
            record = self._slots.record(model)
            active = self._slots.active(model)
            last_error = record.last_error[:_MAX_ERROR_CHARS] if record.last_error else None
            report.append(
                InstalledModel.from_dict(
                    {
                        "model": model,
                        "version": active.version if active else None,
                        "bundle_sha256": active.bundle_sha256 if active else None,
                        "release_counter": active.release_counter if active else 0,
                        "active_slot": record.active,
                        "slots": {s: e.get("status", "empty") for s, e in record.slots.items()},
                        "last_install": record.last_install,
                        "last_error": last_error,
                    }
                )
            )
        return report

    def _follow_root_chain(self, now: datetime) -> None:
        for _ in range(MAX_ROOT_ROTATIONS):
            data = self._client.root(self._trusted.root_version + 1)
            if data is None:
                break
            self._trusted.update_root(data, now)
            write_atomic(self.state_dir / ROOT_FILE, self._trusted.root_bytes())
        self._trusted.check_root_expiry(now)

    def check_in(self) -> CheckInResult:
        """One round: follow the root chain, report state with a fresh nonce, verify the
        assignment set, and download, verify, install and self-test what it assigns.

        Install failures (download, verification, self-test) are in the result's ``installs``
        and in the next check-in's report; they do not raise.

        Raises:
            ServerUnreachable: If the server cannot be reached (the agent is offline).
            TrustError: If a root in the chain or the assignment set does not verify (nothing in
                it is acted on). An entry below its model's release counter floor is refused
                alone: it is a ``failed`` install in the result, the other models update.
            AuthError: If the credential is refused.
            ServerRejected: If the server refuses the check-in or answers nonsense.
            ConfigError: If not enrolled and no enrollment token is set.
        """
        with self._lock:
            try:
                return self._check_in()
            except AgentError as exc:
                self._write_status(last_error=f"{type(exc).__name__}: {exc}")
                raise

    def _check_in(self) -> CheckInResult:
        credential = self._credential()
        self._follow_root_chain(self._clock())
        nonce = secrets.token_hex(16)
        request = CheckInRequest(
            device_id=self._device_id,
            nonce=nonce,
            firmware_version=self.firmware_version,
            installed=self.installed_models(),
            capabilities=self.capabilities(),
        )
        answer = self._client.check_in(credential, request)
        counters = self._trusted.counters
        verified = self._trusted.verify_assignments(
            answer,
            device_id=self._device_id,
            hardware_id=self._target.hardware_id,
            nonce=nonce,
            now=self._clock(),
        )
        # A confirmation heard may have raised a floor: durable before anything acts on the set.
        if self._trusted.counters != counters:
            self._save_counters()
        assignments = verified.assignments
        dropped = self._updater.forget_unassigned({a.model: a.bundle_sha256 for a in assignments})
        headers = {"Authorization": f"Bearer {credential}"}
        # A refused entry holds back its own model only: the others still update.
        installs = [self._updater.refuse(a, error) for a, error in verified.refused]
        installs += [
            self._updater.apply(a, base_url=self.settings.server_url, headers=headers)
            for a in assignments
        ]
        installs += self._shadows.apply(
            assignments, base_url=self.settings.server_url, headers=headers
        )
        self._write_status(
            last_check_in=self._clock().isoformat(),
            last_error=None,
            withheld=verified.withheld,
            waiting={r.model: r.detail for r in installs if r.action == "waiting"},
            next_check_in_s=verified.next_check_in_s,
        )
        return CheckInResult(
            device_id=self._device_id,
            root_version=self._trusted.root_version,
            next_check_in_s=verified.next_check_in_s,
            withheld=dict(verified.withheld),
            installs=installs,
            partials_dropped=dropped,
        )

    def _activated(self, activated: Activated) -> None:
        model = activated.info.model
        # Under the load lock, so a predict that is loading the old version cannot put it back
        # after this swap.
        with self._load_lock:
            previous = self._active.pop(model, None)
            if isinstance(activated.loaded, LoadedModel):
                self._active[model] = activated.loaded
        if previous is not None and previous.bundle_sha256 != activated.info.bundle_sha256:
            self._runtime.unload(previous.bundle_sha256)
        if isinstance(activated.loaded, LoadedModel):
            self._shadows.follow(model, activated.loaded)

    def _selftest_failed(self, assignment: Assignment) -> None:
        self._runtime.unload(assignment.bundle_sha256)
        self._recorder.selftest_failure(
            assignment.model, assignment.version, assignment.bundle_sha256
        )

    # -- telemetry --------------------------------------------------------------------------

    def upload_telemetry(self) -> UploadResult:
        """Flush buffered inferences and send every closed window, in batches.

        Raises:
            ServerUnreachable: If offline (windows stay in the outbox).
            AuthError: If the credential is refused.
            ServerRejected: On another refusal.
        """
        with self._lock:
            credential = self._credential()
            self._shadow.drain()
            self._recorder.flush()
            self._recorder.close_due_windows(self._clock().timestamp())
            return upload_pending(
                self._outbox,
                self._client,
                self._device_id,
                credential,
                batch_windows=self.settings.upload_batch_windows,
            )

    def feedback(self, model: str, kind: str) -> None:
        """Count user feedback (``kind``, e.g. ``thumbs_down``) on the active version of
        ``model``.

        Raises:
            UnknownModelError: If no version of ``model`` is active.
            InputError: If ``kind`` is not a short name.
        """
        self._recorder.feedback(self._model(model), kind)

    def label(
        self,
        model: str,
        label: Any,
        predicted: Any = None,
        *,
        predicted_at: datetime | str | None = None,
        version: str | None = None,
    ) -> None:
        """Count a late ground-truth ``label`` against what was ``predicted``, if known.

        With ``predicted_at`` (an ISO 8601 time with its UTC offset, or an aware datetime) and
        ``version`` (the model version that made the prediction) it is counted in that
        version's telemetry window of that time, even after the device switched versions;
        without both, in the active version's current window. Integer class labels are counted
        under their decimal spelling.

        Raises:
            UnknownModelError: If neither form names a version and none of ``model`` is active.
            InputError: If only one of ``predicted_at`` and ``version`` is given; if this device
                never ran ``version``; if ``predicted_at`` is malformed, in the future beyond
                ``label_clock_skew_s`` or older than ``label_max_age_s``; if a label is not a
                short name or not one of the version's classes.
        """
        if predicted_at is None and version is None:
            self._recorder.label(self._model(model), _label(label), _label(predicted))
            return
        if predicted_at is None or version is None:
            missing = "predicted_at" if predicted_at is None else "version"
            raise InputError(
                model,
                missing,
                "predicted_at and version together (or neither, for the current window)",
                "only the other",
            )
        if not isinstance(version, str):
            raise InputError(model, "version", "a version string", repr(version))
        when = parse_prediction_time(model, predicted_at)
        self._recorder.label_prediction(model, version, when, _label(label), _label(predicted))

    # -- inference --------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models with an active slot."""
        return [m for m in self._slots.models() if self._slots.active(m) is not None]

    def _model(self, model: str) -> LoadedModel:
        loaded = self._active.get(model)
        if loaded is not None:
            return loaded
        with self._load_lock:
            loaded = self._active.get(model)
            if loaded is None:
                loaded = self._load_active(model)
                self._active[model] = loaded
        return loaded

    def _load_active(self, model: str) -> LoadedModel:
        try:
            info = self._slots.active(model)
        except InstallError:
            info = None
        if info is None or info.bundle_sha256 is None:
            raise UnknownModelError(model, self.models())
        try:
            data = info.path.read_bytes()
            contents = open_bundle(data, with_bundle_sha256=True)
        except (OSError, BundleError) as exc:
            raise InstallError(f"active bundle of {model} is unreadable: {exc}", model) from exc
        if contents.bundle_sha256 != info.bundle_sha256:
            raise InstallError(f"active bundle of {model} does not match its record", model)
        manifest = contents.manifest
        return self._runtime.load(
            info.bundle_sha256, manifest, bytes(contents.files[manifest.runtime.model_file])
        )

    def predict(self, model: str, inputs: Any) -> dict[str, np.ndarray]:
        """Run the active version of ``model``; works with no network.

        Args:
            model: The model's name.
            inputs: One ndarray or nested lists (single-input models), or a mapping of input
                name to array.

        Raises:
            UnknownModelError: If no version of ``model`` is active.
            InputError: If the inputs do not match the manifest's schema.
        """
        shadow = self._shadow if self._shadow.active(model) else None
        return self._recorder.run(self._model(model), inputs, shadow)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able picture of the agent: identity, models, downloads, outbox, last round."""
        saved = self._read_status()
        models: dict[str, Any] = {}
        for installed in self.installed_models():
            record = self._slots.record(installed.model)
            models[installed.model] = {
                **installed.to_dict(),
                "failed_bundles": dict(record.failed),
                "waiting": saved.get("waiting", {}).get(installed.model),
                "shadow": self._shadow.describe(installed.model),
            }
        for model, reason in saved.get("waiting", {}).items():
            models.setdefault(model, {"model": model, "active_slot": None, "waiting": reason})
        return {
            "device_id": self._device_id,
            "target_id": self._target.hardware_id,
            "enrolled": self._client.credential() is not None,
            "firmware_version": self.firmware_version,
            "root_version": self._trusted.root_version,
            "models": models,
            "downloads": partial_bundles(self.state_dir / "partial"),
            "conditions": {
                "unmetered": self._conditions.unmetered(),
                "charging": self._conditions.charging(),
                "unmetered_only": self.settings.unmetered_only,
                "charging_only": self.settings.charging_only,
            },
            "outbox": self._outbox.stats(),
            "last_check_in": saved.get("last_check_in"),
            "last_error": saved.get("last_error"),
            "withheld": saved.get("withheld", {}),
        }

    def close(self) -> None:
        """Flush buffered telemetry into the outbox and release files and connections."""
        with self._lock:
            self._shadow.close()
            with contextlib.suppress(AgentError):
                self._recorder.close()
            self._outbox.close()
            if self._owns_http:
                self._http.close()


def _label(value: Any) -> Any:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(int(value))
    return value
