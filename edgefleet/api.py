"""The CLI's calls to a fleet server's API: the options every such command takes and the one
place that maps HTTP answers to a message and an exit code."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from edgefleet.common import fail

ServerOpt = Annotated[str, typer.Option(envvar="EDGEFLEET_SERVER", help="Server URL.")]
TokenOpt = Annotated[str, typer.Option(envvar="EDGEFLEET_TOKEN", help="API token.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DEFAULT_SERVER = "http://127.0.0.1:8080"


def client(server: str, token: str) -> Any:
    """An httpx client for ``server`` carrying ``token``."""
    import httpx

    return httpx.Client(base_url=server, headers={"Authorization": f"Bearer {token}"}, timeout=60.0)


def call(server: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON answer of one API call; exits 1 naming the server's reason on a refusal."""
    import httpx

    try:
        with client(server, token) as http:
            response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach {server}: {exc}")
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        fail(f"{method} {path}: HTTP {response.status_code}: {detail}")
    return response.json()
