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
    (["--max-connections", "0"], "--max-connections must be a whole number from 1 to 100000, got 0"),
    (["--request-timeout-s", "inf"], "--request-timeout-s must be above 0 and at most 600 seconds, got inf"),
    (["--request-timeout-s", "0"], "--request-timeout-s must be above 0 and at most 600 seconds, got 0.0"),
    (["--allowed-host", "evil.example/path"], "--allowed-host 'evil.example/path': expected a host name or address"),
    (["--allowed-host", "a.*.example"], "--allowed-host 'a.*.example': expected a host name or address"),
    (["--max-inputs", "4096", "--max-chars", "100000"], "--max-inputs 4096 x --max-chars 100000 admits request "
                                                         "bodies of 4688 MiB; at most 256 MiB"),
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


def test_more_connections_than_the_descriptor_limit_allows_fail_before_loading(tmp_path):
    """Under `ulimit -n 256` the default cap shrinks to fit (256 - 64 kept in reserve); a cap asked
    for beyond it is one line and exit 2, before the (missing) artifact is looked at."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    r = subprocess.run([sys.executable, "-m", "flexmerge", "serve", str(tmp_path / "missing"), "--max-connections",
                        "500"], capture_output=True, text=True, preexec_fn=limit, timeout=60)
    assert r.returncode == 2, r.stderr
    assert ("--max-connections 500 needs 564 file descriptors, and this process may open 256 (ulimit -n)"
            in " ".join(r.stderr.split())), r.stderr
    from flexmerge.serve.limits import check_connections

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = 1000 if hard == resource.RLIM_INFINITY else min(1000, hard - 64)
    assert check_connections(None, 15) == room  # the default, raising the soft limit if need be
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] in (resource.RLIM_INFINITY, max(soft, room + 64))
