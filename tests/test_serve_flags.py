"""`flexmerge serve` checks its flags and its port before it loads or merges anything: a bad
flag or a busy port is one line and exit 2 at once (the artifact here does not even exist)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from flexmerge.cli import app

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
runner = CliRunner()


@pytest.mark.parametrize("flags,message", [
    (["--batch-wait-ms", "inf"], "--batch-wait-ms must be from 0 to 10000 milliseconds, got inf"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms must be from 0 to 10000 milliseconds, got nan"),
    (["--batch-wait-ms", "1e308"], "--batch-wait-ms must be from 0 to 10000 milliseconds, got 1e+308"),
    (["--max-batch", "0"], "--max-batch must be a whole number from 1 to 4096, got 0"),
    (["--port", "70000"], "--port must be from 1 to 65535, got 70000"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid': not an address of this machine"),
])
def test_bad_flags_fail_before_the_artifact_is_read(tmp_path, flags, message):
    r = runner.invoke(app, ["serve", str(tmp_path / "missing"), *flags])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output


def test_a_busy_port_fails_before_the_artifact_is_read(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(app, ["serve", str(tmp_path / "missing"), "--port", str(port)])
    assert r.exit_code == 2, r.output
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(r.output.split())
    assert "missing" not in r.output  # the artifact was never looked at
