"""The ``edgefleet`` command: each package's sub-commands under one roof."""

from __future__ import annotations

import typer

from edgefleet.agent_cli import agent_app
from edgefleet.bundle_cli import bundle_app
from edgefleet.convert_cli import convert_command
from edgefleet.hil_cli import hil_app
from edgefleet.keys_cli import keys_app, root_app
from edgefleet.lineage_cli import lineage_command
from edgefleet.metrics_cli import drift_command, metrics_command
from edgefleet.rollout_cli import rollout_app
from edgefleet.server_cli import register as register_server
from edgefleet.webhooks_cli import webhooks_app

app = typer.Typer(
    name="edgefleet",
    help="Put ML models onto fleets of small devices: convert, sign, roll out, watch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(root_app, name="root")
app.add_typer(bundle_app, name="bundle")
app.command("convert")(convert_command)
app.command("metrics")(metrics_command)
app.command("drift")(drift_command)
app.command("lineage")(lineage_command)
register_server(app)
app.add_typer(rollout_app, name="rollout")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(agent_app, name="agent")
app.add_typer(hil_app, name="hil")


def main() -> None:
    """Entry point of the ``edgefleet`` console script."""
    app()


if __name__ == "__main__":
    main()
