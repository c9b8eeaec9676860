"""Screenshots of the live demo's dashboard while it runs (``--screenshot``; ``make screenshots``):
the v3 rollout's page after the evaluator halted it, and the fleet page, in Debian's Chromium."""

from __future__ import annotations

from pathlib import Path


def rollout_page(url: str, token: str, rollout_id: int, path: Path) -> None:
    """Write the rollout's page to ``path`` and the fleet page beside it (``demo-fleet.png``).

    Raises:
        SystemExit: If the page made console errors or asked for anything off the server.
    """
    from playwright.sync_api import sync_playwright

    from tests.ui.fleet import launch_chromium, visit

    path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        visitor = visit(browser, url, token, viewport=(1400, 1000))
        for page, target in (
            (f"/ui/rollouts/{rollout_id}", path),
            ("/ui/", path.with_name("demo-fleet.png")),
        ):
            visitor.goto(page)
            visitor.page.screenshot(path=str(target), full_page=True)
            print(f"wrote {target}", flush=True)
        problems = visitor.console_errors + visitor.foreign_requests()
        visitor.close()
        browser.close()
    if problems:
        raise SystemExit(f"demo failed: the dashboard page had problems: {problems}")
