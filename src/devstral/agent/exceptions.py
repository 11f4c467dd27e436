"""Control flow of the agent loop, mini-swe-agent style: a step ends the run by raising.

`AgentStop` subclasses leave the loop; `FormatError` is caught inside the loop and told to the model.
"""

from __future__ import annotations


class AgentStop(Exception):
    """Leaves the loop. `exit_code` is what `devstral agent` returns."""

    exit_code = 1


class Finished(AgentStop):
    """The model called `finish`."""

    exit_code = 0

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class LimitReached(AgentStop):
    """Steps, wall time, format errors, a stuck loop or the context window ran out."""

    exit_code = 1

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FormatError(Exception):
    """The model's reply cannot be acted on; the message says exactly why and goes back to the model."""


class ToolError(Exception):
    """A tool call was well-formed but failed (bad path, missing old_str ...); the text is the observation."""


class DeadlineExceeded(LimitReached):
    """The model had not answered when the agent's time ran out."""

    def __init__(self, max_time_note: str = "time limit reached while waiting for the model"):
        super().__init__(max_time_note)
