"""Install orchestration: from verified assignments to an active, self-tested model.

For each assignment the :class:`Updater` decides whether anything is to do, fetches the bundle
(resuming a partial; waiting while the download conditions are unmet), has
:class:`~device_agent.trust.TrustedState` verify it, writes it to the inactive slot, fsyncs,
switches to a trial, runs the manifest's self-test through the runtime, and activates or reverts.
The outcome lands in the model's slot record, which the next check-in reports.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from device_agent.client import resolve_url
from device_agent.config import AgentSettings, DeviceConditions
from device_agent.errors import (
    AgentError,
    DownloadError,
    InstallError,
    SelfTestError,
    ServerError,
    ServerUnreachable,
    TrustError,
)
from device_agent.fetch import (
    BundleFetcher,
    discard_partial,
    partial_bundles,
    partial_path,
)
from device_agent.slots import SlotInfo, SlotName, SlotStore
from device_agent.trust import TrustedState
from firmware_bundles import VerifiedBundle
from firmware_bundles.manifest import Manifest
from firmware_bundles.messages import Assignment

InstallAction = Literal["current", "installed", "waiting", "skipped", "failed"]


class SelfTestOutcome(Protocol):
    """What the runtime's self-test reports (``device_agent.runtime.SelfTestResult``)."""

    @property
    def passed(self) -> bool: ...

    @property
    def detail(self) -> str: ...


class LoadedModelLike(Protocol):
    """A model loaded in the runtime (``device_agent.runtime.LoadedModel``)."""

    def run(self, inputs: Any) -> Mapping[str, Any]: ...

    def self_test(self, manifest: Manifest) -> SelfTestOutcome: ...


class RuntimeLike(Protocol):
    """The inference runtime (``device_agent.runtime.ModelRuntime``)."""

    def load(self, key: str, manifest: Manifest, model_bytes: bytes) -> LoadedModelLike: ...


@dataclass
class InstallReport:
    """What one check-in did about one model.

    Attributes:
        model: The model.
        action: ``current`` (already active), ``installed``, ``waiting`` (download conditions
            unmet), ``skipped`` (this bundle failed before and is still assigned), ``failed``.
        version: The assigned version.
        bundle_sha256: The assigned bundle.
        detail: Why, in words.
        error: The error behind a ``failed``, if any.
    """

    model: str
    action: InstallAction
    version: str | None = None
    bundle_sha256: str | None = None
    detail: str = ""
    error: AgentError | None = field(default=None, compare=False)


@dataclass
class CheckInResult:
    """What one check-in round did.

    Attributes:
        device_id: This device.
        root_version: The trusted root's version after following the chain.
        next_check_in_s: When the server asks to hear from the device again.
        withheld: Models the server has for this device but does not assign, and why.
        installs: One report per assigned model.
        partials_dropped: Partial downloads dropped because their bundle is no longer assigned.
    """

    device_id: str
    root_version: int
    next_check_in_s: int
    withheld: dict[str, str] = field(default_factory=dict)
    installs: list[InstallReport] = field(default_factory=list)
    partials_dropped: list[str] = field(default_factory=list)

    @property
    def errors(self) -> dict[str, AgentError]:
        """Model -> the error of each install that failed."""
        return {r.model: r.error for r in self.installs if r.error is not None}

    def raise_for_errors(self) -> None:
        """Raise the first install error, if any (for callers that want exceptions)."""
        for report in self.installs:
            if report.error is not None:
                raise report.error


def pause_forever(state_dir: Path, step: str) -> None:
    """The ``test_pause_at`` crash-test hook: say where, then sleep until killed."""
    marker = state_dir / f"paused-at-{step}"
    marker.write_text(f"{os.getpid()}\n")
    while True:
        time.sleep(3600)


def checkpoint_for(settings: AgentSettings) -> Callable[[str], None]:
    """The crash-test hook for ``settings``: freezes at the step ``test_pause_at`` names."""

    def checkpoint(step: str) -> None:
        if settings.test_pause_at == step:
            pause_forever(settings.state_dir, step)

    return checkpoint


@dataclass
class Activated:
    """A model just activated, for the agent's predict cache."""

    info: SlotInfo
    manifest: Manifest
    loaded: LoadedModelLike


class Updater:
    """Applies verified assignments to the slots.

    Args:
        settings: Limits and the crash-test hook.
        trusted: Makes the trust decisions on the downloaded bytes.
        slots: The slot store.
        fetcher: Downloads bundles.
        runtime: Loads models and runs self-tests.
        conditions: Network and power conditions for downloads.
        save_counters: Persists ``trusted``'s release counters after an activation.
        on_activated: Told about each activation (the agent swaps its predict cache).
        on_selftest_failure: Told about each failed self-test (telemetry counts it).
        firmware_version: This device's firmware, checked against the bundle's range.
        clock: The current time, for expiry checks.
    """

    def __init__(
        self,
        *,
        settings: AgentSettings,
        trusted: TrustedState,
        slots: SlotStore,
        fetcher: BundleFetcher,
        runtime: RuntimeLike,
        conditions: DeviceConditions,
        save_counters: Callable[[], None],
        on_activated: Callable[[Activated], None],
        on_selftest_failure: Callable[[Assignment], None],
        firmware_version: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.firmware_version = firmware_version
        self.clock = clock
        self.trusted = trusted
        self.slots = slots
        self.fetcher = fetcher
        self.runtime = runtime
        self.conditions = conditions
        self.save_counters = save_counters
        self.on_activated = on_activated
        self.on_selftest_failure = on_selftest_failure
        self.partial_dir = settings.state_dir / "partial"
        self.checkpoint = checkpoint_for(settings)

    # -- housekeeping -----------------------------------------------------------------------

    def forget_unassigned(self, assigned: Mapping[str, str]) -> list[str]:
        """Drop partial downloads and failed marks of bundles no longer assigned.

        Call only after a successful check-in: ``assigned`` (model -> SHA-256) is then the
        server's whole current offer, so a partial of anything else would never be finished.

        Returns:
            The SHA-256 of each partial dropped.
        """
        wanted = set(assigned.values())
        dropped = [h for h in partial_bundles(self.partial_dir) if h not in wanted]
        for bundle_sha256 in dropped:
            discard_partial(self.partial_dir, bundle_sha256)
        for model in self.slots.models():
            self.slots.forget_failures(model, {assigned[model]} if model in assigned else set())
        return dropped

    def note_interrupted(self, reverted: list[tuple[str, str, int]]) -> None:
        """After :meth:`SlotStore.recover`: a bundle whose self-test a crash interrupted
        ``max_interrupted_installs`` times is marked failed, so a model that kills the process
        in its self-test cannot loop forever."""
        for model, bundle_sha256, count in reverted:
            if count >= self.settings.max_interrupted_installs:
                self.slots.note_failure(
                    model,
                    "self-test-failed",
                    f"self-test of {bundle_sha256[:12]} was interrupted {count} times; not retried",
                    bundle_sha256=bundle_sha256,
                )

    # -- one assignment ---------------------------------------------------------------------

    def apply(
        self, assignment: Assignment, *, base_url: str, headers: Mapping[str, str]
    ) -> InstallReport:
        """Bring ``assignment`` (verified) into effect, or say why not.

        Download, verification and self-test failures are reported, not raised, so one model's
        trouble does not hold up another's.

        Raises:
            ServerUnreachable: If the server went away during the download (the partial stays
                for the next round).
        """
        model, bundle_sha256 = assignment.model, assignment.bundle_sha256
        report = InstallReport(model, "current", assignment.version, bundle_sha256)
        active = self.slots.active(model)
        if active is not None and active.bundle_sha256 == bundle_sha256:
            report.detail = f"{assignment.version} is active"
            return report
        record = self.slots.record(model)
        if bundle_sha256 in record.failed:
            report.action = "skipped"
            report.detail = (
                f"{assignment.version} ({bundle_sha256[:12]}) failed before"
                f" ({record.failed[bundle_sha256]});"
                " not fetched again until the server assigns another bundle"
            )
            return report
        local = self.slots.find(model, bundle_sha256)
        if local is None:
            waiting = self._unmet_conditions()
            if waiting is not None:
                report.action = "waiting"
                report.detail = waiting
                return report
        try:
            bundle, data = self._obtain(assignment, local, base_url, headers)
        except TrustError as exc:
            discard_partial(self.partial_dir, bundle_sha256)
            self.slots.note_failure(model, "verify-failed", str(exc), bundle_sha256=bundle_sha256)
            return self._failed(report, exc)
        except ServerUnreachable:
            raise
        except (DownloadError, ServerError) as exc:
            self.slots.note_failure(model, "download-failed", str(exc))
            return self._failed(report, exc)
        try:
            if local is not None and local.status == "standby":
                activated = self._switch_back(assignment, bundle, local.slot)
            else:
                activated = self._install(assignment, bundle, data)
        except SelfTestError as exc:
            return self._failed(report, exc)
        except InstallError as exc:
            with contextlib.suppress(OSError, InstallError):
                self.slots.note_failure(model, None, str(exc))
            return self._failed(report, exc)
        discard_partial(self.partial_dir, bundle_sha256)
        self.on_activated(activated)
        report.action = "installed"
        report.detail = f"{assignment.version} active in slot {activated.info.slot}"
        return report

    def apply_shadow(
        self, assignment: Assignment, *, base_url: str, headers: Mapping[str, str]
    ) -> tuple[InstallReport, LoadedModelLike | None]:
        """Bring ``assignment.shadow`` into the model's shadow slot: download (unless the slot
        holds it), verify as any bundle, self-test and load; the A/B slots are not touched, so
        the standby stays the way back. Failures are reported, not raised.

        Returns:
            The report (``shadow`` in its detail) and the loaded candidate, None if it failed.

        Raises:
            ServerUnreachable: If the server went away during the download.
        """
        shadow = assignment.shadow
        assert shadow is not None
        update = {k: getattr(shadow, k) for k in ("version", "bundle_sha256", "bundle_length")}
        update.update(
            release_counter=shadow.release_counter, download_url=shadow.download_url, shadow=None
        )
        candidate = assignment.model_copy(update=update)
        report = InstallReport(assignment.model, "installed", shadow.version, shadow.bundle_sha256)
        held = self.slots.shadow(assignment.model)
        try:
            if held is not None and held.bundle_sha256 == shadow.bundle_sha256:
                data = held.path.read_bytes()
                bundle = self._verify(data, candidate, self.clock())
            else:
                bundle, data = self._obtain(candidate, None, base_url, headers)
            loaded, passed, detail = self._self_test(bundle, shadow.bundle_sha256)
            if loaded is None or not passed:
                raise SelfTestError(
                    f"shadow candidate {shadow.version} failed its self-test: {detail}",
                    assignment.model,
                    detail,
                )
            if held is None or (held.bundle_sha256, held.sample_fraction) != (
                shadow.bundle_sha256,
                shadow.sample_fraction,
            ):
                self.slots.install_shadow(
                    assignment.model,
                    data,
                    version=shadow.version,
                    bundle_sha256=shadow.bundle_sha256,
                    sample_fraction=shadow.sample_fraction,
                )
        except ServerUnreachable:
            raise
        except (AgentError, OSError) as exc:
            self.slots.clear_shadow(assignment.model)
            error = exc if isinstance(exc, AgentError) else InstallError(str(exc), assignment.model)
            return self._failed(report, error), None
        discard_partial(self.partial_dir, shadow.bundle_sha256)
        report.detail = f"{shadow.version} in the shadow slot ({shadow.sample_fraction:g} sampled)"
        return report, loaded

    def refuse(self, assignment: Assignment, error: TrustError) -> InstallReport:
        """Record that ``assignment`` was refused before any download (its release counter is
        below the model's floor) in its model's slot record, and report it as failed.

        The bundle is not marked failed: the entry is refused again at each check-in that
        still names it, and a later assignment above the floor installs as usual.
        """
        model = assignment.model
        self.slots.note_failure(model, "verify-failed", str(error))
        report = InstallReport(model, "failed", assignment.version, assignment.bundle_sha256)
        return self._failed(report, error)

    @staticmethod
    def _failed(report: InstallReport, exc: AgentError) -> InstallReport:
        report.action = "failed"
        report.detail = str(exc)
        report.error = exc
        return report

    def _unmet_conditions(self) -> str | None:
        if self.settings.unmetered_only and not self.conditions.unmetered():
            return "waiting for an unmetered network (unmetered_only is set)"
        if self.settings.charging_only and not self.conditions.charging():
            return "waiting for the device to charge (charging_only is set)"
        return None

    def _obtain(
        self,
        assignment: Assignment,
        local: SlotInfo | None,
        base_url: str,
        headers: Mapping[str, str],
    ) -> tuple[VerifiedBundle, bytes]:
        """The assigned bundle's bytes, verified: from a slot that holds it, or downloaded."""
        now = self.clock()
        if local is not None:
            data = local.path.read_bytes()
            return self._verify(data, assignment, now), data
        url = resolve_url(base_url, assignment.download_url)
        # Credentials go only to the fleet server, never to a CDN named in an assignment.
        same_origin = urlsplit(url)[:2] == urlsplit(base_url)[:2]
        send = dict(headers) if same_origin else {}
        path = partial_path(self.partial_dir, assignment.bundle_sha256)
        resumed = path.exists() and path.stat().st_size > 0

        def fetch() -> bytes:
            return self.fetcher.fetch(
                url,
                assignment.bundle_sha256,
                assignment.bundle_length,
                self.partial_dir,
                headers=send,
            )

        data = fetch()
        try:
            return self._verify(data, assignment, now), data
        except TrustError as exc:
            if not (resumed and exc.kind == "mismatch"):
                raise
        # A partial from an earlier run may have been damaged by a power cut (unflushed
        # pages); fetch once from zero before blaming the server.
        discard_partial(self.partial_dir, assignment.bundle_sha256)
        data = fetch()
        return self._verify(data, assignment, now), data

    def _verify(self, data: bytes, assignment: Assignment, now: datetime) -> VerifiedBundle:
        return self.trusted.verify_bundle(
            data,
            assignment,
            self.settings.hardware_id,
            firmware_version=self.firmware_version,
            now=now,
        )

    def _install(self, assignment: Assignment, bundle: VerifiedBundle, data: bytes) -> Activated:
        """Inactive slot, fsync, trial, self-test, activate or revert.

        Raises:
            SelfTestError: If the self-test failed (the install is reverted).
            InstallError: If a slot could not be written.
        """
        model = assignment.model
        slot = self.slots.inactive(model)
        try:
            return self._install_into(slot, assignment, bundle, data)
        except OSError as exc:
            # Disk full or failing: the previous active slot is untouched; a slot left
            # "installing" or on trial is repaired by the next start's recovery or install.
            raise InstallError(
                f"could not install into slot {slot} of {model}: {exc}", model
            ) from exc

    def _install_into(
        self, slot: SlotName, assignment: Assignment, bundle: VerifiedBundle, data: bytes
    ) -> Activated:
        model = assignment.model
        self.slots.begin_install(
            model,
            slot,
            bundle_sha256=assignment.bundle_sha256,
            version=assignment.version,
            release_counter=assignment.release_counter,
            length=len(data),
        )
        self.slots.write(model, slot, data)
        self.checkpoint("written")
        self.slots.sync(model, slot)
        self.checkpoint("fsynced")
        self.slots.begin_self_test(model, slot)
        self.checkpoint("switched")
        return self._trial(slot, assignment, bundle)

    def _switch_back(
        self, assignment: Assignment, bundle: VerifiedBundle, slot: SlotName
    ) -> Activated:
        """Go back to the bundle in the standby slot (re-verified from disk by the caller): no
        download and no rewrite; on trial, self-tested, then activated (docs/rollback.md).

        Raises:
            SelfTestError: If the self-test failed (the slot is marked failed; the active one
                keeps running).
            InstallError: If the slot record could not be written.
        """
        model = assignment.model
        try:
            self.slots.begin_switch_back(model, slot)
            self.checkpoint("switched")
            return self._trial(slot, assignment, bundle)
        except OSError as exc:
            raise InstallError(
                f"could not switch {model} back to slot {slot}: {exc}", model
            ) from exc

    def _trial(self, slot: SlotName, assignment: Assignment, bundle: VerifiedBundle) -> Activated:
        """Self-test the bundle on trial in ``slot``; activate it, or revert.

        Raises:
            SelfTestError: If the self-test failed (the install is reverted).
        """
        model = assignment.model
        loaded, passed, detail = self._self_test(bundle, assignment.bundle_sha256)
        if loaded is None or not passed:
            self.slots.revert(model, slot, "self-test-failed", f"self-test failed: {detail}")
            self.on_selftest_failure(assignment)
            raise SelfTestError(
                f"{model} {assignment.version} failed its self-test and was reverted: {detail}",
                model,
                detail,
            )
        self.checkpoint("self-tested")
        info = self.slots.activate(model, slot)
        if self.trusted.record_installed(model, assignment.release_counter):
            self.save_counters()
        return Activated(info, bundle.manifest, loaded)

    def _self_test(
        self, bundle: VerifiedBundle, key: str
    ) -> tuple[LoadedModelLike | None, bool, str]:
        manifest = bundle.manifest
        try:
            loaded = self.runtime.load(key, manifest, bundle.file(manifest.runtime.model_file))
            result = loaded.self_test(manifest)
        except Exception as exc:
            # The model is data from outside; whatever stops it loading or running on this
            # device is a failed self-test, never a crash of the install.
            return None, False, f"{type(exc).__name__}: {exc}"
        return loaded, result.passed, result.detail
