"""The CLI's calls to a fleet server's API: the options every such command takes and the one
place that maps HTTP answers to a message and an exit code."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from edgefleet.common import JsonFlag, console, fail, print_json

ServerOpt = Annotated[str, typer.Option(envvar="EDGEFLEET_SERVER", help="Server URL.")]
TokenOpt = Annotated[str, typer.Option(envvar="EDGEFLEET_TOKEN", help="API token.")]
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


@dataclass(frozen=True)
class Api:
    """The server a command calls, its token, and whether it answers in JSON (``--json``)."""

    server: str
    token: str
    json_out: bool

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of one API call (see :func:`call`)."""
        return call(self.server, self.token, method, path, **kwargs)

    def printed_json(self, answer: Any) -> bool:
        """Print ``answer`` as JSON if the command was asked for JSON; True if it was."""
        if self.json_out:
            print_json(answer)
        return self.json_out

    def say(self, answer: Any, line: str) -> None:
        """Print ``answer`` as JSON if asked for, else ``line`` (Rich markup, escaped already)."""
        if not self.printed_json(answer):
            console.print(line)


_API_OPTIONS = [
    inspect.Parameter("server", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_SERVER),
    inspect.Parameter("token", inspect.Parameter.KEYWORD_ONLY, default=""),
    inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False),
]
_API_TYPES = {"server": ServerOpt, "token": TokenOpt, "json_out": JsonFlag}


def api_command(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the ``--server``, ``--token`` and ``--json`` options, which it receives
    as one :class:`Api` in its ``api`` parameter (typer reads the signature made here)."""
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.name != "api"]
    params += [p.replace(annotation=_API_TYPES[p.name]) for p in _API_OPTIONS]

    @functools.wraps(command)
    def with_api(*args: Any, server: str, token: str, json_out: bool, **kwargs: Any) -> None:
        command(*args, api=Api(server, token, json_out), **kwargs)

    with_api.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    with_api.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return with_api
