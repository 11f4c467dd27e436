"""Build the agent-turn workloads that benchmarks/speculative.py replays (issue 15), from this repository's
own files, deterministically, into benchmarks/workloads/speculative.json.

Each workload is a list of turns {"prompt": text, "output": text}: what an agent's model reads and what
it must write. Three kinds, the ones prompt-lookup decoding is judged on:
  rewrite      a whole source file written back with 5% of its lines changed (every 20th line gets a
               trailing comment), the file quoted in the prompt;
  str_replace  `str_replace_editor` tool calls in Mistral's JSON: old_str quotes 8 lines of the file in
               the prompt, new_str is those lines with one changed;
  prose        text that is not in the prompt: a README section the prompt does not contain, after a
               source file (no draft should be right, so speculation must not slow it down).

    python benchmarks/speculative_workloads.py          # rewrites benchmarks/workloads/speculative.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "workloads" / "speculative.json"
FILES = ["src/devstral/engine/scheduler.py", "src/devstral/engine/block_manager.py",
         "src/devstral/engine/speculative.py", "src/devstral/kernels/gguf_config.py"]


def rewrite(path: str) -> dict:
    text = (REPO / path).read_text()
    lines = text.splitlines()
    out = [line + "  # reviewed" if i % 20 == 10 and line.strip() else line for i, line in enumerate(lines)]
    prompt = (f"Here is {path}:\n\n{text}\n\nAdd the comment `# reviewed` at the end of every 20th line "
              "(starting at line 11) and write the whole file back, nothing else.\n")
    return {"prompt": prompt, "output": "\n".join(out) + "\n"}


def str_replace(path: str, rng: random.Random) -> list[dict]:
    text = (REPO / path).read_text()
    lines = text.splitlines()
    turns = []
    for _ in range(3):
        start = rng.randrange(0, max(1, len(lines) - 8))
        old = lines[start:start + 8]
        new = list(old)
        j = rng.randrange(len(new))
        new[j] = new[j].replace("self", "this", 1) if "self" in new[j] else new[j] + "  # changed"
        call = [{"name": "str_replace_editor", "arguments": {"command": "str_replace", "path": path,
                                                            "old_str": "\n".join(old), "new_str": "\n".join(new)}}]
        prompt = f"{path}:\n\n{text}\n\nChange line {start + j + 1} with one str_replace_editor call.\n"
        turns.append({"prompt": prompt, "output": "[TOOL_CALLS]" + json.dumps(call)})
    return turns


def prose() -> list[dict]:
    readme = (REPO / "README.md").read_text()
    sections = [s for s in readme.split("\n### ") if len(s) > 1500][:2]
    source = (REPO / FILES[0]).read_text()
    return [{"prompt": f"{source}\n\nWrite the user documentation for the next feature.\n", "output": s[:4000]}
            for s in sections]


def main() -> None:
    rng = random.Random(15)
    workloads = {
        "rewrite": [rewrite(p) for p in FILES[:2]],
        "str_replace": [t for p in FILES[2:] for t in str_replace(p, rng)],
        "prose": prose(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(workloads, indent=1) + "\n")
    tmp.replace(OUT)
    print({k: len(v) for k, v in workloads.items()}, "->", OUT)


if __name__ == "__main__":
    main()
