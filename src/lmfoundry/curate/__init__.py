"""Data curation: the stage between raw text and `lmfoundry tokenize` / `pretrain`.

    from lmfoundry.curate import load_config, curate
    report = curate(load_config("curate.yaml"))          # OUT/data, OUT/removed, OUT/report.md

Modules, in the order a document meets them:
    text        words (spaCy's English rules), sentences, normalised words for hashing
    lang        language / script identification (Hangul ratio, Latin + English function words; py3langid)
    filters     Gopher quality and repetition, C4, FineWeb, length: rule tables and one engine
    classifier  fastText quality classifier (train, score)
    pii         e-mail, phone, IP, credit-card, Korean RRN redaction
    decontam    n-gram overlap with lmfoundry eval's task files
    dedup       exact hashes, MinHash signatures, LSH merge
    config      the YAML pipeline; steps  per-document work in the workers
    pipeline    shards, workers, resume, the merge, outputs;  report  report.md / report.json / plots
"""
from .config import Config, load_config, make_config
from .filters import DEFAULTS, LANGUAGE_DEFAULTS, RULES
from .pii import redact
from .pipeline import curate
from .text import words

__all__ = ["Config", "load_config", "make_config", "curate", "redact", "words", "DEFAULTS", "LANGUAGE_DEFAULTS",
           "RULES"]
