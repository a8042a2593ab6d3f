"""Faults: killed conversions, full disks, stalled and vanishing clients."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flm.errors import FlmFormatError
from flm.format.flm import read_flm


def test_killed_convert_leaves_previous_output(tmp_path, tiny_dir):
    target = tmp_path / "model.flm"
    target.write_bytes(b"previous contents")
    for delay in (0.5, 1.5, 2.5, 4.0):
        proc = subprocess.Popen([sys.executable, "-m", "flm.cli", "convert", str(tiny_dir), "-o", str(target),
                                 "--dtype", "int4", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        contents = target.read_bytes()
        if contents != b"previous contents":  # the rename happened: then the file is complete
            assert read_flm(target).tensors
            target.write_bytes(b"previous contents")
    with pytest.raises(FlmFormatError):
        read_flm(target)


def test_disk_full_is_reported_cleanly(tmp_path, tiny_dir, monkeypatch, capsys):
    import flm.format.flm as flm_format

    real_write = flm_format.FlmWriter.write_tensor
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(flm_format.FlmWriter, "write_tensor", failing)
    from flm.cli import main

    assert main(["convert", str(tiny_dir), "-o", str(tmp_path / "full.flm"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # neither the target nor a partial file


@pytest.mark.slow
def test_server_survives_stalled_and_vanishing_clients(tmp_path):
    import httpx

    from flm import llm
    from flm.builtin import smollm2_flm
    from flm.server.app import ServerConfig, create_app
    from test_server import RunningServer, _free_port

    running = RunningServer(create_app(llm.model(smollm2_flm("float32")), ServerConfig("smollm2")), _free_port())
    try:
        stalled = socket.create_connection(("127.0.0.1", running.port))
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 500\r\n\r\n{\"prompt\": \"hel")  # then nothing more
        half = socket.create_connection(("127.0.0.1", running.port))
        half.sendall(b"POST /v1/chat/compl")  # not even the headers
        reply = httpx.post(running.url + "/v1/completions", json={"prompt": "The capital of France is",
                                                                  "max_tokens": 4, "temperature": 0}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        stalled.close()
        half.close()
        reply = httpx.get(running.url + "/v1/models", timeout=10)
        assert reply.status_code == 200
        assert running.app.state.flm.scheduler.active == 0
    finally:
        running.stop()
