"""Where HumanEval's answers come from: the model in this process, an OpenAI-compatible server, or the
problems' own canonical solutions (a check of the harness and the sandbox, which must score 100 %).

The in-process generator keeps up to `parallel` sequences in the engine at once and runs one batched
step for all of them, the way the server's worker does, so K samples of 164 problems share forward
passes. Each sample has its own seed (base seed + sample number), so a run is reproducible.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from devstral.errors import DevstralError
from devstral.eval.humaneval import RAW_STOP, Job, Sample, chat_messages


def canonical(jobs: list[Job]) -> Iterator[tuple[Job, Sample]]:
    """The reference solution as a raw-mode completion of every job."""
    for job in jobs:
        yield job, Sample(job[2].canonical_solution, finish_reason="stop")


@dataclass
class _Running:
    job: Job
    events: Any
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    finish: str | None = None


class InProcessGenerator:
    """Answers from a loaded LLM (devstral.load), `parallel` sequences per engine step."""

    def __init__(self, llm, *, mode: str, temperature: float, max_tokens: int, seed: int = 0,
                 parallel: int = 4, show_progress: bool = True):
        self.llm, self.mode = llm, mode
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.parallel, self.show_progress = max(1, parallel), show_progress

    def _start(self, job: Job) -> _Running:
        problem, sample_no = job[2], job[1]
        base = self.llm.default_sampling
        params = base.updated(temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed + sample_no,
                              stop=RAW_STOP if self.mode == "raw" else [])
        if self.mode == "raw":
            ids = self.llm.encode_prompt(problem.prompt)
        else:
            ids = self.llm.tokenizer.encode_chat(chat_messages(problem))
        return _Running(job, self.llm.stream(ids, params, yield_prefill=True), prompt_tokens=len(ids))

    def __call__(self, jobs: list[Job]) -> Iterator[tuple[Job, Sample]]:
        from devstral.engine.outputs import PENDING

        waiting, active, done = deque(jobs), [], 0
        while waiting or active:
            while waiting and len(active) < self.parallel:
                active.append(self._start(waiting.popleft()))
            still: list[_Running] = []
            for run in active:
                finished = True
                for event in run.events:
                    if event is PENDING:
                        finished = False
                        break
                    if event.token_id is not None:
                        run.tokens += 1
                    if event.text:
                        run.parts.append(event.text)
                    if event.finish_reason:
                        run.finish = event.finish_reason
                if finished:
                    done += 1
                    if self.show_progress:
                        print(f"\rgenerated {done}/{len(jobs)}", end="" if done < len(jobs) else "\n",
                              file=sys.stderr, flush=True)
                    yield run.job, Sample("".join(run.parts), run.tokens, run.prompt_tokens, run.finish)
                else:
                    still.append(run)
            active = still
            if active:
                self.llm.engine.step()


class EndpointGenerator:
    """Answers from an OpenAI-compatible server (/v1/chat/completions, or /v1/completions in raw mode)."""

    def __init__(self, base_url: str, *, model_name: str | None, api_key: str | None, mode: str,
                 temperature: float, max_tokens: int, seed: int = 0, parallel: int = 4, timeout_s: float = 600.0,
                 transport=None):
        import httpx

        url = base_url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise DevstralError(f"--base-url must start with http:// or https://, got {base_url!r}")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.model_name, self.mode = model_name, mode
        self.temperature, self.max_tokens, self.seed, self.parallel = temperature, max_tokens, seed, max(1, parallel)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                    timeout=httpx.Timeout(timeout_s, connect=10.0))

    def check(self) -> None:
        """GET /models: an unreachable server is one clear error before any problem is sent."""
        import httpx

        try:
            r = self._client.get("/models", timeout=10.0)
        except httpx.HTTPError as e:
            raise DevstralError(f"cannot reach {self.base_url}: {type(e).__name__}: {e}".rstrip(": ")) from None
        if r.status_code in (401, 403):
            raise DevstralError(f"{self.base_url} refused the API key (HTTP {r.status_code})")
        if r.status_code < 400 and self.model_name is None:
            try:
                self.model_name = r.json()["data"][0]["id"]
            except (ValueError, LookupError, TypeError):
                raise DevstralError(f"{self.base_url}/models lists no model; pass --model-name") from None

    def _one(self, job: Job) -> Sample:
        import httpx

        problem, sample_no = job[2], job[1]
        body: dict[str, Any] = {"model": self.model_name or "default", "temperature": self.temperature,
                                "max_tokens": self.max_tokens, "seed": self.seed + sample_no}
        if self.mode == "raw":
            path, body = "/completions", {**body, "prompt": problem.prompt, "stop": RAW_STOP[:4]}
        else:
            path, body = "/chat/completions", {**body, "messages": chat_messages(problem)}
        for attempt in range(4):
            try:
                r = self._client.post(path, json=body)
            except httpx.HTTPError as e:
                if attempt == 3:
                    raise DevstralError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from None
                continue
            if r.status_code in (429, 503) and attempt < 3:
                import time

                time.sleep(2 ** attempt)
                continue
            if r.status_code >= 400:
                raise DevstralError(f"{self.base_url}{path} answered HTTP {r.status_code}: {r.text[:200]}")
            try:
                data = r.json()
                choice = data["choices"][0]
                text = choice["text"] if self.mode == "raw" else (choice["message"].get("content") or "")
            except (ValueError, LookupError, TypeError, AttributeError):
                raise DevstralError(f"{self.base_url}{path} answered something that is not a completion: "
                                    f"{r.text[:200]!r}") from None
            usage = data.get("usage") or {}
            return Sample(text, int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0),
                          choice.get("finish_reason"))
        raise AssertionError("unreachable")

    def __call__(self, jobs: list[Job]) -> Iterator[tuple[Job, Sample]]:
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            futures = {pool.submit(self._one, job): job for job in jobs}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
