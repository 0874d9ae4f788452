"""A complete tiny checkpoint made from nothing: a preset model with random weights plus a
byte-level BPE tokenizer trained on a few embedded English and Korean sentences, and a
ChatML chat template: what tests use wherever they need a real checkpoint directory with a
real tokenizer in a fraction of a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import write_checkpoint
from .config import ModelConfig
from .model import Transformer
from .tokenizer_train import CHATML, DEFAULT_SPECIAL_TOKENS, train_bpe

SPECIAL_TOKENS = list(DEFAULT_SPECIAL_TOKENS)
CORPUS = """\
Depth up-scaling copies a base model, drops the last layers of one copy and the first layers of the other, and stacks them.
The stacked model starts a little worse than the base model and recovers quickly with continued pretraining.
Instruction tuning teaches the model to follow requests; preference alignment teaches it which answers people prefer.
A merged model averages the weights of two fine-tuned variants of the same base.
Tom has 3 apples and buys 4 more. How many apples does he have? 3 + 4 = 7. The answer is 7.
A train travels 60 kilometres in one hour. How far does it travel in 3 hours? 60 * 3 = 180. The answer is 180.
언어 모델은 다음 토큰을 예측하도록 학습됩니다.
깊이 확장은 기본 모델을 복사한 뒤 층을 잘라 쌓는 방법입니다.
지시 학습은 모델이 요청을 따르도록 가르칩니다.
민수는 사과 3개를 가지고 있고 4개를 더 샀습니다. 사과는 모두 7개입니다.
"""


def train_demo_tokenizer(vocab_size: int = 512, text: str = CORPUS):
    """A byte-level BPE (tokenizers library) that adds <s> in front of every sequence."""
    return train_bpe(text.splitlines(), vocab_size, SPECIAL_TOKENS, bos_token="<s>")


def make_demo_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random `preset` model with a trained tokenizer and chat template to `path`."""
    tok = train_demo_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    base = ModelConfig.from_preset(preset)
    if tok.get_vocab_size() > base.vocab_size:
        raise ValueError(f"preset {preset} has a vocabulary of {base.vocab_size}, the tokenizer needs {tok.get_vocab_size()}")
    cfg = base.replace(bos_token_id=ids["<s>"], eos_token_id=[ids["</s>"], ids["<|im_end|>"]],
                       pad_token_id=ids["<|pad|>"])
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
                        "pad_token": "<|pad|>", "chat_template": CHATML, "model_max_length": cfg.max_seq_len}
    return write_checkpoint(path, cfg, model.state_dict(), overwrite=overwrite,
                            extra_files={"tokenizer.json": tok.to_str(),
                                         "tokenizer_config.json": json.dumps(tokenizer_config, indent=2)})
