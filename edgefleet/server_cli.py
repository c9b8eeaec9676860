"""Server commands: ``serve`` and ``db upgrade``, and the HTTP clients (publish, release, ...)."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.api import Api, api_command
from edgefleet.bundle_cli import detached_reference
from edgefleet.common import console, fail, literal, print_json, read_file, write_file
from edgefleet.renamed import OldTargetOpt, renamed

#: One hardware id an action on a version is limited to (default: every one it has a bundle for).
OneHardwareOpt = Annotated[
    str | None,
    typer.Option(help="Only this hardware id (default: every one it has a bundle for)."),
]
DataDirOpt = Annotated[Path, typer.Option(envvar="EDGEFLEET_DATA_DIR", help="Data directory.")]
DbOpt = Annotated[
    str | None,
    typer.Option(
        envvar="EDGEFLEET_DATABASE_URL",
        help="postgresql+psycopg://... (default: SQLite in the data directory).",
    ),
]

db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
models_app = typer.Typer(help="Models, versions and bundles in the registry.", no_args_is_help=True)
devices_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens and enrollment tokens.", no_args_is_help=True)
cohorts_app = typer.Typer(help="Device cohorts.", no_args_is_help=True)


def _settings(data_dir: Path, database_url: str | None, **extra: Any) -> Any:
    from server.config import Settings

    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        **{k: v for k, v in extra.items() if v is not None},
    )


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOpt = Path("edgefleet-data"), database_url: DbOpt = None) -> None:
    """Migrate the database to the schema this version of EdgeFleet needs."""
    from server.db import upgrade

    settings = _settings(data_dir, database_url)
    data_dir.mkdir(parents=True, exist_ok=True)
    revision = upgrade(settings.resolved_database_url())
    console.print(f"database at revision {revision}")


def init_trust(data_dir: Path) -> list[str]:
    """Create a local root and keys in ``data_dir`` if absent; returns what was created."""
    from datetime import UTC, datetime, timedelta

    from firmware_bundles import SigningKey, new_root, sign_root

    keys_dir = data_dir / "keys"
    created = []
    keys = {}
    for role in ("root", "release", "director", "hil"):
        path = keys_dir / f"{role}.pem"
        if path.exists():
            keys[role] = SigningKey.from_pem(path.read_bytes())
        else:
            keys[role] = SigningKey.generate()
            write_file(path, keys[role].to_pem(), private=True)
            created.append(str(path))
    root_path = data_dir / "root.json"
    if not root_path.exists():
        root = new_root(
            version=1,
            expires=datetime.now(UTC) + timedelta(days=365),
            role_keys={r: [k.public] for r, k in keys.items()},
            thresholds={},
        )
        write_file(root_path, sign_root(root, [keys["root"]]).to_bytes())
        created.append(str(root_path))
    return created


def serve(
    data_dir: DataDirOpt = Path("edgefleet-data"),
    database_url: DbOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    root: Annotated[
        Path | None, typer.Option(envvar="EDGEFLEET_ROOT_PATH", help="Trusted root.json.")
    ] = None,
    director_key: Annotated[
        Path | None,
        typer.Option(envvar="EDGEFLEET_DIRECTOR_KEY_PATH", help="Director private key."),
    ] = None,
    init: Annotated[
        bool,
        typer.Option(
            "--init",
            help="Create a local root and keys in the data directory if absent (for a first try).",
        ),
    ] = False,
    require_hil_report: Annotated[
        bool,
        typer.Option(
            "--require-hil-report",
            envvar="EDGEFLEET_REQUIRE_HIL_REPORT",
            help="Release a version for a target only if its bundle has a passing rig report.",
        ),
    ] = False,
    min_devices_shown: Annotated[
        int | None,
        typer.Option(
            envvar="EDGEFLEET_MIN_DEVICES_SHOWN",
            help="Figures over fewer devices show 'too few devices' to viewers [default: 5].",
        ),
    ] = None,
    telemetry_retention_days: Annotated[
        int | None,
        typer.Option(
            envvar="EDGEFLEET_TELEMETRY_RETENTION_DAYS",
            help="Drop stored windows older than this (rollups stay) [default: 30].",
        ),
    ] = None,
    rollout_evaluation_s: Annotated[
        float | None,
        typer.Option(
            envvar="EDGEFLEET_ROLLOUT_EVALUATION_S",
            help="Seconds between rollout evaluations [default: 60].",
        ),
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_MLFLOW_URI",
            help="MLflow tracking server (http(s)://): tag the registry's model versions that"
            " bundles' provenance names (docs/webhooks.md).",
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_PUBLIC_URL",
            help="Where users reach this server, for links in MLflow tags [default: http://HOST:PORT].",
        ),
    ] = None,
    webhook_allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Host webhook URLs may name (repeatable; default: any)."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes on the one port (PostgreSQL only; docs/scaling.md).",
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option(help="info logs one JSON line per request.")] = "info",
) -> None:
    """Run the fleet server (SQLite and blobs in the data directory unless --database-url)."""
    import uvicorn

    from server.app import build_state, create_app, ensure_admin_token
    from server.db import make_engine, upgrade
    from server.errors import ConfigError
    from server.workers import (
        LOG_LEVEL_ENV,
        SETTINGS_ENV,
        configure_logging,
        refuse_unless_shared,
        settings_env,
    )
    from server.workers import serve as serve_workers

    data_dir.mkdir(parents=True, exist_ok=True)
    if init:
        for path in init_trust(data_dir):
            console.print(f"created {literal(path)}")
        console.print(
            f"trusted root: {literal(data_dir / 'root.json')}; release key for `edgefleet bundle"
            f" pack --key`: {literal(data_dir / 'keys' / 'release.pem')}"
        )
    settings = _settings(
        data_dir,
        database_url,
        root_path=root,
        director_key_path=director_key,
        require_hil_report=require_hil_report or None,
        min_devices_shown=min_devices_shown,
        telemetry_retention_days=telemetry_retention_days,
        rollout_evaluation_s=rollout_evaluation_s,
        mlflow_uri=mlflow_uri,
        public_url=public_url or f"http://{host}:{port}",
        webhook_allowed_hosts=webhook_allowed_host or None,
    )
    try:
        refuse_unless_shared(settings, workers)
    except ConfigError as exc:
        fail(str(exc), 2)
    url = settings.resolved_database_url()
    if database_url is None and _is_empty(make_engine(url)):
        upgrade(url)  # the embedded default creates its schema on first start
    try:
        state = build_state(settings)
    except ConfigError as exc:
        fail(str(exc), 2)
    token = ensure_admin_token(state)
    if token:
        console.print(f"first start: admin token (shown once) [bold]{literal(token)}[/]")
    configure_logging(log_level)
    console.print(
        f"serving on http://{literal(host)}:{port} (data in {literal(data_dir)})"
        + (f", {workers} worker processes" if workers > 1 else "")
    )
    if workers > 1:
        state.engine.dispose()  # the workers open their own connections
        os.environ[SETTINGS_ENV] = settings_env(settings)
        os.environ[LOG_LEVEL_ENV] = log_level
        serve_workers(host, port, workers, log_level="warning")
        return
    app = create_app(state, freeze_when_settled=True)
    # What start-up allocated (app, routes, schemas, trust material) lives as long as the process:
    # move it out of the collector's view so collections under load scan only request garbage
    # (and what the first seconds add, once they have passed: create_app).
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _is_empty(engine: Any) -> bool:
    from sqlalchemy import inspect

    return not inspect(engine).get_table_names()


# -- clients ------------------------------------------------------------------------------------


@api_command
def publish(
    bundle: Annotated[list[Path], typer.Argument(help="Bundle file(s).")],
    hil_report: Annotated[
        Path | None,
        typer.Option(
            help="Signed rig report (edgefleet hil run --report DIR writes DIR/report.json) to"
            " attach to each bundle; servers started with --require-hil-report release only"
            " bundles whose report passes on their target."
        ),
    ] = None,
    *,
    api: Api,
) -> None:
    """Upload bundles; the server verifies each against its trusted root and catalogue.

    A bundle that detaches its reference histograms (rings) is uploaded with the
    ``.reference.bin`` file beside it.
    """
    report = None if hil_report is None else read_file(hil_report, "HIL report")
    results = []
    for p in bundle:
        data = read_file(p, "bundle")
        reference = detached_reference(p, data)
        result = api.call(
            "POST",
            "/v1/bundles",
            content=data,
            headers={"Content-Type": "application/x-tar"},
        )
        if reference is not None:
            result["reference"] = api.call(
                "POST",
                f"/v1/bundles/{result['sha256']}/reference",
                content=reference,
                headers={"Content-Type": "application/octet-stream"},
            )
        if report is not None:
            result["hil"] = api.call(
                "POST",
                f"/v1/bundles/{result['sha256']}/hil-report",
                content=report,
                headers={"Content-Type": "application/json"},
            )
        results.append(result)
    if api.printed_json(results):
        return
    for r in results:
        console.print(
            f"published {literal(r['model'])} {literal(r['version'])}"
            f" for {literal(r['target_id'])}: {literal(r['sha256'])}"
        )
        if "reference" in r:
            console.print(
                f"  detached reference uploaded ({r['reference']['inputs']} input and"
                f" {r['reference']['outputs']} output histograms)"
            )
        if "hil" in r:
            verdict = "passes" if r["hil"]["passed"] else "does NOT pass"
            console.print(f"  HIL report attached ({literal(r['hil']['runs'])} run(s)): {verdict}")


def _on_version(
    api: Api,
    model: str,
    version: str,
    action: str,
    body: dict[str, Any] | None,
    said: Callable[[Any], str],
) -> None:
    """POST an action on a model version and print its answer (JSON, or a line)."""
    r = api.call("POST", f"/v1/models/{model}/versions/{version}/{action}", json=body)
    api.say(r, f"{literal(model)} {literal(version)}: {said(r)}")


@api_command
def release(
    model: str,
    version: str,
    hardware_id: OneHardwareOpt = None,
    target: OldTargetOpt = None,
    *,
    api: Api,
) -> None:
    """Make a published version current (publishing alone assigns nothing)."""
    _on_version(
        api,
        model,
        version,
        "release",
        {"target": renamed(hardware_id, target, "--hardware-id", "--target")},
        lambda r: f"released for {literal(', '.join(r['released_for']))}",
    )


@api_command
def withdraw(model: str, version: str, *, api: Api) -> None:
    """Stop assigning a version; its devices get the previous released version."""
    _on_version(api, model, version, "withdraw", None, lambda r: "withdrawn")


@api_command
def confirm(
    model: str,
    version: str,
    hardware_id: OneHardwareOpt = None,
    *,
    api: Api,
) -> None:
    """Confirm a version: devices that ran it never go below it again (docs/rollback.md)."""
    _on_version(
        api,
        model,
        version,
        "confirm",
        {"hardware_id": hardware_id},
        lambda r: (
            f"confirmed (release counter {literal(r['release_counter'])}) for"
            f" {literal(', '.join(r['confirmed_for']))}"
        ),
    )


@api_command
def pin(
    device: str,
    model: str,
    version: Annotated[str, typer.Argument(help="Version, or 'none' to unpin.")],
    *,
    api: Api,
) -> None:
    """Hold one device on a version of a model."""
    r = api.call(
        "PUT",
        f"/v1/devices/{device}/pins/{model}",
        json={"version": None if version == "none" else version},
    )
    api.say(r, f"pinned {literal(device)} to {literal(model)} {literal(version)}")


@models_app.command("list")
@api_command
def models_list(*, api: Api) -> None:
    models = api.call("GET", "/v1/models")
    if api.printed_json(models):
        return
    table = Table("model", "version", "counter", "released for", "bundles", "withdrawn")
    for m in models:
        for v in m["versions"]:
            table.add_row(
                literal(m["name"]),
                literal(v["version"]),
                literal(v["release_counter"]),
                literal(", ".join(v["released_for"])),
                literal(", ".join(b["target_id"] for b in v["bundles"])),
                literal(v["withdrawn"]),
            )
    console.print(table)


@models_app.command("show")
@api_command
def models_show(name: str, *, api: Api) -> None:
    print_json(api.call("GET", f"/v1/models/{name}"))


@devices_app.command("list")
@api_command
def devices_list(*, api: Api) -> None:
    devices = api.call("GET", "/v1/devices")
    if api.printed_json(devices):
        return
    table = Table("device", "hardware id", "firmware", "relay", "last seen", "revoked")
    for d in devices:
        table.add_row(
            literal(d["id"]),
            literal(d["hardware_id"]),
            literal(d["firmware_version"]),
            literal(d["relay_id"] or ""),
            literal(d["last_seen"] or "never"),
            literal(d["revoked"]),
        )
    console.print(table)


@devices_app.command("show")
@api_command
def devices_show(device: str, *, api: Api) -> None:
    print_json(api.call("GET", f"/v1/devices/{device}"))


@devices_app.command("revoke")
@api_command
def devices_revoke(device: str, *, api: Api) -> None:
    r = api.call("POST", f"/v1/devices/{device}/revoke")
    api.say(r, f"revoked {literal(device)}")


@tokens_app.command("create")
@api_command
def tokens_create(
    name: str,
    role: Annotated[str, typer.Option(help="admin, publisher, operator or viewer.")],
    *,
    api: Api,
) -> None:
    """Create an API token (printed once)."""
    r = api.call("POST", "/v1/tokens", json={"name": name, "role": role})
    api.say(r, f"token {literal(r['id'])} ({literal(role)}): {literal(r['token'])}")


@tokens_app.command("revoke")
@api_command
def tokens_revoke(token_id: int, *, api: Api) -> None:
    r = api.call("DELETE", f"/v1/tokens/{token_id}")
    api.say(r, f"revoked token {literal(token_id)}")


@tokens_app.command("enroll")
@api_command
def tokens_enroll(
    cohort: Annotated[str | None, typer.Option(help="Cohort to join.")] = None,
    max_uses: Annotated[int, typer.Option(help="Devices it may enroll.")] = 1,
    ttl_s: Annotated[int | None, typer.Option(help="Seconds it stays valid.")] = None,
    *,
    api: Api,
) -> None:
    """Create a device enrollment token."""
    r = api.call(
        "POST",
        "/v1/enrollment-tokens",
        json={"cohort": cohort, "max_uses": max_uses, "ttl_s": ttl_s},
    )
    api.say(r, f"enrollment token: {literal(r['token'])}")


@cohorts_app.command("create")
@api_command
def cohorts_create(
    name: str,
    member: Annotated[list[str] | None, typer.Option(help="Device id (repeatable).")] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            help="Filter KEY=VALUE: generation, platform, hardware_id, firmware_min,"
            " firmware_below."
        ),
    ] = None,
    *,
    api: Api,
) -> None:
    """Create a cohort of static members and/or an attribute filter."""
    flt = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--where {item!r}: expected KEY=VALUE", 2)
        flt[key] = value
    r = api.call(
        "POST", "/v1/cohorts", json={"name": name, "filter": flt or None, "members": member or []}
    )
    api.say(r, f"created cohort {literal(name)}")


@cohorts_app.command("list")
@api_command
def cohorts_list(*, api: Api) -> None:
    cohorts = api.call("GET", "/v1/cohorts")
    if api.printed_json(cohorts):
        return
    for c in cohorts:
        console.print(
            f"{literal(c['name'])}: {len(c['devices'])} devices, filter {literal(c['filter'])}"
        )


def register(app: typer.Typer) -> None:
    """Mount the server commands on the ``edgefleet`` app."""
    app.command("serve")(serve)
    app.command("publish")(publish)
    app.command("release")(release)
    app.command("withdraw")(withdraw)
    app.command("confirm")(confirm)
    app.command("pin")(pin)
    app.add_typer(db_app, name="db")
    app.add_typer(models_app, name="models")
    app.add_typer(devices_app, name="devices")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(cohorts_app, name="cohorts")
