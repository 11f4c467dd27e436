"""`devstral chat`: the REPL's commands, multi-line input, and Ctrl-C stopping only the answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from devstral.cli import main


def test_repl_commands_and_multiline(tiny_hf, monkeypatch, capsys):
    lines = iter(["first line \\", "second line", "/system You are terse.", '"""', "block a", "block b", '"""',
                  "/reset", "again", "/exit"])
    seen_prompts = []

    def fake_input(prompt=""):
        seen_prompts.append(prompt)
        return next(lines)

    encoded = []
    import devstral.engine.chat as chat_mod

    original = chat_mod.ChatStream.__init__

    def spy(self, llm, messages, *a, **kw):
        encoded.append(([dict(m) for m in messages], llm.tokenizer.default_system_prompt))
        original(self, llm, messages, *a, **kw)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(chat_mod.ChatStream, "__init__", spy)
    assert main(["chat", "--model", str(tiny_hf), "-n", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert seen_prompts[:2] == [">>> ", "... "]  # the backslash continued the message
    assert encoded[0][0] == [{"role": "user", "content": "first line \nsecond line"}]
    # /system cleared the history and set the system prompt; the block became one message
    assert encoded[1] == ([{"role": "user", "content": "block a\nblock b"}], "You are terse.")
    # /reset cleared the history again
    assert encoded[2][0] == [{"role": "user", "content": "again"}]
    assert err.count("decode") == 3  # one speed line per answer


def test_ctrl_c_stops_the_answer_not_the_program(tiny_hf):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # as from a terminal: SIGINT at its default even when this test runs under a shell that ignores it
    # (a background job of a script inherits SIGINT ignored, and Python then keeps it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "devstral", "chat", "--model", str(tiny_hf), "--temperature",
                             "1", "--ctx-size", "100000", "--min-p", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write(b"tell me a very long story\n")
        proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), False)
        deadline, got = time.time() + 60, b""
        while time.time() < deadline and len(got) < 20:
            chunk = proc.stdout.read(4096)
            got += chunk or b""
            time.sleep(0.05)
        assert got, "the model produced no output"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "Ctrl-C ended the program"
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        assert b"(stopped)" in proc.stderr.read()
    finally:
        proc.kill()
