"""A/B of batch-1 decode settings in one lease: each setting runs benchmarks/gpu_engine.py in its own process,
one after the other, and one JSON gathers what they measured.

A setting is a name and a list of changes for its run only:
  KEY=VALUE        an environment variable (DEVSTRAL_ATTN_PREFETCH=1, DEVSTRAL_KERNEL_TUNING=table.json)
  path<-source     a file of the working tree replaced by another for the run (a kernel's other version),
                   put back afterwards whatever happens

  python benchmarks/decode_ab.py --gguf model.gguf --setting new --setting "old:src/devstral/kernels/x.py<-/tmp/x.py"

Compare settings of one file only: leases and machines differ from call to call. Each setting's entry has
the median decode tok/s at 512 context and its runs, the step's GPU busy time and launches, and the
exclusive time by part of the step and by kernel launch grid, the step() intervals and the median time between two
graph replays (benchmarks/step_profile.py); a setting whose
run fails has its exit status and the end of its output instead. --out is rewritten after every setting, so a
call cut short keeps the settings it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


class SpecError(ValueError):
    """A --setting that cannot be read (the message names it)."""


def parse_setting(text: str) -> tuple[str, dict[str, str], dict[Path, Path]]:
    """'name[:change,change...]' -> (name, environment, {working-tree file: replacement})."""
    name, _, rest = text.partition(":")
    if not name or any(c in name for c in "=<,"):
        raise SpecError(f"--setting {text!r}: starts with a name, then ':' and its changes")
    env, files = {}, {}
    for change in filter(None, (c.strip() for c in rest.split(","))):
        if "<-" in change:
            path, source = (Path(p.strip()) for p in change.split("<-", 1))
            if not source.is_file():
                raise SpecError(f"--setting {name}: {source} is not a file")
            if not path.is_file():
                raise SpecError(f"--setting {name}: {path} is not a file of the working tree")
            files[path] = source
        elif "=" in change:
            key, value = change.split("=", 1)
            env[key.strip()] = value
        else:
            raise SpecError(f"--setting {name}: {change!r} is neither KEY=VALUE nor path<-source")
    return name, env, files


def summarize(result: dict) -> dict:
    """The figures an A/B compares, from one gpu_engine.py JSON."""
    res = result["results"]
    out = {"decode_tok_s": res["decode_b1_ctx512"]["tok_s"], "runs": res["decode_b1_ctx512"]["runs"],
           "step_intervals": res["decode_b1_ctx512"].get("step_intervals"),
           "stamps_phases_us": (res["decode_b1_ctx512"].get("stamps") or {}).get("phases_us")}
    if "decode_b1_long" in res:  # --skip without "long": batch-1 decode at the long context too
        out["decode_long"] = {k: res["decode_b1_long"][k] for k in ("context", "tok_s", "runs")}
    step = res.get("decode_step")
    if step and "error" in step:  # the profiler failed: the timed figures above still count
        out["decode_step_error"] = step["error"]
    elif step:
        out.update(gpu_busy_us_per_step=step["gpu_busy_us_per_step"], launches_per_step=step["launches_per_step"],
                   exclusive_us_by_part={k: v["exclusive_us"] for k, v in step["parts"].items()},
                   exclusive_us_per_launch_by_grid={k: v["exclusive_us_per_launch"]
                                                    for k, v in step["by_grid"].items()},
                   idle=step.get("idle", {}), graph_replay_us_per_step=step.get("graph_replay_us_per_step"),
                   between_replays_us=_median_or_none([b["span_us"] for b in step.get("between_replays", [])]),
                   wall_us_per_step=1e6 / res["decode_b1_ctx512"]["tok_s"])
    return out


def _median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_setting(engine_cmd: list[str], env: dict[str, str], files: dict[Path, Path],
                timeout: float) -> tuple[dict | None, dict]:
    """One gpu_engine run with the setting's changes -> (its JSON, summarize() of it), or (None, what went
    wrong) when it failed. The working tree is restored before returning."""
    saved = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, (path, source) in enumerate(files.items()):
                saved[path] = Path(tmp) / f"{i}.orig"
                shutil.copy2(path, saved[path])
                shutil.copyfile(source, path)
            out = Path(tmp) / "engine.json"
            try:
                proc = subprocess.run([*engine_cmd, "--out", str(out)], env={**os.environ, **env},
                                      capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return None, {"error": f"no result within {timeout:.0f} s"}
            if proc.returncode or not out.is_file():
                return None, {"error": f"exit status {proc.returncode}",
                              "output_tail": (proc.stdout + proc.stderr)[-2000:]}
            result = json.loads(out.read_text())
        finally:
            for path, orig in saved.items():
                shutil.copy2(orig, path)
    return result, summarize(result)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True, help="the GGUF model every setting decodes")
    ap.add_argument("--setting", action="append", required=True, help="name[:KEY=VALUE,path<-source,...]")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip", default="streams,agent,long", help="gpu_engine.py sections to leave out")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a setting's run may take")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--engine", default=str(HERE / "gpu_engine.py"), help=argparse.SUPPRESS)  # tests swap it
    a = ap.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in a.setting]
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len({name for name, _, _ in settings}) != len(settings):
        print("error: --setting: two settings share a name", file=sys.stderr)
        return 2
    if not a.gguf.is_file():
        print(f"error: --gguf {a.gguf}: no such file", file=sys.stderr)
        return 2
    cmd = [sys.executable, a.engine, "--gguf", str(a.gguf), "--no-hf", "--runs", str(a.runs), "--skip", a.skip]
    report: dict = {"benchmark": "decode_ab", "file": str(a.gguf), "how": " ".join(["gpu_engine.py", *cmd[2:]]),
                    "settings": {}}
    for name, env, files in settings:
        changes = [f"{k}={v}" for k, v in env.items()] + [f"{p}<-{s}" for p, s in files.items()]
        print(f"== {name}: {', '.join(changes) or 'as is'}", file=sys.stderr)
        result, figures = run_setting(cmd, env, files, a.timeout)
        entry = {"changes": changes, **figures}
        if result is not None:
            report.setdefault("machine", result.get("machine"))
            report.setdefault("versions", result.get("versions"))
            print(f"   {entry['decode_tok_s']:.1f} tok/s", file=sys.stderr)
        report["settings"][name] = entry
        if a.out:  # after every setting: a run stopped from outside keeps the settings it finished
            _write(a.out, report)
    if not a.out:
        print(json.dumps(report, indent=1))
    return 0 if all("decode_tok_s" in e for e in report["settings"].values()) else 1


def _write(path: Path, report: dict) -> None:
    """The report at `path`, whole or not at all (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
