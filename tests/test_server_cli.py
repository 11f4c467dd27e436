"""`devstral serve` as a user runs it: a subprocess bound to 127.0.0.1, flags wired through."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from devstral.cli import main
from test_server_harness import _free_port, checkpoint


def test_serve_command_binds_localhost_and_applies_flags():
    port = _free_port()
    cmd = [sys.executable, "-m", "devstral", "serve", "--model", str(checkpoint()), "--port", str(port),
           "--alias", "my-devstral", "--ctx-size", "96", "--kv-cache-dtype", "fp32", "-np", "2",
           "--allowed-host", "devbox.lan", "--strict-tools", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        (card,) = httpx.get(url + "/v1/models").json()["data"]
        assert card["id"] == "my-devstral" and card["context_length"] == 96
        assert httpx.get(url + "/health").json()["slots_idle"] == 2
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 200})
        assert r.status_code == 400 and "context size of 96" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "my-devstral", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "my-devstral"
        assert httpx.get(url + "/v1/models", headers={"Host": f"devbox.lan:{port}"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Host": "evil.example"}).status_code == 403
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_reports_user_errors_in_one_line(capsys):
    assert main(["serve", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert main(["serve", "--model", str(checkpoint()), "--kv-cache-dtype", "q3"]) == 2
    assert "kv-cache-dtype" in capsys.readouterr().err
