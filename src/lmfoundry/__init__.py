"""lmfoundry: one Llama-family Transformer, many Hugging Face formats.

The names below are imported on first use, so `import lmfoundry.curate` (or the records
reader) does not pay for torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "checkpoint": ("convert", "load_model", "read_checkpoint", "read_config", "save_model", "write_checkpoint"),
    "config": ("ModelConfig", "openelm_layerwise"),
    "errors": ("CheckpointError", "ConfigError", "GenerationError", "LMFoundryError", "TokenizerError"),
    "generate": ("Completion", "SamplingParams", "generate"),
    "model": ("KVCache", "Transformer"),
    "tokenizer": ("Tokenizer", "load_tokenizer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmfoundry' has no attribute {name!r}")
