"""lmfoundry: one Llama-family Transformer, many Hugging Face formats."""
from .config import ModelConfig, openelm_layerwise
from .errors import CheckpointError, ConfigError, GenerationError, LMFoundryError, TokenizerError

__version__ = "0.1.0"
