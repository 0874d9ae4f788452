"""The quickstart's stages in order and its time format, shared by the pipeline and the report."""
from __future__ import annotations

# (stage, title); "eval:NAME" evaluates the model in DIR/models/NAME
STAGES = [
    ("data", "generate the bilingual corpus, SFT and preference data, test sets"),
    ("tokenizer", "train a byte-level BPE tokenizer; compression EN vs KO"),
    ("base", "pretrain the base model"),
    ("eval:base", "evaluate the base model"),
    ("upscale", "Depth Up-Scaling"),
    ("eval:upscaled", "evaluate the up-scaled model before any training"),
    ("continue", "continued pretraining of the up-scaled model"),
    ("eval:continued", "evaluate the continued model"),
    ("control", "control: the base model continued for the same FLOPs"),
    ("eval:control", "evaluate the control"),
    ("sft-a", "SFT variant A (general-heavy mixture, like SOLAR's SFT v3)"),
    ("eval:sft-a", "evaluate SFT A"),
    ("sft-b", "SFT variant B (math-heavy mixture, like SOLAR's SFT v4)"),
    ("eval:sft-b", "evaluate SFT B"),
    ("merge", "merge SFT A and B (linear average)"),
    ("eval:merged", "evaluate the merge"),
    ("dpo", "DPO on the merge with math preference pairs"),
    ("eval:dpo", "evaluate the DPO model"),
    ("online", "online DPO on math questions, the GSM8K verifier as reward (EXAONE: offline, then online)"),
    ("eval:online", "evaluate the online-DPO model"),
    ("final", "write the final checkpoint"),
    ("report", "write report.md and plots"),
]


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
