"""Going back (docs/rollback.md): a director-signed assignment of an older version the device
ran is installed from its standby slot without a download, unless the server confirmed a newer
version for the device, which a holder of only the director key cannot undo."""

from __future__ import annotations

import pytest

from device_agent.agent import Agent
from device_agent.errors import TrustError
from tests.agent.conftest import MODEL, AgentFactory, Bundles, assert_answers
from tests.agent.simulator import FleetSimulator


def _on_v2(agent: Agent, sim: FleetSimulator, bundles: Bundles, confirmed: int | None) -> None:
    """v1 (installed) then v2 activated, with the director naming ``confirmed``."""
    if confirmed is not None:
        sim.assignment_overrides["confirmed_release_counter"] = confirmed
    sim.assign(MODEL, bundles.v2.data)
    assert agent.check_in().installs[0].action == "installed"
    assert_answers(agent, bundles.v2)


@pytest.mark.parametrize("confirmed", [None, 1], ids=["nothing-confirmed", "v1-confirmed"])
def test_back_to_the_standby_version_without_a_download(
    installed: Agent,
    sim: FleetSimulator,
    bundles: Bundles,
    confirmed: int | None,
) -> None:
    _on_v2(installed, sim, bundles, confirmed)
    fetched = len(sim.downloads(bundles.v1.bundle_sha256))
    sim.assign(MODEL, bundles.v1.data)
    (report,) = installed.check_in().installs
    assert report.action == "installed", report
    assert len(sim.downloads(bundles.v1.bundle_sha256)) == fetched == 1, "no second download of v1"
    assert_answers(installed, bundles.v1)
    models = installed.status()["models"][MODEL]
    assert models["version"] == "1.0.0" and models["last_error"] is None
    # v2 is now the standby: forward again, still without a download.
    sim.assign(MODEL, bundles.v2.data)
    assert installed.check_in().installs[0].action == "installed"
    assert len(sim.downloads(bundles.v2.bundle_sha256)) == 1
    assert_answers(installed, bundles.v2)


def test_director_only_rollback_below_the_confirmed_version_is_refused(
    installed: Agent, make_agent: AgentFactory, sim: FleetSimulator, bundles: Bundles
) -> None:
    """v2 confirmed: the floor is 2; an attacker with the director key signs v1 and leaves the
    confirmation out (or names a lower one). Refused, before any download, across a restart."""
    _on_v2(installed, sim, bundles, confirmed=2)
    for lie in ({}, {"confirmed_release_counter": 0}):
        sim.assignment_overrides = dict(lie)
        sim.assign(MODEL, bundles.v1.data)
        restarted = make_agent()
        (report,) = restarted.check_in().installs
        refused = report.error
        assert isinstance(refused, TrustError), report
        assert refused.kind == "rollback" and refused.model == MODEL and "below 2" in str(refused)
        assert_answers(restarted, bundles.v2)
    assert len(sim.downloads(bundles.v1.bundle_sha256)) == 1, "refused before any download"


def test_the_floor_rises_when_a_confirmation_is_heard_after_activation(
    installed: Agent, sim: FleetSimulator, bundles: Bundles
) -> None:
    """v2 activated unconfirmed, then a later check-in carries its confirmation: from then on
    v1 is refused even if the director stops saying so."""
    _on_v2(installed, sim, bundles, confirmed=None)
    sim.assignment_overrides["confirmed_release_counter"] = 2
    assert installed.check_in().installs[0].action == "current"
    sim.assignment_overrides = {}
    sim.assign(MODEL, bundles.v1.data)
    refused = installed.check_in().errors[MODEL]
    assert isinstance(refused, TrustError) and refused.kind == "rollback"
