"""lmfoundry: one Llama-family Transformer, many Hugging Face formats."""
from .checkpoint import convert, load_model, read_checkpoint, read_config, save_model, write_checkpoint
from .config import ModelConfig, openelm_layerwise
from .errors import CheckpointError, ConfigError, GenerationError, LMFoundryError, TokenizerError
from .generate import Completion, SamplingParams, generate
from .model import KVCache, Transformer
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
