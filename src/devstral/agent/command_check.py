"""Reading a bash command without running it: its simple commands, the paths it names, and whether it
is plainly read-only. This is a guard rail for asking and refusing, not a sandbox: it fails closed
(anything it cannot read counts as not read-only and never as "similar" to an approved command)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from devstral.agent.workspace import Workspace, is_sensitive

_SEPARATORS = {"|", "||", "&&", ";", "&", ";;", "|&", "\n", "(", ")"}
_SUBSTITUTION = re.compile(r"\$\(|`|<\(|>\(|\beval\b")
_HARMLESS_REDIRECTS = re.compile(r"\d?>&\d|\d?>\s*/dev/null")
# Places outside the workspace that commands name all the time and that hold no user data.
SYSTEM_PREFIXES = tuple(Path(p) for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/opt", "/etc", "/dev",
                                          "/proc", "/sys", "/tmp", "/var/tmp"))
_SUBCOMMAND_PROGRAMS = {"git", "npm", "pnpm", "yarn", "cargo", "go", "pip", "pip3", "uv", "poetry", "docker",
                        "kubectl", "make", "apt", "apt-get", "brew", "conda", "dotnet", "gradle", "mvn"}
READ_ONLY_PROGRAMS = {"ls", "cat", "head", "tail", "wc", "grep", "egrep", "fgrep", "rg", "find", "pwd", "echo",
                      "printf", "tree", "stat", "file", "du", "df", "which", "type", "sort", "uniq", "cut",
                      "nl", "diff", "cmp", "basename", "dirname", "realpath", "readlink", "date", "uname",
                      "whoami", "id", "true", "false", "cd", "test", "[", "md5sum", "sha256sum", "tr", "comm"}
_READ_ONLY_GIT = {"status", "log", "diff", "show", "blame", "grep", "ls-files", "rev-parse", "describe",
                  "shortlog", "ls-tree", "cat-file"}
_FIND_ACTIONS = {"-delete", "-exec", "-execdir", "-ok", "-okdir", "-fprint", "-fprint0", "-fprintf", "-fls"}


def split_simple_commands(command: str) -> list[list[str]] | None:
    """The simple commands (lists of words) joined by pipes and lists, or None if unparseable."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = ""
        tokens = list(lexer)
    except ValueError:
        return None
    commands: list[list[str]] = [[]]
    for tok in tokens:
        if tok in _SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(tok)
    return [c for c in commands if c]


def has_substitution(command: str) -> bool:
    return bool(_SUBSTITUTION.search(command))


def similarity_keys(command: str) -> set[str] | None:
    """What "approve similar" remembers: the program (plus its subcommand) of each simple command.
    None when the command cannot be judged that way (substitutions, unparseable)."""
    if has_substitution(command):
        return None
    commands = split_simple_commands(command)
    if not commands:
        return None
    keys = set()
    for words in commands:
        words = [w for w in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)] or words
        program = Path(words[0]).name
        if program in _SUBCOMMAND_PROGRAMS and len(words) > 1:
            keys.add(f"{program} {words[1]}")
        elif program.startswith("python") and len(words) > 2 and words[1] == "-m":
            keys.add(f"{program} -m {words[2]}")
        else:
            keys.add(program)
    return keys


def is_read_only(command: str) -> bool:
    stripped = _HARMLESS_REDIRECTS.sub(" ", command)
    if has_substitution(stripped) or ">" in stripped:
        return False
    commands = split_simple_commands(stripped)
    if not commands:
        return False
    for words in commands:
        program = words[0]
        if program not in READ_ONLY_PROGRAMS and program != "git":
            return False
        if program == "git" and (len(words) < 2 or words[1] not in _READ_ONLY_GIT):
            return False
        if program == "find" and _FIND_ACTIONS.intersection(words):
            return False
    return True


def named_paths(command: str, workspace: Workspace, cwd: Path) -> tuple[list[Path], list[Path]]:
    """(sensitive paths, paths outside the workspace) that the command's words name."""
    commands = split_simple_commands(command) or [command.split()]
    sensitive, outside = [], []
    for words in commands:
        for position, word in enumerate(words):
            for candidate in _path_like(word):
                try:
                    resolved = workspace.resolve(candidate, cwd)
                except (OSError, RuntimeError, ValueError):  # a loop, a name too long: judged as outside
                    outside.append(Path(candidate))
                    continue
                if is_sensitive(Path(candidate)) or is_sensitive(resolved):
                    sensitive.append(resolved)
                # The program itself (/usr/bin/python3, ~/.venv/bin/pytest) is run, not read or written.
                if position > 0 and ("/" in candidate or candidate.startswith(("~", ".."))) and not workspace.contains(resolved) \
                        and not any(resolved == p or resolved.is_relative_to(p) for p in SYSTEM_PREFIXES):
                    outside.append(resolved)
    return sensitive, outside


def _path_like(word: str) -> list[str]:
    # --opt=value and VAR=value carry paths after the '='.
    parts = [word]
    if "=" in word:
        parts.append(word.split("=", 1)[1])
    return [p for p in parts if p and not p.startswith("-") and "://" not in p]
