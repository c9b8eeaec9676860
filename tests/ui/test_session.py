"""Logging in, sessions, CSRF and bad input, over real HTTP against the seeded server: a page that
says what is wrong with the matching status (the JSON twin answers the API's problem JSON), never
a stack trace; the cookie holds no token, and tokens never reach a URL or the server's log."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest

from server.ui import session as ui_session
from tests.ui.fleet import MODEL, SeededFleet


@contextmanager
def login(fleet: SeededFleet, role: str) -> Iterator[httpx.Client]:
    """A client logged in to the dashboard as ``role`` through the login form."""
    with httpx.Client(base_url=fleet.base, timeout=60) as client:
        r = client.post(
            "/ui/login",
            data={"token": fleet.tokens[role], "next": "/ui/"},
            headers={"Origin": fleet.base},
        )
        assert r.status_code == 303 and r.headers["location"] == "/ui/", r.text
        yield client


@pytest.fixture()
def operator_client(fleet: SeededFleet) -> Iterator[httpx.Client]:
    with login(fleet, "operator") as client:
        yield client


def _token_id(fleet: SeededFleet, name: str) -> int:
    tokens = fleet.api("/v1/tokens", role="admin")
    return int(next(t["id"] for t in tokens if t["name"] == name))


def test_the_session_cookie_is_http_only_strict_scoped_to_ui_and_holds_no_token(
    fleet: SeededFleet,
) -> None:
    r = httpx.post(
        f"{fleet.base}/ui/login",
        data={"token": fleet.tokens["viewer"]},
        headers={"Origin": fleet.base},
    )
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Max-Age=43200" in cookie
    value = re.match(r"edgefleet_session=([^;]+);", cookie)
    assert value is not None
    assert fleet.tokens["viewer"] not in cookie and value.group(1).split(".")[0].isdigit()


def test_a_wrong_token_or_a_foreign_origin_does_not_log_in(fleet: SeededFleet) -> None:
    wrong = httpx.post(
        f"{fleet.base}/ui/login", data={"token": "efa_nope"}, headers={"Origin": fleet.base}
    )
    assert wrong.status_code == 401 and "not valid or was revoked" in wrong.text
    assert "set-cookie" not in wrong.headers
    foreign = httpx.post(
        f"{fleet.base}/ui/login",
        data={"token": fleet.tokens["viewer"]},
        headers={"Origin": "http://evil.example"},
    )
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/ui/models/no-such-model", 404, "no model no-such-model"),
        (f"/ui/models/{MODEL}?version=9.9.9", 404, f"no version 9.9.9 of model {MODEL}"),
        (f"/ui/models/{MODEL}/compare?a=1.0.0&b=9.9.9", 404, "no version 9.9.9"),
        (f"/ui/models/{MODEL}/compare?a=1.0.0", 400, "compare needs two versions"),
        ("/ui/rollouts/999", 404, "no rollout 999"),
        ("/ui/rollouts/abc", 404, "no rollout 'abc'"),
        ("/ui/rollouts/999/compare", 404, "no rollout 999"),
        (f"/ui/models/{MODEL}?from=2026-02-30", 400, "'from' must be an ISO 8601 date"),
        (f"/ui/models/{MODEL}?from=2026-05-02&to=2026-05-01", 400, "must be before 'to'"),
        (f"/ui/models/{MODEL}?hardware_id=toaster", 400, "unknown hardware id 'toaster'"),
        ("/ui/no/such/page", 404, "no dashboard page at /ui/no/such/page"),
        ("/ui/devices/no-such-device", 404, "no device no-such-device"),
        ("/ui/devices/ring-03?from=2026-02-30", 400, "'from' must be an ISO 8601 date"),
        ("/ui/devices/ring-03?from=2026-05-02&to=2026-05-01", 400, "must be before 'to'"),
        (f"/ui/models/{MODEL}/versions/9.9.9/lineage", 404, f"no version 9.9.9 of model {MODEL}"),
        ("/ui/models/no-such-model/versions/1.0.0/lineage", 404, "no model no-such-model"),
        (f"/ui/models/{MODEL}/versions/1.0.0/nothing", 404, "no dashboard page at /ui/models/"),
        ("/ui/?to=last-week", 400, "'to' must be an ISO 8601 date"),
        ("/ui/?from=2026-05-02&to=2026-05-01", 400, "must be before 'to'"),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "unknown-compare-version",
        "compare-without-b",
        "unknown-rollout",
        "rollout-not-a-number",
        "unknown-rollout-compare",
        "bad-date",
        "empty-range",
        "unknown-hardware-id",
        "unknown-page",
        "unknown-device",
        "device-bad-date",
        "device-empty-range",
        "unknown-lineage-version",
        "unknown-lineage-model",
        "unknown-version-page",
        "fleet-bad-date",
        "fleet-empty-range",
    ],
)
def test_bad_input_is_a_page_saying_so_and_the_twin_answers_problem_json(
    operator_client: httpx.Client, path: str, status: int, says: str
) -> None:
    page = operator_client.get(path)
    assert page.status_code == status
    assert page.headers["content-type"].startswith("text/html")
    assert says in page.text.replace("&#39;", "'") and "Traceback" not in page.text
    base, _, query = path.partition("?")
    base = "/ui/index" if base == "/ui/" else base
    twin = operator_client.get(base + ".json" + (f"?{query}" if query else ""))
    assert twin.status_code == status
    assert says.split(" at ")[0] in twin.json()["detail"]


def test_an_expired_session_says_so_with_a_login_link(fleet: SeededFleet) -> None:
    secret = (fleet.server.data_dir / ui_session.SECRET_FILE).read_bytes().strip()
    expired = ui_session.issue(
        secret,
        _token_id(fleet, "viewer-1"),
        now=ui_session.now_utc() - timedelta(hours=13),
        ttl_s=12 * 3600,
    )
    cookies = {ui_session.COOKIE: expired}
    page = httpx.get(f"{fleet.base}/ui/", cookies=cookies)
    assert page.status_code == 401
    assert "your session has expired" in page.text
    assert 'href="/ui/login?next=/ui/"' in page.text
    twin = httpx.get(f"{fleet.base}/ui/index.json", cookies=cookies)
    assert twin.status_code == 401 and twin.json() == {"detail": "your session has expired"}
    for page_path in (
        "/ui/devices/ring-03",
        f"/ui/models/{MODEL}/versions/2.0.0/lineage",
        f"/ui/rollouts/{fleet.rollout_id}",
    ):
        refused = httpx.get(f"{fleet.base}{page_path}", cookies=cookies)
        assert refused.status_code == 401 and "your session has expired" in refused.text
        assert f'href="/ui/login?next={page_path}"' in refused.text
        assert "Traceback" not in refused.text
        twin = httpx.get(f"{fleet.base}{page_path}.json", cookies=cookies)
        assert twin.status_code == 401 and twin.json() == {"detail": "your session has expired"}
    forged = httpx.get(f"{fleet.base}/ui/", cookies={ui_session.COOKIE: expired[:-2] + "xx"})
    assert forged.status_code == 401 and "not one this server signed" in forged.text
    anonymous = httpx.get(f"{fleet.base}/ui/models/{MODEL}")
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == f"/ui/login?next=/ui/models/{MODEL}"


def test_a_revoked_token_ends_its_sessions(fleet: SeededFleet) -> None:
    created = httpx.post(
        f"{fleet.base}/v1/tokens",
        json={"name": "short-lived", "role": "viewer"},
        headers={"Authorization": f"Bearer {fleet.tokens['admin']}"},
    ).json()
    fleet.tokens["short-lived"] = created["token"]
    with login(fleet, "short-lived") as client:
        assert client.get("/ui/").status_code == 200
        httpx.delete(
            f"{fleet.base}/v1/tokens/{created['id']}",
            headers={"Authorization": f"Bearer {fleet.tokens['admin']}"},
        )
        refused = client.get("/ui/")
        assert refused.status_code == 401 and "was revoked" in refused.text


def test_actions_need_the_sessions_csrf_token_and_our_origin(
    fleet: SeededFleet, operator_client: httpx.Client
) -> None:
    page = operator_client.get(f"/ui/rollouts/{fleet.rollout_id}")
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert csrf is not None
    action = f"/ui/rollouts/{fleet.rollout_id}/pause"
    state = fleet.api(f"/v1/rollouts/{fleet.rollout_id}")["state"]
    refusals = [
        ({"Origin": fleet.base}, "CSRF token is missing"),
        ({"Origin": fleet.base, "X-CSRF-Token": "forged"}, "CSRF token is missing or wrong"),
        ({"Origin": "http://evil.example", "X-CSRF-Token": csrf.group(1)}, "cross-origin"),
        ({"X-CSRF-Token": csrf.group(1)}, "without Origin or Referer"),
    ]
    for headers, says in refusals:
        r = operator_client.post(action, headers=headers)
        assert r.status_code == 403 and says in r.text, (headers, r.text)
    assert fleet.api(f"/v1/rollouts/{fleet.rollout_id}")["state"] == state
    # Another login has another CSRF token.
    with login(fleet, "operator") as other:
        r = other.post(action, headers={"Origin": fleet.base, "X-CSRF-Token": csrf.group(1)})
        assert r.status_code == 403
    # A plain form (no JavaScript) with the token in a field works, and redirects to the page.
    done = operator_client.post(
        action, data={"csrf_token": csrf.group(1)}, headers={"Origin": fleet.base}
    )
    assert (
        done.status_code == 303 and done.headers["location"] == f"/ui/rollouts/{fleet.rollout_id}"
    )
    assert fleet.api(f"/v1/rollouts/{fleet.rollout_id}")["state"] == "paused"
    resumed = operator_client.post(
        f"/ui/rollouts/{fleet.rollout_id}/resume",
        headers={"Origin": fleet.base, "X-CSRF-Token": csrf.group(1), "HX-Request": "true"},
    )
    assert resumed.status_code == 200 and 'data-state="running"' in resumed.text
    again = operator_client.post(
        f"/ui/rollouts/{fleet.rollout_id}/resume",
        headers={"Origin": fleet.base, "X-CSRF-Token": csrf.group(1), "HX-Request": "true"},
    )
    assert again.status_code == 409 and "resume applies to paused" in again.text


def test_json_twins_equal_what_the_pages_embed_and_take_bearer_tokens(
    fleet: SeededFleet, operator_client: httpx.Client
) -> None:
    for path in (
        "/ui/",
        f"/ui/models/{MODEL}",
        f"/ui/rollouts/{fleet.rollout_id}",
        "/ui/devices/ring-03",
        f"/ui/models/{MODEL}/versions/2.0.0/lineage",
    ):
        twin_path = "/ui/index.json" if path == "/ui/" else path + ".json"
        twin = fleet.api(twin_path, role="operator", **({} if "rollouts" in path else fleet.span))
        page = operator_client.get(path, params={} if "rollouts" in path else fleet.span).text
        embedded = re.findall(r'<script type="application/json" data-chart="([^"]+)">', page)
        charts = twin["charts"]
        specs = (
            charts
            if isinstance(charts, list)
            else [
                s
                for group in charts.values()
                for s in (group if isinstance(group, list) else [group])
            ]
        )
        assert sorted(embedded) == sorted(s["id"] for s in specs if s["x_text"])
    device = httpx.get(
        f"{fleet.base}/ui/index.json",
        headers={"Authorization": f"Bearer {next(iter(fleet.devices.values()))}"},
    )
    assert device.status_code == 403


def test_tokens_never_reach_a_url_or_the_log(fleet: SeededFleet) -> None:
    with login(fleet, "operator") as client:
        client.get(f"/ui/models/{MODEL}")
    assert any(r["path"] == "/ui/login" for r in fleet.server.requests())
    lines = [line for log in fleet.server.logs for line in log.read_text().splitlines()]
    for role, token in fleet.tokens.items():
        # `serve --init` prints the first admin token once, by design; nothing else may.
        assert all("shown once" in line for line in lines if token in line), role
