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
import importlib

_EXPORTS = {"Config": "config", "load_config": "config", "make_config": "config", "curate": "pipeline",
            "redact": "pii", "words": "text", "DEFAULTS": "filters", "LANGUAGE_DEFAULTS": "filters", "RULES": "filters"}
__all__ = list(_EXPORTS)


def __getattr__(name):          # imported on first use: `lmfoundry data --help` stays light
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
