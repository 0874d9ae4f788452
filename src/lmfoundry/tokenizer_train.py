"""Training a byte-level BPE tokenizer (the `tokenizers` library) and measuring its compression.

`train_tokenizer` writes a tokenizer directory that `lmfoundry.tokenizer.load_tokenizer` and
transformers' `AutoTokenizer.from_pretrained` both load: tokenizer.json (byte-level BPE; BOS
added by its post-processor) and tokenizer_config.json (special tokens, chat template).
`compression_report` gives the table EXAONE 3.0 reports for its tokenizer: tokens per word
(a word is a whitespace-separated run) and characters per token, per file, so an English file
and a Korean file show how well each language is compressed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import DataError
from .records import expand_files, read_texts

DEFAULT_SPECIAL_TOKENS = ("<|pad|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHATML = ("{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BYTE_ALPHABET = 256


def train_bpe(texts, vocab_size: int, special_tokens=DEFAULT_SPECIAL_TOKENS, bos_token: str | None = "<s>",
              show_progress: bool = False):
    """A byte-level BPE trained on an iterable of strings; adds `bos_token` in front of every sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  show_progress=show_progress, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos_token is not None:
        bos = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos)])
    return tok


def train_tokenizer(files, out_dir, vocab_size: int, special_tokens=DEFAULT_SPECIAL_TOKENS, chat_template: str = CHATML,
                    text_field: str = "text", *, bos_token: str | None = "<s>", eos_token: str = "</s>",
                    pad_token: str | None = "<|pad|>", txt_mode: str = "paragraph", model_max_length: int | None = None,
                    overwrite: bool = False, progress: bool = False) -> Path:
    """Train on the documents of `files` (.txt/.jsonl/.parquet, read as tokenize_corpus reads them)
    and write tokenizer.json + tokenizer_config.json to `out_dir`; returns out_dir."""
    paths = expand_files(files)
    out_dir = Path(out_dir)
    special_tokens = list(dict.fromkeys(special_tokens))
    for what, t in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
        if t is not None and t not in special_tokens:
            raise DataError(f"{what} {t!r} is not among the special tokens {special_tokens}")
    if not isinstance(vocab_size, int) or vocab_size < BYTE_ALPHABET + len(special_tokens):
        raise DataError(f"vocab_size must be at least {BYTE_ALPHABET + len(special_tokens)} (256 bytes + "
                        f"{len(special_tokens)} special tokens), got {vocab_size!r}")
    if (out_dir / "tokenizer.json").exists() and not overwrite:
        raise DataError(f"{out_dir}: already holds a tokenizer.json (pass overwrite=True / --force to replace it)")

    counts = {}

    def documents():
        for p in paths:
            counts[p] = 0
            for _, text in read_texts(p, text_field, txt_mode):
                counts[p] += 1
                yield text
            if counts[p] == 0:
                raise DataError(f"{p}: no documents (the file is empty)")

    tok = train_bpe(documents(), vocab_size, special_tokens, bos_token, show_progress=progress)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
              "pad_token": pad_token, "chat_template": chat_template, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    files_out = {"tokenizer.json": tok.to_str(),
                 "tokenizer_config.json": json.dumps({k: v for k, v in config.items() if v is not None}, indent=2,
                                                     ensure_ascii=False)}
    _write_files(out_dir, files_out)
    return out_dir


def _write_files(out_dir: Path, files: dict[str, str]):
    """A new directory appears whole (temporary name, then rename); in an existing one each file is
    replaced atomically."""
    if not out_dir.exists():
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    for name, text in files.items():
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)


def compression_report(tokenizer_dir, files, text_field: str = "text", txt_mode: str = "paragraph") -> list[dict]:
    """Per file: documents, words (whitespace-separated), chars (Unicode code points of the
    document texts), tokens (without special tokens), tokens/word and chars/token."""
    from .tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    rows = []
    for p in expand_files(files):
        docs = words = chars = tokens = 0
        batch: list[str] = []

        def flush():
            nonlocal tokens
            tokens += sum(len(x) for x in tok.encode_batch(batch, add_special_tokens=False))
            batch.clear()

        for _, text in read_texts(p, text_field, txt_mode):
            docs += 1
            words += len(text.split())
            chars += len(text)
            batch.append(text)
            if len(batch) == 1024:
                flush()
        flush()
        if docs == 0:
            raise DataError(f"{p}: no documents (the file is empty)")
        rows.append({"file": str(p), "documents": docs, "words": words, "chars": chars, "tokens": tokens,
                     "tokens_per_word": tokens / max(words, 1), "chars_per_token": chars / max(tokens, 1)})
    return rows


def format_report(rows: list[dict]) -> str:
    head = ("file", "docs", "words", "chars", "tokens", "tokens/word", "chars/token")
    body = [(Path(r["file"]).name, f"{r['documents']:,}", f"{r['words']:,}", f"{r['chars']:,}", f"{r['tokens']:,}",
             f"{r['tokens_per_word']:.3f}", f"{r['chars_per_token']:.3f}") for r in rows]
    if len(rows) > 1:
        w, c, t = (sum(r[k] for r in rows) for k in ("words", "chars", "tokens"))
        body.append(("total", f"{sum(r['documents'] for r in rows):,}", f"{w:,}", f"{c:,}", f"{t:,}",
                     f"{t / max(w, 1):.3f}", f"{c / max(t, 1):.3f}"))
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head)] + [line(b) for b in body])
