"""benchmarks/ablations.py: every ablation still finds its anchor in today's tree (a moved line fails here, not as a
silent A/B of unmodified code on the GPU), its copy compiles and differs from the file only there, and decode_ab.py
reads the settings it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ablations  # noqa: E402
import decode_ab  # noqa: E402


@pytest.mark.parametrize("name", sorted(ablations.ABLATIONS))
def test_each_ablation_applies_once_and_compiles(name):
    rel, text = ablations.ablated(name)
    original = (ablations.ROOT / rel).read_text()
    assert text != original and "ABLATION" in text and "ABLATION" not in original
    compile(text, rel, "exec")


def test_the_printed_settings_are_decode_ab_settings(tmp_path):
    run = subprocess.run([sys.executable, str(ablations.ROOT / "benchmarks" / "ablations.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ablations.ROOT)
    assert run.returncode == 0, run.stderr
    words = run.stdout.split()
    assert words[::2] == ["--setting"] * len(ablations.ABLATIONS)
    for spec in words[1::2]:
        name, env, files = decode_ab.parse_setting(spec)
        assert name in ablations.ABLATIONS and not env
        (path, source), = files.items()
        assert source.read_text() == ablations.ablated(name)[1] and path == Path(ablations.ABLATIONS[name][0])


def test_a_missing_anchor_or_name_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(ablations.ABLATIONS, "gone", ("src/devstral/model/transformer.py", "no such line\n", ""))
    with pytest.raises(ablations.AnchorMissing, match="gone: src/devstral/model/transformer.py no longer holds"):
        ablations.ablated("gone")
    run = subprocess.run([sys.executable, str(ablations.ROOT / "benchmarks" / "ablations.py"), "--out", str(tmp_path),
                          "nosuch"], capture_output=True, text=True, cwd=ablations.ROOT)
    assert run.returncode == 2 and run.stderr.strip() == "error: no ablation 'nosuch' (known: nomerge, nopostnorm)"
