"""Secret masking checked against the encoders and parsers that would reveal a secret: Python's base64
and urllib, the `base64` and `xxd` programs, and the kernel's own /proc view of a scrubbed process."""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstral.agent.proc_scrub import scrub_secret
from devstral.agent.secrets import MASK, SecretMasker

SECRET_CHARS = st.characters(min_codepoint=33, max_codepoint=126)


def base64_decodings(text: str) -> list[bytes]:
    """Every base64 run in `text` (line wraps joined), decoded at each of the 4 possible starts."""
    joined = re.sub(r"(?<=[A-Za-z0-9+/=_-])\n(?=[A-Za-z0-9+/=_-])", "", text)
    out = []
    for run in re.findall(r"[A-Za-z0-9+/=_-]{4,}", joined):
        run = run.replace("-", "+").replace("_", "/").rstrip("=")
        for start in range(4):
            chunk = run[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            with contextlib.suppress(ValueError):
                out.append(base64.b64decode(chunk))
    return out


# 8 characters: below that, some alignments leave fewer than 8 base64 characters made of the secret
# alone, too short to mask without hiding ordinary text.
@settings(max_examples=60, deadline=None)
@given(secret=st.text(SECRET_CHARS, min_size=8, max_size=60), prefix=st.binary(max_size=20),
       suffix=st.binary(max_size=20), urlsafe=st.booleans())
def test_base64_copies_at_any_alignment_cannot_be_decoded(secret, prefix, suffix, urlsafe):
    masker = SecretMasker({"SERVICE_TOKEN": secret})
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    text = "data: " + encode(prefix + secret.encode() + suffix).decode() + " end"
    masked = masker.mask(text)
    assert not any(secret.encode() in d for d in base64_decodings(masked))


@pytest.mark.parametrize("program", [["base64"], ["base64", "-w", "10"], ["xxd", "-p"]])
def test_encoded_copies_made_by_real_programs_are_masked(program):
    if shutil.which(program[0]) is None:
        pytest.skip(f"{program[0]} is not installed")
    secret = "hunter2-Kj8dPq0z-VERY-secret"
    masker = SecretMasker({"DB_PASSWORD": secret})
    for prefix in ("", "x", "password=", "a much longer line before the secret itself: "):
        encoded = subprocess.run(program, input=(prefix + secret + "\n").encode(), capture_output=True,
                                 check=True).stdout.decode()
        masked = masker.mask(encoded)
        assert MASK in masked
        if program[0] == "xxd":
            assert secret.encode().hex() not in re.sub(r"\s", "", masked)
        else:
            assert not any(secret.encode() in d for d in base64_decodings(masked))


def test_url_passwords_are_masked_wherever_they_come_from():
    masker = SecretMasker({"DATABASE_URL": "postgres://app:hunter2-pw-77@db.internal:5432/prod"})
    # The password from the variable, even where it appears alone ...
    assert masker.mask("password is hunter2-pw-77") == f"password is {MASK}"
    # ... and any URL's password, seen in output, read with urllib as a client would.
    for url in ("postgres://app:hunter2-pw-77@db.internal:5432/prod", "https://bob:s3cr3t-pass@example.com/x",
                "redis://:only-a-password@cache:6379/0"):
        masked = masker.mask(f"connecting to {url} ...").split()[2]
        parts = urllib.parse.urlsplit(masked)
        assert parts.password == MASK and parts.hostname == urllib.parse.urlsplit(url).hostname


@pytest.mark.parametrize("name,value", [
    ("GITHUB_PAT", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("GH_PAT", "ghp_" + "A1b2C3d4" * 5),
    ("MY_AUTH", "opaque-value-without-a-known-shape"),
    ("SENTRY_DSN", "https://abc123@o1.ingest.sentry.io/42"),
])
def test_secret_variable_names_include_pat_auth_and_dsn(name, value):
    assert SecretMasker({name: value}).mask(f"value: {value}") == f"value: {MASK}"


@pytest.mark.parametrize("token", [
    "ghp_" + "x" * 36, "github_pat_" + "A" * 40, "glpat-" + "b" * 20, "sk-proj-" + "c" * 40,
    "sk-ant-api03-" + "d" * 40, "hf_" + "e" * 34, "xoxb-1234-5678-abcdefghij", "AKIAIOSFODNN7EXAMPLE",
    "AIza" + "f" * 35, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
])
def test_tokens_of_known_formats_are_masked_without_any_variable(token):
    assert SecretMasker({}).mask(f"found {token} here") == f"found {MASK} here"


def test_private_key_blocks_are_masked_even_when_cut_off():
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\nAAAA\n-----END OPENSSH PRIVATE KEY-----"
    assert SecretMasker({}).mask(f"before\n{key}\nafter") == f"before\n{MASK}\nafter"
    assert SecretMasker({}).mask(f"before\n{key[:50]}") == f"before\n{MASK}"


@given(st.text(alphabet="abcxyz ABC.,:\n0123", max_size=300))
def test_ordinary_text_is_left_alone(text):
    masker = SecretMasker({"API_KEY": "k3y-value-that-is-long", "HOME": "/home/user"})
    assert masker.mask(text) == text


def test_added_values_are_masked_with_their_encodings():
    masker = SecretMasker({})
    masker.add_values(["sk-my-own-api-key-0001"])
    text = "key sk-my-own-api-key-0001 and " + base64.b64encode(b"Bearer sk-my-own-api-key-0001").decode()
    masked = masker.mask(text)
    assert "sk-my-own-api-key-0001" not in masked
    assert not any(b"sk-my-own-api-key-0001" in d for d in base64_decodings(masked))


def test_scrubbed_secret_leaves_the_kernels_view_of_the_process(tmp_path: Path):
    secret = "sk-scrub-me-0123456789"
    script = ("import sys, time\nfrom devstral.agent.proc_scrub import scrub_secret\n"
              "ok = scrub_secret(sys.argv[2])\nprint(ok, flush=True)\nsys.stdin.read()\nprint(sys.argv[2])\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.Popen([sys.executable, "-c", script, "--api-key", secret], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={"PYTHONPATH": src, "MY_TOKEN": secret, "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline().strip() == b"True"
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    out, _ = proc.communicate(b"")
    assert secret.encode() not in cmdline and b"--api-key\0" + b"*" * len(secret) in cmdline
    assert secret.encode() not in environ
    assert out.decode().strip() == secret  # the process's own copy is intact
    assert scrub_secret("") is False
