"""Every error lmfoundry raises on purpose for bad input, one class per family. The CLI catches
LMFoundryError once and prints its message as a single line (tracebacks only with --debug).
Messages name what the user wrote: the file (and line), the config key, the flag."""


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


class DataError(LMFoundryError):
    """A data file or record is missing, empty or malformed (the message names the file and line)."""


class EvalDataError(DataError):
    """An evaluation task file is missing, unreadable or not in the dataset's schema."""


class TrainError(LMFoundryError):
    """Training cannot start or cannot go on (bad settings, an existing output, a NaN loss)."""


class JudgeError(LMFoundryError):
    """A judge endpoint failed or a judge benchmark's inputs are malformed."""


class QuickstartError(LMFoundryError):
    """The quickstart cannot run in the given directory or with the given settings."""


class QueueFull(LMFoundryError):
    """The serving engine holds max_batch running + max_queue waiting sequences already."""


class EngineStopped(LMFoundryError):
    """The serving engine is shutting down (or has stopped) and takes no new work."""


class AdapterError(LMFoundryError):
    """LoRA settings are invalid, or an adapter directory is malformed or does not fit its base model."""
