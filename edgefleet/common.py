"""Shared CLI plumbing: file reading with clear errors, JSON output, error exits."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import typer
from rich.console import Console
from rich.markup import escape

from device_agent.fsutil import write_atomic
from firmware_bundles import BundleError, SigningKey

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

#: Exit code when verification or validation fails (usage errors exit 2, as with click).
EXIT_FAILED = 1

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def literal(value: object) -> str:
    """``value`` as text that Rich prints as it is, never as markup.

    Everything that comes from a bundle, a server, a device or a file goes through this before
    it reaches Rich: a member named ``a[/b]`` is a closing tag to Rich, and crashes it.
    """
    return escape(str(value))


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``; ``message`` is plain text."""
    err_console.print(f"[bold red]error:[/] {literal(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def read_file(path: Path, what: str) -> bytes:
    """Read a file, exiting with a message naming ``what`` if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        _cannot_read(path, what, exc)


def _cannot_read(path: Path, what: str, exc: OSError) -> NoReturn:
    """Exit with a message naming ``what`` and why ``path`` could not be read."""
    if isinstance(exc, FileNotFoundError):
        fail(f"{what} {path} does not exist", 2)
    if isinstance(exc, IsADirectoryError):
        fail(f"{what} {path} is a directory", 2)
    fail(f"cannot read {what} {path}: {exc.strerror}", 2)


class Feedable(Protocol):
    """A reader that takes a file in pieces (``firmware_bundles.BundleReader``)."""

    def wants(self) -> int: ...

    def feed(self, data: bytes) -> None: ...


def feed_file(path: Path, what: str, reader: Feedable) -> None:
    """Feed a file to ``reader`` in the pieces it asks for, never holding the whole file.

    The reader refuses a header over a cap before the member behind it is read, so a file that
    claims or holds hundreds of megabytes costs a piece's worth of memory. Its errors propagate;
    a file that cannot be read exits with a message naming ``what``.
    """
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(reader.wants()):
                reader.feed(chunk)
    except OSError as exc:
        _cannot_read(path, what, exc)


def write_file(path: Path, data: bytes, *, private: bool = False, force: bool = True) -> None:
    """Write a file atomically (temp file and rename); ``private`` files get mode 0600."""
    if path.exists() and not force:
        fail(f"{path} exists; pass --force to overwrite it", 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, 0o600 if private else 0o644)


def load_signing_key(path: Path) -> SigningKey:
    """Load a private key file, exiting with a clear message if it is missing or not a key."""
    data = read_file(path, "key file")
    try:
        return SigningKey.from_pem(data)
    except BundleError as exc:
        fail(f"{path}: {exc}", 2)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout (machine-readable, no colour)."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def bundle_errors(prefix: str = "") -> Iterator[None]:
    """Turn our format errors into a one-line message and exit code 1."""
    try:
        yield
    except BundleError as exc:
        fail(f"{prefix}{exc}")
