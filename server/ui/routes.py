"""The dashboard's routes under ``/ui/``: login and logout, the Fleet, Model, Compare, Lineage,
Device and Rollout pages (each with its JSON twin at the same path plus ``.json``), and the
rollout controls."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from server import rollouts
from server.auth import api_token_by_value
from server.bodies import read_body
from server.errors import ApiError
from server.rollouts import Action
from server.ui import pages
from server.ui import session as ui_session
from server.ui.device_view import device_page
from server.ui.fleet_view import fleet_page
from server.ui.lineage_view import lineage_page
from server.ui.model_view import compare_page, model_page
from server.ui.rollout_view import CONTROLS, get_rollout, rollout_compare_page, rollout_page
from server.ui.session import SessionError

router = APIRouter(prefix="/ui", include_in_schema=False)
#: A login or action form is a few short fields.
MAX_FORM_BYTES = 16 * 1024


def install(app: FastAPI) -> None:
    """Serve the dashboard: static files first, so the pages' catch-all does not hide them."""
    app.mount("/ui/static", StaticFiles(directory=pages.STATIC), name="ui-static")
    app.include_router(router)


def _twin(segment: str) -> tuple[str, bool]:
    """The last path segment without ``.json``, and whether it asked for the JSON twin."""
    if segment.endswith(".json"):
        return segment.removesuffix(".json"), True
    return segment, False


def _params(request: Request) -> dict[str, str]:
    return dict(request.query_params)


@router.get("/")
def fleet(request: Request) -> Response:
    return _fleet(request, twin=False)


@router.get("/index.json")
def fleet_json(request: Request) -> Response:
    return _fleet(request, twin=True)


def _fleet(request: Request, *, twin: bool) -> Response:
    settings, params = pages.state_of(request).settings, _params(request)
    return pages.page(
        request,
        twin=twin,
        template="fleet.html",
        title="Fleet",
        params=params,
        build=lambda db, who: fleet_page(db, settings, now=datetime.now(UTC), params=params),
    )


@router.get("/models/{segment}")
def model(request: Request, segment: str) -> Response:
    name, twin = _twin(segment)
    state, params = pages.state_of(request), _params(request)
    return pages.page(
        request,
        twin=twin,
        template="model.html",
        title=name,
        params=params,
        build=lambda db, who: model_page(db, state, who, name, params),
    )


def _subpage(request: Request, segment: str, expected: str, **page: Any) -> Response:
    """The page (or twin) ``pages.page(**page)`` where the last segment names ``expected``;
    404 for any other name."""
    name, twin = _twin(segment)
    if name != expected:
        return _not_found(request)
    return pages.page(request, twin=twin, **page)


@router.get("/models/{name}/{segment}")
def compare(request: Request, name: str, segment: str) -> Response:
    state, params = pages.state_of(request), _params(request)
    return _subpage(
        request,
        segment,
        "compare",
        template="compare.html",
        title=f"{name}: compare",
        params=params,
        build=lambda db, who: compare_page(db, state, who, name, params),
    )


@router.get("/models/{name}/versions/{version}/{segment}")
def lineage(request: Request, name: str, version: str, segment: str) -> Response:
    state = pages.state_of(request)
    return _subpage(
        request,
        segment,
        "lineage",
        template="lineage.html",
        title=f"{name} {version}: lineage",
        build=lambda db, who: lineage_page(db, state, who, name, version),
    )


@router.get("/devices/{segment}")
def device(request: Request, segment: str) -> Response:
    device_id, twin = _twin(segment)
    params = _params(request)
    return pages.page(
        request,
        twin=twin,
        template="device.html",
        title=f"Device {device_id}",
        params=params,
        build=lambda db, who: device_page(db, device_id, params),
    )


@router.get("/rollouts/{segment}")
def rollout(request: Request, segment: str) -> Response:
    rollout_id, twin = _twin(segment)
    state = pages.state_of(request)
    return pages.page(
        request,
        twin=twin,
        template="rollout.html",
        title=f"Rollout {rollout_id}",
        build=lambda db, who: rollout_page(db, state, who, rollout_id),
    )


@router.get("/rollouts/{rollout_id}/{segment}")
def rollout_compare(request: Request, rollout_id: str, segment: str) -> Response:
    state = pages.state_of(request)
    return _subpage(
        request,
        segment,
        "compare",
        template="rollout_compare.html",
        title=f"Rollout {rollout_id}: treatment against control",
        build=lambda db, who: rollout_compare_page(db, state, who, rollout_id),
    )


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the first value of each field).

    Raises:
        ApiError: 413 over :data:`MAX_FORM_BYTES`.
    """
    body = await read_body(request, MAX_FORM_BYTES, "form")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


@router.post("/rollouts/{rollout_id}/{action}")
async def act(request: Request, rollout_id: str, action: str) -> Response:
    """An operator's control: the same :func:`server.rollouts.act` as the API, after the
    session, Origin and CSRF checks. htmx gets the rollout panel back; a plain form, a redirect."""
    partial = request.headers.get("hx-request") == "true"
    try:
        form = await _form(request)
    except ApiError as exc:
        return pages.problem(exc.status, exc.reason)
    csrf = request.headers.get(ui_session.CSRF_HEADER) or form.get(ui_session.CSRF_FIELD)
    state = pages.state_of(request)

    def work() -> Response:
        with state.sessions() as db:
            try:
                ui = pages.current_session(request, db)
            except SessionError as exc:
                return pages.error_page(request, 401, exc.reason, ui=None, login=True)
            try:
                if action not in CONTROLS:
                    raise ApiError(404, f"no control {action!r}; controls: {', '.join(CONTROLS)}")
                ui_session.check_action(
                    ui,
                    origin=request.headers.get("origin"),
                    referer=request.headers.get("referer"),
                    own_origin=pages.own_origin(request),
                    csrf=csrf,
                )
                ui.principal.require("operate")
                rollout = get_rollout(db, rollout_id)
                assert rollout.id is not None
                rollouts.act(
                    db, rollout.id, cast(Action, action), by=f"operator:{ui.principal.name}"
                )
            except ApiError as exc:
                if not partial:
                    return pages.error_page(request, exc.status, exc.reason, ui=ui)
                return _panel(request, db, ui, rollout_id, status=exc.status, message=exc.reason)
            if not partial:
                return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)
            return _panel(request, db, ui, rollout_id, message=f"{action}: done")

    return await run_in_threadpool(work)


def _panel(
    request: Request,
    db: Any,
    ui: ui_session.UiSession,
    rollout_id: str,
    *,
    status: int = 200,
    message: str,
) -> Response:
    """The rollout's state, controls and decision log, for htmx to swap in."""
    try:
        data = rollout_page(db, pages.state_of(request), ui.principal, rollout_id)
    except ApiError as exc:
        return pages.error_page(request, exc.status, exc.reason, ui=ui)
    return pages.render(
        request, "rollout_panel.html", status=status, ui=ui, data=data, message=message
    )


@router.get("/login")
def login_form(request: Request) -> Response:
    return pages.render(
        request, "login.html", title="Log in", next=_next(request.query_params.get("next"))
    )


@router.post("/login")
async def login(request: Request) -> Response:
    """Exchange an API token (form field ``token``) for a session cookie; the cookie holds the
    token's id, an expiry and a signature, never the token."""
    try:
        ui_session.check_origin(
            origin=request.headers.get("origin"),
            referer=request.headers.get("referer"),
            own_origin=pages.own_origin(request),
        )
        form = await _form(request)
    except ApiError as exc:
        return pages.error_page(request, exc.status, exc.reason, ui=None)
    target = _next(form.get("next"))
    state = pages.state_of(request)

    def work() -> Response:
        with state.sessions() as db:
            token = api_token_by_value(db, form.get("token", "").strip())
            if token is None or token.revoked or token.id is None:
                return pages.render(
                    request,
                    "login.html",
                    status=401,
                    title="Log in",
                    next=target,
                    message="That token is not valid or was revoked.",
                )
            token_id = token.id
        settings = state.settings
        value = ui_session.issue(
            pages.secret(request),
            token_id,
            now=ui_session.now_utc(),
            ttl_s=settings.ui_session_ttl_s,
        )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            ui_session.COOKIE,
            value,
            max_age=settings.ui_session_ttl_s,
            path=ui_session.COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    return await run_in_threadpool(work)


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session in this browser (the cookie is cleared; revoke the token to end all)."""
    form = await _form(request)
    state = pages.state_of(request)

    def work() -> Response:
        with state.sessions() as db:
            try:
                ui = pages.current_session(request, db)
                ui_session.check_action(
                    ui,
                    origin=request.headers.get("origin"),
                    referer=request.headers.get("referer"),
                    own_origin=pages.own_origin(request),
                    csrf=request.headers.get(ui_session.CSRF_HEADER)
                    or form.get(ui_session.CSRF_FIELD),
                )
            except SessionError:
                pass  # nothing to end
            except ApiError as exc:
                return pages.error_page(request, exc.status, exc.reason, ui=None)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(ui_session.COOKIE, path=ui_session.COOKIE_PATH)
        return response

    return await run_in_threadpool(work)


def _next(value: str | None) -> str:
    """Where to go after login: a dashboard path only (never another site)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"


def _not_found(request: Request) -> Response:
    reason = f"no dashboard page at {request.url.path}"
    if request.url.path.endswith(".json"):
        return pages.problem(404, reason)
    return pages.error_page(request, 404, reason, ui=None)


@router.get("/{rest:path}")
def not_found(request: Request, rest: str) -> Response:
    return _not_found(request)
