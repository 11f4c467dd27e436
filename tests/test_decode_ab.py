"""benchmarks/decode_ab.py with a stand-in for gpu_engine.py: each setting's environment and file swaps reach
its run and only its run, the working tree comes back as it was (after a failed run too), the figures of
each run are gathered, and a setting that cannot be read is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_ab  # noqa: E402

# writes gpu_engine.py's JSON: tok/s from the swapped file's text, times FAKE_SCALE; FAKE_FAIL=1 exits 3
FAKE_ENGINE = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    args = sys.argv[1:]
    if os.environ.get("FAKE_FAIL") == "1":
        print("boom", file=sys.stderr)
        sys.exit(3)
    tok = float(Path(os.environ["FAKE_MARKER"]).read_text()) * float(os.environ.get("FAKE_SCALE", "1"))
    step = {"gpu_busy_us_per_step": 1e6 / tok, "launches_per_step": 419.0,
            "parts": {"norms": {"exclusive_us": 300.0}}, "by_grid": {"_k grid=[1, 1, 1]": {"exclusive_us_per_launch": 4.2}},
            "between_replays": [{"span_us": 70.0, "ops": []}, {"span_us": 90.0, "ops": []}, {"span_us": 71.0, "ops": []}]}
    out = {"machine": {"device": "fake"}, "versions": {"torch": "x"}, "argv": args,
           "results": {"decode_b1_ctx512": {"tok_s": tok, "runs": [tok, tok]}, "decode_step": step}}
    Path(args[args.index("--out") + 1]).write_text(json.dumps(out))
''')


@pytest.fixture
def tree(tmp_path, monkeypatch):
    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_ENGINE)
    marker, alt = tmp_path / "kernel.py", tmp_path / "kernel_old.py"
    marker.write_text("200")
    alt.write_text("150")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("FAKE_MARKER", str(marker))
    return engine, marker, alt, gguf


def _main(engine, gguf, out, *settings):
    return decode_ab.main(["--gguf", str(gguf), "--engine", str(engine), "--out", str(out),
                           *[a for s in settings for a in ("--setting", s)]])


def test_each_setting_runs_with_its_changes_and_the_tree_comes_back(tree, tmp_path):
    engine, marker, alt, gguf = tree
    out = tmp_path / "ab.json"
    rc = _main(engine, gguf, out, "new", f"old:{marker}<-{alt}", "scaled:FAKE_SCALE=0.5")
    report = json.loads(out.read_text())
    s = report["settings"]
    assert rc == 0 and list(s) == ["new", "old", "scaled"]
    assert [s[k]["decode_tok_s"] for k in s] == [200.0, 150.0, 100.0]
    assert s["old"]["changes"] == [f"{marker}<-{alt}"] and s["scaled"]["changes"] == ["FAKE_SCALE=0.5"]
    assert s["new"]["exclusive_us_by_part"] == {"norms": 300.0}
    assert s["new"]["exclusive_us_per_launch_by_grid"] == {"_k grid=[1, 1, 1]": 4.2}
    assert s["new"]["gpu_busy_us_per_step"] == pytest.approx(5000.0)
    assert s["new"]["between_replays_us"] == 71.0  # the median of the boundaries the profile listed
    assert report["machine"] == {"device": "fake"} and "--no-hf" in report["how"]
    assert marker.read_text() == "200"


def test_a_failed_run_is_recorded_and_still_restores_the_tree(tree, tmp_path):
    engine, marker, alt, gguf = tree
    out = tmp_path / "ab.json"
    rc = _main(engine, gguf, out, f"broken:FAKE_FAIL=1,{marker}<-{alt}", "new")
    s = json.loads(out.read_text())["settings"]
    assert rc == 1
    assert s["broken"]["error"] == "exit status 3" and "boom" in s["broken"]["output_tail"]
    assert s["new"]["decode_tok_s"] == 200.0
    assert marker.read_text() == "200"


@pytest.mark.parametrize("setting", ["old:src/nowhere.py<-/nonexistent", "K=V", ":K=V", "a:neither"])
def test_a_setting_that_cannot_be_read_is_one_line(tree, tmp_path, setting):
    engine, marker, alt, gguf = tree
    proc = subprocess.run([sys.executable, decode_ab.__file__, "--gguf", str(gguf), "--engine", str(engine),
                           "--setting", setting], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --setting") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_settings_of_one_name_and_a_missing_model_are_refused(tree, tmp_path):
    engine, marker, alt, gguf = tree
    assert _main(engine, gguf, tmp_path / "x.json", "a", "a") == 2
    assert _main(engine, tmp_path / "none.gguf", tmp_path / "x.json", "a") == 2
    assert not (tmp_path / "x.json").exists()


def test_the_report_holds_each_setting_as_soon_as_it_is_done(tree, tmp_path, monkeypatch):
    """A call stopped from outside during a later setting (here: the second run raises) still leaves the
    first setting's figures in --out."""
    engine, marker, alt, gguf = tree
    out = tmp_path / "ab.json"
    real, calls = decode_ab.run_setting, []

    def second_killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_ab, "run_setting", second_killed)
    with pytest.raises(KeyboardInterrupt):
        _main(engine, gguf, out, "first", "second")
    assert list(json.loads(out.read_text())["settings"]) == ["first"]
    assert not out.with_name(out.name + ".tmp").exists()
