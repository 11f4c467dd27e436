"""Proven no-network mode: run, serve (answering a request), finetune, quantize and the in-process agent each
run under an audit hook on socket.connect and socket.getaddrinfo (PEP 578), and none of them reaches, or
even looks up, anything but the loopback. Offline mode refuses the hub with one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from devstral.testing import make_tiny_checkpoint

SRC = str(Path(__file__).parents[1] / "src")

# Installed before devstral is imported: every connect and name lookup is checked; anything that is not
# loopback (or a Unix socket) is written to the log and refused.
AUDIT = textwrap.dedent("""
    import ipaddress, os, sys
    LOG = os.environ["NETWORK_LOG"]

    def _loopback(host):
        if host in (None, "", "localhost", b"localhost"):
            return True
        try:
            return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
        except ValueError:
            return False

    def hook(event, args):
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and not _loopback(address[0]):
                bad = f"connect {address!r}"
            else:
                return
        elif event == "socket.getaddrinfo" and not _loopback(args[0]):
            bad = f"getaddrinfo {args[0]!r}"
        else:
            return
        with open(LOG, "a") as f:
            f.write(bad + "\\n")
        raise PermissionError("network access in a no-network test: " + bad)

    sys.addaudithook(hook)
""")

STEPS = textwrap.dedent("""
    import sys
    from devstral.cli import main
    model, work = sys.argv[1], sys.argv[2]
    codes = {}
    codes["run"] = main(["run", "hello", "--model", model, "-n", "3"])
    codes["quantize"] = main(["quantize", model, work + "/m.gguf", "--type", "Q8_0", "--no-progress"])
    codes["run-gguf"] = main(["run", "hello", "--model", work + "/m.gguf", "-n", "2"])
    codes["finetune"] = main(["finetune", "--model", model, "--data", work + "/d.jsonl", "--output", work + "/ft",
                              "--max-steps", "1", "--no-progress"])
    codes["agent"] = main(["agent", "list the files", "--model", model, "-w", work + "/ws", "--mode", "auto",
                           "--max-steps", "1", "--max-tokens", "8", "--quiet"])
    print("CODES", codes)
""")


def _env(log: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DEVSTRAL_OFFLINE", "HF_HUB_OFFLINE")}
    return {**env, "PYTHONPATH": SRC, "NETWORK_LOG": str(log), "HF_HUB_CACHE": str(cache)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("nonet") / "m")


def test_the_hook_catches_a_real_attempt(tmp_path):
    log = tmp_path / "net.log"
    code = AUDIT + "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\n" \
                   "except PermissionError:\n    print('refused')\n"
    out = subprocess.run([sys.executable, "-c", code], env=_env(log, tmp_path), capture_output=True, text=True)
    assert "refused" in out.stdout and "192.0.2.1" in log.read_text()


def test_commands_touch_no_network(model, tmp_path):
    log = tmp_path / "net.log"
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "a.py").write_text("print('a')\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    out = subprocess.run([sys.executable, "-c", AUDIT + STEPS, str(model), str(tmp_path)],
                         env=_env(log, tmp_path / "hf"), capture_output=True, text=True, timeout=600)
    codes = eval(next(ln for ln in out.stdout.splitlines() if ln.startswith("CODES"))[6:])  # noqa: S307
    assert codes["run"] == codes["quantize"] == codes["run-gguf"] == codes["finetune"] == 0, out.stderr
    assert codes["agent"] in (0, 1), out.stderr  # finished or stopped by the step limit: it ran
    assert not log.exists(), log.read_text()


def test_serve_answers_without_network(model, tmp_path):
    log = tmp_path / "net.log"
    from test_server_harness import _free_port

    port = _free_port()
    code = AUDIT + ("import sys\nfrom devstral.cli import main\n"
                    f"sys.exit(main(['serve', '--model', {str(model)!r}, '--port', '{port}', "
                    "'--log-level', 'warning']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(log, tmp_path / "hf"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(20)
    assert not log.exists(), log.read_text()


def test_offline_refuses_the_hub(tmp_path):
    log = tmp_path / "net.log"
    code = AUDIT + "import sys\nfrom devstral.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**_env(log, tmp_path / "hf"), "DEVSTRAL_OFFLINE": "1"}
    for args in (["run", "hi", "--model", "mistralai/Devstral-Small-2507"], ["pull", "unsloth/x-GGUF:Q4_K_M"]):
        out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
        assert out.returncode == 2 and "offline" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert not log.exists()
