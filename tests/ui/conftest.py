"""Browser tests' fixtures: one Chromium for these tests and one seeded server for the session
(tests compare the pages with the API at the time they run, so they do not depend on each other's
actions).

Chromium is Debian's ``/usr/bin/chromium`` driven by Playwright. When it cannot start, the tests
fail with the reason (never skipped).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.ui.fleet import SeededFleet, Visitor, launch_chromium, seeded_server, visit


# Package scope, not session: Playwright's sync API keeps an event loop running in this thread
# while it is started, and every later test of the worker that calls asyncio.run() (device links,
# the rig) would fail; stopping it after the last browser test gives the thread back.
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright

        playwright = sync_playwright().start()
    except Exception as exc:  # not installed, or no driver
        why = f"Playwright cannot start: {exc}"
        pytest.fail(why)
    try:
        chromium = launch_chromium(playwright)
    except Exception as exc:  # no browser, or it will not start here
        playwright.stop()
        why = f"Chromium cannot start: {exc}"
        pytest.fail(why)
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededFleet]:
    with seeded_server(tmp_path_factory.mktemp("dashboard")) as seeded:
        yield seeded


@pytest.fixture()
def operator(browser: Any, fleet: SeededFleet) -> Iterator[Visitor]:
    visitor = visit(browser, fleet.base, fleet.tokens["operator"])
    yield visitor
    visitor.close()


@pytest.fixture()
def viewer(browser: Any, fleet: SeededFleet) -> Iterator[Visitor]:
    visitor = visit(browser, fleet.base, fleet.tokens["viewer"])
    yield visitor
    visitor.close()
