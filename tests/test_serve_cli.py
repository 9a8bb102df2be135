"""`clusterfuse serve` argument errors: one clear line naming the argument, exit 2, before any loading."""

from __future__ import annotations

import socket

import pytest

from clusterfuse.cli.main import main


@pytest.mark.parametrize(("argv", "named"), [
    (["--port", "70000"], "--port"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--max-request-bytes", "0"], "--max-request-bytes"),
    (["--body-timeout", "0"], "--body-timeout"),
    (["--max-connections", "1"], "--max-connections"),
    (["--body-timeout", "nan"], "--body-timeout"),
    (["--served-model-name", " "], "--served-model-name"),
])
def test_bad_serve_arguments_exit_2(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clusterfuse: error: ") and named in err[0]


def test_port_in_use_fails_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port: cannot listen on 127.0.0.1:{port}" in err and "loading" not in err
