"""Training data: corpora tokenized once into memory-mapped shards, packed fixed-shape batches
for pretraining (with stages and mixtures), and chat-template-rendered SFT and DPO examples.

Every batch iterator here yields dicts of LongTensors with the same conventions:
- `labels[b, t]` is the target for position t (already shifted: `input_ids[b, t + 1]` of the same
  document) or -100 where nothing is predicted (a document's last token, prompts, padding), so
  `cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)` is the loss;
- `doc_ids[b, t]` numbers the documents packed in a row (0, 1, 2, ... in order, padding last with
  its own id) for `Transformer.forward(tokens, doc_ids=...)`, which keeps attention and RoPE
  positions inside each document;
- each iterator has `state_dict()` / `load_state_dict()` (JSON-serializable) for exact resume.
"""
from ..errors import DataError
from .chat import DPOBatches, SFTBatches
from .corpus import TokenDataset, tokenize_corpus
from .packing import PackedBatches

__all__ = ["DataError", "TokenDataset", "tokenize_corpus", "PackedBatches", "SFTBatches",
           "DPOBatches"]
