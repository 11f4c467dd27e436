"""The one exception type for mistakes a user can fix.

The CLI prints a DevstralError as a single line on stderr and exits with code 2; the server turns it
into a 4xx answer. Anything else is a bug and keeps its traceback.
"""


class DevstralError(Exception):
    """A user-facing error: bad input, a missing file, a value out of range."""


class ContextOverflowError(DevstralError):
    """The prompt (plus the requested completion) does not fit in the context window."""

    def __init__(self, prompt_tokens: int, ctx_size: int, max_tokens: int = 0):
        self.prompt_tokens, self.ctx_size, self.max_tokens = prompt_tokens, ctx_size, max_tokens
        if max_tokens:
            msg = (f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                   f"{prompt_tokens + max_tokens} exceeds the context size of {ctx_size}")
        else:
            msg = f"prompt has {prompt_tokens} tokens, more than the context size of {ctx_size}"
        super().__init__(msg)


class NonFiniteLogitsError(DevstralError):
    """The model produced NaN logits: its weights or activations are broken, not the request."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"the model produced NaN logits (at generated token {step + 1}): its weights contain "
                         "NaN/inf or its activations overflowed; try --dtype bf16 or fp32 instead of fp16, or "
                         "check the checkpoint")
