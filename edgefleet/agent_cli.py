"""``edgefleet agent``: run the device agent, and ask a running one for its status or a prediction.

``run`` takes every :class:`device_agent.config.AgentSettings` field as an option (or its
``EDGEFLEET_AGENT_*`` variable); ``status``, ``predict`` and ``label`` talk to the running agent
through the Unix socket in its state dir. The device packages are imported inside the commands, so
the rest of the CLI works without the ``device`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.common import JsonFlag, console, fail, literal, print_json, read_file
from edgefleet.renamed import OldAgentTargetOpt, renamed

agent_app = typer.Typer(
    help="The device agent: pull, verify, install, run offline, report late.",
    no_args_is_help=True,
)

_ENV = "EDGEFLEET_AGENT_"
StateDirOpt = Annotated[
    Path,
    typer.Option(envvar=f"{_ENV}STATE_DIR", help="The agent's state dir (its socket is in it)."),
]
#: Where ``status`` and ``predict`` look when no state dir is given.
DEFAULT_STATE_DIR = Path("edgefleet-agent")


def _opt(name: str, help: str, *aliases: str) -> Any:
    """An option for the AgentSettings field ``name``, with its environment variable."""
    flags = aliases or (f"--{name.replace('_', '-')}",)
    return typer.Option(*flags, envvar=f"{_ENV}{name.upper()}", help=help, show_default=False)


@agent_app.command("run")
def run_command(
    server_url: Annotated[str | None, _opt("server_url", "Fleet server URL.", "--server")] = None,
    enroll_token: Annotated[
        str | None, _opt("enroll_token", "Enrollment token (first start only).")
    ] = None,
    root_path: Annotated[
        Path | None, _opt("root_path", "Pinned root.json, provisioned out of band.", "--root")
    ] = None,
    state_dir: Annotated[
        Path | None, _opt("state_dir", f"State dir (default: ./{DEFAULT_STATE_DIR}).")
    ] = None,
    hardware_id: Annotated[
        str | None, _opt("hardware_id", "Hardware id: a catalogue target (phone-android, ...).")
    ] = None,
    device_id: Annotated[
        str | None, _opt("device_id", "Device id (default: generated once, persisted).")
    ] = None,
    firmware_version: Annotated[
        str | None, _opt("firmware_version", "Firmware version (default: the target's minimum).")
    ] = None,
    free_flash_bytes: Annotated[
        int | None, _opt("free_flash_bytes", "Free flash (default: twice the target's bundle cap).")
    ] = None,
    free_ram_bytes: Annotated[
        int | None, _opt("free_ram_bytes", "Free RAM (default: the target's RAM arena).")
    ] = None,
    check_in_interval_s: Annotated[
        float | None, _opt("check_in_interval_s", "Seconds between check-ins (default: 300).")
    ] = None,
    check_in_jitter: Annotated[
        float | None, _opt("check_in_jitter", "Random spread of waits, a fraction (default 0.2).")
    ] = None,
    backoff_initial_s: Annotated[
        float | None, _opt("backoff_initial_s", "First wait while offline, seconds (default 1).")
    ] = None,
    backoff_max_s: Annotated[
        float | None, _opt("backoff_max_s", "Longest wait while offline, seconds (default 300).")
    ] = None,
    http_timeout_s: Annotated[
        float | None, _opt("http_timeout_s", "Timeout of one HTTP request, seconds (default 10).")
    ] = None,
    stall_timeout_s: Annotated[
        float | None,
        _opt("stall_timeout_s", "A download with no bytes this long fails (default 30)."),
    ] = None,
    download_deadline_s: Annotated[
        float | None, _opt("download_deadline_s", "Longest one download may take (default 600).")
    ] = None,
    max_download_attempts: Annotated[
        int | None, _opt("max_download_attempts", "Attempts per download (default 5).")
    ] = None,
    max_interrupted_installs: Annotated[
        int | None,
        _opt(
            "max_interrupted_installs",
            "Crashed self-tests before a bundle counts failed (default 3).",
        ),
    ] = None,
    unmetered_only: Annotated[
        bool | None, _opt("unmetered_only", "Download on unmetered networks only (default off).")
    ] = None,
    charging_only: Annotated[
        bool | None, _opt("charging_only", "Download while charging only (default off).")
    ] = None,
    telemetry_window_s: Annotated[
        int | None, _opt("telemetry_window_s", "Telemetry window, seconds (default 3600).")
    ] = None,
    telemetry_flush_every: Annotated[
        int | None,
        _opt("telemetry_flush_every", "Inferences buffered before a flush (default 256)."),
    ] = None,
    outbox_max_bytes: Annotated[
        int | None, _opt("outbox_max_bytes", "Telemetry outbox size cap (default 16 MiB).")
    ] = None,
    upload_batch_windows: Annotated[
        int | None, _opt("upload_batch_windows", "Windows per telemetry upload (default 50).")
    ] = None,
    ort_threads: Annotated[
        int | None, _opt("ort_threads", "ONNX Runtime intra-op threads (default 1).")
    ] = None,
    shadow_queue_size: Annotated[
        int | None,
        _opt("shadow_queue_size", "Sampled calls waiting for a shadow candidate (default 64)."),
    ] = None,
    shadow_seed: Annotated[
        int | None, _opt("shadow_seed", "Seed of the shadow sampling (default: random).")
    ] = None,
    label_max_age_s: Annotated[
        float | None,
        _opt("label_max_age_s", "Oldest prediction a late label may name, s (default 30 days)."),
    ] = None,
    label_clock_skew_s: Annotated[
        float | None,
        _opt("label_clock_skew_s", "How far ahead a labelled prediction may lie, s (default 300)."),
    ] = None,
    test_clock_offset_s: Annotated[
        float | None,
        _opt(
            "test_clock_offset_s",
            "End-to-end tests only: run the agent's clock this many seconds off the system's.",
        ),
    ] = None,
    test_pause_at: Annotated[
        str | None,
        _opt(
            "test_pause_at",
            "Crash tests only: freeze at an install step (download, written, fsynced, switched,"
            " self-tested) after writing <state-dir>/paused-at-<step>.",
        ),
    ] = None,
    target: OldAgentTargetOpt = None,
) -> None:
    """Enroll once, then check in, install, serve predictions and upload telemetry until stopped.

    Logs one JSON line per event on stderr; SIGTERM or Ctrl-C stops it cleanly.
    """
    from pydantic import ValidationError

    from device_agent.config import AgentSettings
    from device_agent.errors import AgentError
    from device_agent.runner import run

    # Options not given stay unset, so AgentSettings applies its own defaults (click has already
    # read the EDGEFLEET_AGENT_* variables into the options).
    hardware_id = renamed(hardware_id, target, "--hardware-id", "--target")
    given = {k: v for k, v in locals().items() if k in AgentSettings.model_fields and v is not None}
    given.setdefault("state_dir", DEFAULT_STATE_DIR)
    try:
        settings = AgentSettings(**given)
    except ValidationError as exc:
        fail(_settings_error(exc), 2)
    try:
        code = run(settings)
    except AgentError as exc:
        fail(str(exc))
    raise typer.Exit(code)


#: How a settings field is spelt on the command line, where it is not ``--field-name``.
_FLAGS = {"server_url": "--server", "root_path": "--root"}


def _settings_error(exc: Any) -> str:
    """A pydantic ValidationError as one line per field, naming the option and variable."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        flag = _FLAGS.get(field, f"--{field.replace('_', '-')}")
        if error["type"] == "missing":
            lines.append(f"missing {flag} (or {_ENV}{field.upper()})")
        elif field:
            lines.append(f"{flag}: {error['msg']}")
        else:
            lines.append(error["msg"].removeprefix("Value error, "))
    return "; ".join(lines)


def _client(state_dir: Path) -> Any:
    from device_agent.local_api import LocalApiClient, socket_path

    return LocalApiClient(socket_path(state_dir))


def _call(state_dir: Path, method: str, *args: Any) -> Any:
    from device_agent.local_api import LocalApiError

    try:
        return getattr(_client(state_dir), method)(*args)
    except LocalApiError as exc:
        fail(exc.message)


@agent_app.command("status")
def status_command(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    json_out: JsonFlag = False,
) -> None:
    """What a running agent has installed, when it last checked in, and its telemetry backlog."""
    status = _call(state_dir, "status")
    if json_out:
        print_json(status)
        return
    overview = Table("", "", show_header=False, box=None)
    for key in ("device_id", "target_id", "server_url", "last_check_in", "last_error"):
        if key in status:
            overview.add_row(key.replace("_", " "), _text(status[key]))
    for key, value in sorted((status.get("outbox") or {}).items()):
        overview.add_row(f"outbox {key.replace('_', ' ')}", _text(value))
    console.print(overview)
    models = Table("model", "version", "active slot", "sha256", "counter", "last install", "error")
    for name, m in sorted((status.get("models") or {}).items()):
        bundle_sha256 = m.get("sha256") or m.get("bundle_sha256") or ""
        models.add_row(
            literal(name),
            _text(m.get("version")),
            _text(m.get("active_slot", m.get("active"))),
            literal(bundle_sha256[:12]),
            _text(m.get("release_counter")),
            _text(m.get("last_install")),
            _text(m.get("last_error")),
        )
    console.print(models if models.row_count else "no models installed yet")


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return literal(json.dumps(value, default=str))
    return literal(value)


def _read_inputs(path: Path) -> Any:
    """Inputs from a .json file (nested lists, or {input name: nested lists}) or a .npy file."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npy"):
        fail(f"input file {path}: expected a .json or .npy file, got {suffix or 'no extension'}", 2)
    data = read_file(path, "input file")
    if suffix == ".json":
        try:
            value = json.loads(data)
        except ValueError as exc:
            fail(f"input file {path} is not valid JSON: {exc}", 2)
        if not isinstance(value, list | dict):
            fail(f"input file {path}: expected a list or an object of inputs by name", 2)
        return value
    import io

    import numpy as np

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        fail(f"input file {path} is not a readable .npy array: {exc}", 2)
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        fail(f"input file {path}: expected a numeric array, got dtype {array.dtype}", 2)
    return array


@agent_app.command("predict")
def predict_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    input_file: Annotated[
        Path, typer.Option("--input", help="Inputs: .json (lists, or by input name) or .npy.")
    ],
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    json_out: JsonFlag = False,
) -> None:
    """Run one prediction on a running agent's active model (works offline)."""
    inputs = _read_inputs(input_file)
    outputs = _call(state_dir, "predict", model, inputs)
    if json_out:
        print_json(outputs)
        return
    table = Table("output", "values")
    for name, value in outputs.items():
        table.add_row(literal(name), literal(json.dumps(value)))
    console.print(table)


@agent_app.command("label")
def label_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    label: Annotated[str, typer.Argument(help="The true label (a class of the model).")],
    predicted: Annotated[
        str | None, typer.Option("--predicted", help="What the model predicted, if known.")
    ] = None,
    predicted_at: Annotated[
        str | None,
        typer.Option(
            "--predicted-at",
            help="When the prediction was made: ISO 8601 with its UTC offset"
            " (2026-05-01T12:00:00Z). With --version.",
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="The model version that made the prediction."),
    ] = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Count a late ground-truth label on a running agent.

    With --predicted-at and --version it counts for that version's window of that time, even
    after the device switched versions; without them, in the active version's current window.
    """
    if (predicted_at is None) != (version is None):
        fail("--predicted-at and --version go together (or neither, for the current window)", 2)
    _call(state_dir, "label", model, label, predicted, predicted_at, version)
    console.print(f"label {label!r} counted for {model} {version or '(active version)'}")
