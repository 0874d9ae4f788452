"""One exception family per kind of user error. The CLI catches LMFoundryError once and
prints its message as a single line (tracebacks only with --debug)."""


class LMFoundryError(Exception):
    """Base of every error lmfoundry raises on purpose for bad input."""


class ConfigError(LMFoundryError):
    """A model config (ours or a checkpoint's config.json) is malformed or unsupported."""


class CheckpointError(LMFoundryError):
    """A checkpoint directory is missing files, has truncated or mis-shaped tensors, or NaNs."""


class TokenizerError(LMFoundryError):
    """Tokenizer files are missing or malformed, or a chat template failed."""


class GenerationError(LMFoundryError):
    """A generation request cannot be served (e.g. the prompt exceeds the context)."""
