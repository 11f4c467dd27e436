"""Synthetic tool-use conversations in the exact shape `devstral agent` produces.

Each conversation happens in a real temporary repository made of a few mined source files and a
README: the agent's own system prompt and task message, the agent's tool schemas, and observations
produced by the real tools (bash for `ls`, `cat` and `grep`, the agent's FileEditor for `view` and
`str_replace`), rendered with the agent's observation template. The temporary path is then replaced
by a plausible one (/home/user/<project>). The chat encoder turns these records into Devstral's v13
tokens ([AVAILABLE_TOOLS], [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}, [TOOL_RESULTS] ...), the same
path serving uses.
"""

from __future__ import annotations

import ast
import json
import random
import re
import shutil
import string
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_PROJECTS = ("toolbox", "pyhelpers", "datakit", "webtools", "minilib", "textproc", "netutils", "mathlib",
             "configs", "parsers", "scheduler", "inventory", "reporting", "cli-app", "fileops")
_LIST_TASKS = ("list the files and read README.md", "List the files here, then read README.md.",
               "What is in this repository? Show me the README.", "Look around the repo and read its README.",
               "list files and show README.md")
_FIND_TASKS = ("Where is `{name}` defined?", "Find the definition of {name}.", "In which file is `{name}` defined?")
_READ_TASKS = ("Read {file} and tell me what `{name}` does.", "What does the function {name} in {file} do?",
               "Open {file} and explain `{name}`.")
_RENAME_TASKS = ("Rename the function `{old}` to `{new}` in {file}.", "In {file}, rename `{old}` to `{new}`.")


def _call_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


def _functions(text: str) -> list[tuple[str, str, int]]:
    """(name, docstring summary, line) of documented module-level functions."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                out.append((node.name, doc.strip().split("\n\n")[0].replace("\n", " ").strip(), node.lineno))
    return out


class _Session:
    """One conversation: a temp repo, the agent's tools on it, and the messages so far."""

    def __init__(self, files: dict[str, str], project: str, task: str, rng: random.Random):
        from devstral.agent import prompts
        from devstral.agent.editor import FileEditor
        from devstral.agent.workspace import Workspace

        self.tmp = Path(tempfile.mkdtemp(prefix="devstral-tooluse-"))
        self.root = self.tmp / project
        self.root.mkdir()
        for name, text in files.items():
            (self.root / name).write_text(text, encoding="utf-8")
        self.fake = f"/home/user/{project}"
        self.rng, self.prompts = rng, prompts
        self.editor = FileEditor(Workspace.open(self.root))
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": prompts.render("system")},
            {"role": "user", "content": prompts.render("task", task=task, workspace=self.root, instructions="",
                                                       agents_md="", agents_md_path="")}]

    def call(self, name: str, args: dict[str, Any]) -> str:
        call_id = _call_id(self.rng)
        self.messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        if name == "finish":
            return ""
        if name == "execute_bash":
            r = subprocess.run(["bash", "-c", args["command"]], cwd=self.root, capture_output=True, text=True,
                               timeout=20, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
            observation = self.prompts.render("bash_observation", output=r.stdout + r.stderr, cwd=self.root,
                                              killed=False, timeout="", still_running=False, silence="",
                                              exit_code=r.returncode)
        else:
            observation = self.editor(args)
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": observation})
        return observation

    def record(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        text = json.dumps(self.messages).replace(str(self.root), self.fake)
        return {"messages": json.loads(text), "tools": tools}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _repo(docs: list[tuple[str, str]], rng: random.Random) -> tuple[dict[str, str], str, list]:
    """2-4 small source files (under 2000 characters: a conversation must fit a 3072-token row) with at least one documented function, and a README."""
    project = rng.choice(_PROJECTS)
    small = [(p, t) for p, t in (rng.choice(docs) for _ in range(40)) if len(t) < 2000]  # a viewed file must leave room in the row
    files: dict[str, str] = {}
    funcs = []
    for path, text in small:
        name = Path(path).name
        if name in files or name == "__init__.py":
            continue
        files[name] = text
        funcs += [(name, *f) for f in _functions(text)]
        if len(files) >= rng.randint(2, 4):
            break
    if not files:
        return {}, project, []
    summary = next((f[2] for f in funcs), "Small Python helpers.")
    readme = f"# {project}\n\n{summary}\n\n## Files\n\n" + "".join(f"- `{n}`\n" for n in sorted(files))
    files["README.md"] = readme
    return files, project, funcs


def tool_use_records(docs: list[tuple[str, str]], rng: random.Random, count: int) -> list[dict[str, Any]]:
    from devstral.agent.prompts import tool_schemas

    tools = tool_schemas()
    records: list[dict[str, Any]] = []
    attempts = 0
    while len(records) < count and docs and attempts < count * 5:
        attempts += 1
        files, project, funcs = _repo(docs, rng)
        if not funcs:
            continue
        kind = rng.choice(("list", "list", "find", "read", "rename"))
        fname, name, summary, line = rng.choice(funcs)
        if kind == "list":
            task = rng.choice(_LIST_TASKS)
        elif kind == "find":
            task = rng.choice(_FIND_TASKS).format(name=name)
        elif kind == "read":
            task = rng.choice(_READ_TASKS).format(name=name, file=fname)
        else:
            new = name + rng.choice(("_v2", "_impl", "_new")) if rng.random() < 0.5 else "do_" + name
            if files[fname].count(name) != 1:
                continue
            task = rng.choice(_RENAME_TASKS).format(old=name, new=new, file=fname)
        session = _Session(files, project, task, rng)
        try:
            path = f"{session.root}/{fname}"
            if kind == "list":
                session.call("execute_bash", {"command": rng.choice(("ls", "ls -1", "ls -a"))})
                session.call("execute_bash", {"command": "cat README.md"})
                names = sorted(files)
                session.call("finish", {"message": f"The repository has {len(names)} files: {', '.join(names)}. "
                                                   f"README.md says: {files['README.md'].splitlines()[2]}"})
            elif kind == "find":
                session.call("execute_bash", {"command": f"grep -rn 'def {name}(' ."})
                session.call("finish", {"message": f"`{name}` is defined in {fname}, line {line}."})
            elif kind == "read":
                session.call("str_replace_editor", {"command": "view", "path": path})
                session.call("finish", {"message": f"`{name}`: {summary}"})
            else:
                session.call("str_replace_editor", {"command": "view", "path": path})
                session.call("str_replace_editor", {"command": "str_replace", "path": path,
                                                    "old_str": f"def {name}(", "new_str": f"def {new}("})
                session.call("execute_bash", {"command": f"grep -n 'def {new}(' {fname}"})
                session.call("finish", {"message": f"Renamed `{name}` to `{new}` in {fname}."})
            record = session.record(tools)
        except Exception:  # a file the tools refuse (binary-looking, too long): skip this conversation
            continue
        finally:
            session.close()
        if re.search(r"devstral-tooluse-", json.dumps(record)):
            continue
        records.append(record)
    return records
