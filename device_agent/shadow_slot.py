"""Each model's shadow slot as the assignment sets say: install or drop the candidate, restore it
after a restart, and keep it beside whichever version answers (:mod:`device_agent.shadow` runs
it; :meth:`~device_agent.updater.Updater.apply_shadow` downloads, verifies and self-tests it)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from device_agent.errors import AgentError, InstallError
from device_agent.runtime import LoadedModel, ModelRuntime
from device_agent.shadow import ShadowRunner
from device_agent.slots import SlotStore
from device_agent.updater import InstallReport, Updater
from firmware_bundles import BundleError, open_bundle
from firmware_bundles.messages import Assignment


class ShadowSlots:
    """The agent's shadow candidates, one per model at most.

    Args:
        runner: Samples calls into the candidates.
        updater: Installs candidates into the shadow slots.
        slots: Where they are kept.
        runtime: Loads and unloads them.
        active: The loaded active version of a model (raises if none is active).
    """

    def __init__(
        self,
        runner: ShadowRunner,
        updater: Updater,
        slots: SlotStore,
        runtime: ModelRuntime,
        active: Callable[[str], LoadedModel],
    ) -> None:
        self.runner = runner
        self._updater = updater
        self._slots = slots
        self._runtime = runtime
        self._active = active

    def apply(
        self, assignments: list[Assignment], *, base_url: str, headers: Mapping[str, str]
    ) -> list[InstallReport]:
        """Install or drop each model's candidate as the assignment set says; a model whose
        entry carries none has its shadow slot emptied. One report per candidate."""
        reports = []
        for assignment in assignments:
            model = assignment.model
            if assignment.shadow is None:
                self.drop(model)
                continue
            report, loaded = self._updater.apply_shadow(
                assignment, base_url=base_url, headers=headers
            )
            reports.append(report)
            if isinstance(loaded, LoadedModel):
                with contextlib.suppress(AgentError):
                    self.runner.attach(
                        self._active(model), loaded, assignment.shadow.sample_fraction
                    )
            else:
                self.drop(model)
        return reports

    def drop(self, model: str) -> None:
        """Stop shadowing ``model``, empty its slot and unload the candidate."""
        candidate = self.runner.candidate(model)
        self.runner.detach(model)
        with contextlib.suppress(InstallError):
            self._slots.clear_shadow(model)
        if candidate is not None:
            self._runtime.unload(candidate.bundle_sha256)

    def restore(self, model: str) -> None:
        """After a restart: run the candidate the slot holds again (an unreadable one is
        dropped; the next check-in fetches it again if still assigned).

        Raises:
            AgentError: If ``model`` has no active version to shadow.
        """
        info = self._slots.shadow(model)
        if info is None:
            return
        try:
            contents = open_bundle(info.path.read_bytes(), with_bundle_sha256=True)
        except (OSError, BundleError):
            self._slots.clear_shadow(model)
            return
        manifest = contents.manifest
        candidate = self._runtime.load(
            info.bundle_sha256, manifest, bytes(contents.files[manifest.runtime.model_file])
        )
        self.runner.attach(self._active(model), candidate, info.sample_fraction)

    def follow(self, model: str, activated: LoadedModel) -> None:
        """A new version of ``model`` answers: its candidate now shadows that one."""
        candidate = self.runner.candidate(model)
        if candidate is not None:
            self.runner.attach(activated, candidate, self.runner.sample_fraction(model))
