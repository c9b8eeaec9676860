"""Write docs/screenshots/*.png: each dashboard page of the browser tests' seeded fleet, as an
operator sees it in Chromium (``make screenshots``; the test run itself writes nothing here)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.ui.fleet import (  # noqa: E402
    MODEL,
    REVERTED_RING,
    launch_chromium,
    seeded_server,
    visit,
)

OUT = REPO / "docs" / "screenshots"


def main() -> int:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, seeded_server(Path(tmp)) as fleet:
        span = "from={from}&to={to}".format(**fleet.span)
        pages = {
            "fleet": "/ui/",
            "model": f"/ui/models/{MODEL}?{span}",
            "compare": f"/ui/models/{MODEL}/compare?a=1.0.0&b=2.0.0&{span}",
            "rollout": f"/ui/rollouts/{fleet.rollout_id}",
            "rollout-compare": f"/ui/rollouts/{fleet.rollout_id}/compare",
            "device": f"/ui/devices/{REVERTED_RING}",
            "lineage": f"/ui/models/{MODEL}/versions/2.0.0/lineage",
        }
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            visitor = visit(browser, fleet.base, fleet.tokens["operator"], viewport=(1400, 1000))
            for name, path in pages.items():
                visitor.goto(path)
                target = OUT / f"{name}.png"
                visitor.page.screenshot(path=str(target), full_page=True)
                print(f"wrote {target.relative_to(REPO)}")
            problems = visitor.console_errors + visitor.foreign_requests()
            visitor.close()
            browser.close()
    for problem in problems:
        print(f"screenshots: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
