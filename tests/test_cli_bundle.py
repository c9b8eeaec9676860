"""The keys, root and bundle commands as a user runs them: outputs, exit codes, clear errors."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from tests.conftest import MODEL_BYTES, manifest_draft

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("root", "rel1", "rel2", "dir", "hil"):
        code, out = run("keys", "generate", "--out", f"{name}.pem")
        assert code == 0, out
    code, out = run(
        "root",
        "init",
        "--out",
        "root.json",
        "--root-key",
        "root.pem",
        "--release-key",
        "rel1.pem.pub",
        "--release-key",
        "rel2.pem.pub",
        "--director-key",
        "dir.pem.pub",
        "--hil-key",
        "hil.pem.pub",
        "--threshold",
        "release=2",
    )
    assert code == 0, out
    Path("model.onnx").write_bytes(MODEL_BYTES)
    Path("draft.json").write_text(json.dumps(manifest_draft()))
    return tmp_path


def pack_args(
    *keys: str, manifest: str = "draft.json", file: str = "model.onnx", out: str = "b.efb"
) -> list[str]:
    """`bundle pack` of ``manifest`` and ``file``, signed with ``keys``, to ``out``."""
    key_args = [a for k in keys for a in ("--key", k)]
    return ["bundle", "pack", "--manifest", manifest, "--file", file, *key_args, "--out", out]


def pack(*keys: str, out: str = "b.efb") -> tuple[int, str]:
    return run(*pack_args(*keys, out=out))


def test_private_key_is_0600(workspace: Path) -> None:
    assert stat.S_IMODE(os.stat("rel1.pem").st_mode) == 0o600


def test_keys_generate_refuses_to_overwrite(workspace: Path) -> None:
    code, out = run("keys", "generate", "--out", "rel1.pem")
    assert code == 2 and "exists; pass --force" in out


def test_pack_sign_inspect_verify(workspace: Path) -> None:
    assert pack("rel1.pem")[0] == 0
    code, out = run("bundle", "verify", "b.efb", "--root", "root.json")
    assert code == 1
    assert "signature threshold not met for role release: 1 of 2" in out
    code, out = run("bundle", "sign", "b.efb", "--key", "rel2.pem", "--out", "b2.efb", "--json")
    assert code == 0
    signed = json.loads(out)
    assert signed["sha256"] != json.loads(run("bundle", "inspect", "b.efb", "--json")[1])["sha256"]
    # --target, the spelling --hardware-id had before, still works.
    code, out = run(
        "bundle", "verify", "b2.efb", "--root", "root.json", "--json", "--target", "phone-android"
    )
    assert code == 0, out
    report = json.loads(out)
    assert report["ok"] is True and report["sha256"] == signed["sha256"]
    assert len(report["release_keys"]) == 2
    code, out = run("bundle", "inspect", "b2.efb", "--json")
    assert json.loads(out)["manifest"]["name"] == "wrist-activity"


def test_verify_for_a_target_it_was_not_built_for(workspace: Path) -> None:
    pack("rel1.pem", "rel2.pem")
    code, out = run(
        "bundle", "verify", "b.efb", "--root", "root.json", "--hardware-id", "ring-gen3"
    )
    assert code == 1 and "not for ring-gen3" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["bundle", "verify", "missing.efb", "--root", "root.json"],
            "bundle missing.efb does not exist",
        ),
        (["bundle", "verify", "draft.json", "--root", "root.json"], "not a bundle archive"),
        (["bundle", "verify", "model.onnx", "--root", "draft.json"], "invalid root"),
        (pack_args("rel1.pem", manifest="model.onnx", out="x.efb"), "not valid JSON"),
        (pack_args("rel1.pem.pub", out="x.efb"), "not a PEM private key"),
        (pack_args("rel1.pem", file="nope.onnx", out="x.efb"), "file nope.onnx does not exist"),
        (["root", "init", "--out", "r.json", "--root-key", "root.pem"], "no keys for role"),
        (
            [
                "root",
                "init",
                "--out",
                "r.json",
                "--root-key",
                "root.pem",
                "--release-key",
                "rel1.pem",
                "--director-key",
                "dir.pem",
                "--hil-key",
                "hil.pem",
                "--threshold",
                "release=3",
            ],
            "threshold 3 exceeds",
        ),
    ],
    ids=[
        "missing-bundle",
        "not-a-bundle",
        "root-not-a-root",
        "draft-not-json",
        "public-key-to-sign",
        "missing-file",
        "root-without-roles",
        "threshold-too-high",
    ],
)
def test_bad_input_gets_a_clear_error(workspace: Path, args: list[str], message: str) -> None:
    code, out = run(*args)
    assert code != 0
    assert message in out


def test_pack_without_build_time_says_how_to_give_one(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    draft = manifest_draft()
    del draft["created_at"]
    Path("draft.json").write_text(json.dumps(draft))
    code, out = pack("rel1.pem")
    assert code == 2 and "SOURCE_DATE_EPOCH" in out


def test_root_rotate_and_verify_chain(workspace: Path) -> None:
    run("keys", "generate", "--out", "root2.pem")
    code, out = run(
        "root",
        "rotate",
        "root.json",
        "--out",
        "2.root.json",
        "--root-key",
        "root2.pem",
        "--sign-key",
        "root2.pem",
    )
    assert code == 0 and "not yet accepted" in out
    code, out = run("root", "verify", "--trusted", "root.json", "2.root.json")
    assert code == 1 and "role root: 0 of 1" in out
    assert run("root", "sign", "2.root.json", "--key", "root.pem")[0] == 0
    code, out = run("root", "verify", "--trusted", "root.json", "2.root.json", "--json")
    assert code == 0 and json.loads(out)["version"] == 2


def test_help_explains_each_command() -> None:
    for group in ("keys", "root", "bundle"):
        proc = subprocess.run(
            [sys.executable, "-m", "edgefleet", group, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        assert "Commands" in proc.stdout


def test_demo_short_mode_runs(tmp_path: Path) -> None:
    """The walk behind `make walkthrough`, in its short mode, so it cannot silently break."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "demo" / "run_demo.py"),
            "--short",
            "--out",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical to digits.efb: True" in proc.stdout
    assert "built and verified" in proc.stdout
    assert "not for ring-gen4" in proc.stdout
    # The converter part: the wearable CNN's ring bundle verified for the ring.
    assert "wearable-demo 1.0.0" in proc.stdout and "fits ring-gen3" in proc.stdout
    # The fleet part: every inference made, online and offline, counted once on the server.
    made = re.search(
        r"telemetry on the server: (\d+) inferences of \S+ 1.0.0 \(the agent made (\d+)",
        proc.stdout,
    )
    assert made and made.group(1) == made.group(2), proc.stdout[-3000:]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `edgefleet` in a subprocess (Rich markup errors surface only in a real console)."""
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"},
        timeout=120,
    )


MARKUP_NAMES = ["a[/b]", "[bold]x[/bold]"]


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_names_from_a_bundle_are_printed_literally(workspace: Path, command: str) -> None:
    """A file called ``a[/b]`` and a metric called ``[bold]x[/bold]`` are text, not markup."""
    from firmware_bundles import SigningKey, build

    keys = [SigningKey.from_pem(Path(f"rel{i}.pem").read_bytes()) for i in (1, 2)]
    draft = manifest_draft(metrics={"accuracy": 0.9, "[bold]x[/bold]": 1.0})
    data = build(draft, {"model.onnx": MODEL_BYTES, "a[/b]": b"x"}, keys)
    Path("odd.efb").write_bytes(data)
    args = ["--root", "root.json"] if command == "verify" else []
    proc = _cli("bundle", command, "odd.efb", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    if command == "inspect":
        for name in MARKUP_NAMES:
            assert name in proc.stdout, proc.stdout


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_refusal_naming_a_markup_member_is_printed_literally(workspace: Path, command: str) -> None:
    """The error for an unlisted member ``[bold]x[/bold]`` shows the name as it is, exit 1."""
    import io
    import tarfile

    assert pack("rel1.pem", "rel2.pem")[0] == 0
    buf = io.BytesIO(Path("b.efb").read_bytes())
    with tarfile.open(fileobj=buf, mode="a", format=tarfile.USTAR_FORMAT) as tar:
        for name in MARKUP_NAMES:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    Path("bad.efb").write_bytes(buf.getvalue())
    args = ["--root", "root.json"] if command == "verify" else []
    proc = _cli("bundle", command, "bad.efb", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert "member 'a[/b]' is not listed in the manifest" in proc.stderr, proc.stderr
