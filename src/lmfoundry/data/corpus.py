"""Corpora in (.txt, .jsonl, .parquet, read by lmfoundry.records), tokenized once into memory-mapped token shards out.

A tokenized corpus is a directory:
    index.json           what was tokenized (file fingerprints: path, size, mtime; tokenizer hash),
                         token dtype, shard list, per-source document and token counts
    documents.npy        int64 document offsets into the concatenated token stream (n_docs + 1)
    tokens-00000.bin ... the token stream (uint16 when every id fits, else uint32), split into shards
                         at document boundaries, read back with np.memmap

Every document is stored as `tokenizer.encode(text)` (so BOS when the tokenizer's post-processor
adds one) followed by the tokenizer's EOS. `tokenize_corpus` with the same files and tokenizer
reuses the directory as is; any change to a file (size or mtime), the file list, the tokenizer
files or the reading options tokenizes again. The new directory is built under a temporary name
and renamed into place, so an interrupted run never leaves a half-written dataset.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..records import TXT_MODES, expand_files, read_texts

FORMAT_VERSION = 1
TASK_CHARS = 1 << 20          # about 1 MB of text per tokenization task
SHARD_TOKENS = 1 << 28        # a new shard starts after this many tokens (at a document boundary)


# ---------------------------------------------------------------- the tokenized dataset

class TokenDataset:
    """A tokenized corpus on disk: `len(ds)` documents, `ds[i]` the tokens of document i (a
    read-only numpy view into the memory-mapped shard, EOS included)."""

    def __init__(self, path: Path, index: dict, reused: bool = False):
        self.path, self.index, self.reused = path, index, reused
        self.name = path.name
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = index["vocab_size"]
        self.eos_token_id: int = index["eos_token_id"]
        self.bos_token_id: int | None = index["bos_token_id"]
        self.offsets = np.load(path / "documents.npy", mmap_mode="r")
        self.doc_lengths = np.diff(self.offsets)
        self._shard_starts = np.cumsum([0] + [s["tokens"] for s in index["shards"]])
        self._shards: list = [None] * len(index["shards"])

    @classmethod
    def open(cls, path) -> TokenDataset:
        path = Path(path)
        index_file = path / "index.json"
        if not index_file.is_file():
            raise DataError(f"{path}: not a tokenized dataset (no index.json; make one with tokenize_corpus)")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{index_file}: malformed JSON ({e})") from None
        if index.get("version") != FORMAT_VERSION:
            raise DataError(f"{index_file}: format version {index.get('version')!r}, expected {FORMAT_VERSION} "
                            "(tokenize again)")
        itemsize = np.dtype(index["dtype"]).itemsize
        for shard in index["shards"]:
            f = path / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["tokens"] * itemsize:
                raise DataError(f"{f}: missing or truncated (expected {shard['tokens']} tokens; tokenize again)")
        if not (path / "documents.npy").is_file():
            raise DataError(f"{path / 'documents.npy'}: missing (tokenize again)")
        return cls(path, index)

    @classmethod
    def from_documents(cls, out_dir, documents, vocab_size: int, eos_token_id: int,
                       bos_token_id: int | None = None) -> TokenDataset:
        """Write token lists as they are (no EOS added) as a dataset: synthetic data and tests."""
        out_dir = Path(out_dir)
        if out_dir.exists():
            raise DataError(f"{out_dir}: already exists")
        dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
        docs = [np.asarray(d, dtype=np.int64) for d in documents]
        if not docs or any(len(d) == 0 for d in docs):
            raise DataError(f"{out_dir}: documents must be a non-empty list of non-empty token lists")
        tokens = np.concatenate(docs)
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise DataError(f"{out_dir}: token ids must lie in [0, {vocab_size})")
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            tokens.astype(dtype).tofile(tmp / "tokens-00000.bin")
            offsets = np.zeros(len(docs) + 1, dtype=np.int64)
            np.cumsum([len(d) for d in docs], out=offsets[1:])
            np.save(tmp / "documents.npy", offsets)
            index = {"version": FORMAT_VERSION, "key": None, "dtype": dtype.name, "vocab_size": vocab_size,
                     "eos_token_id": eos_token_id, "bos_token_id": bos_token_id, "num_documents": len(docs),
                     "num_tokens": len(tokens), "documents": "documents.npy",
                     "shards": [{"file": "tokens-00000.bin", "tokens": len(tokens)}],
                     "sources": []}
            (tmp / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(out_dir, index)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def sources(self) -> list[dict]:
        return self.index["sources"]

    def _shard(self, s: int) -> np.ndarray:
        if self._shards[s] is None:
            self._shards[s] = np.memmap(self.path / self.index["shards"][s]["file"], dtype=self.dtype, mode="r")
        return self._shards[s]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.document(i)

    def document(self, i: int) -> np.ndarray:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        s = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        base = int(self._shard_starts[s])
        return self._shard(s)[start - base:end - base]

    def __repr__(self):
        return (f"TokenDataset({str(self.path)!r}: {len(self):,} documents, {self.num_tokens:,} tokens, "
                f"{self.dtype.name})")


# ---------------------------------------------------------------- tokenizing once

def tokenizer_fingerprint(tokenizer_dir) -> str:
    """sha256 over the files that decide token ids and special tokens."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = Path(tokenizer_dir) / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"") + b"\0")
    return h.hexdigest()


def tokenize_corpus(files, tokenizer_dir, out_dir, text_field: str = "text", workers: int = 2, *,
                    txt_mode: str = "paragraph", shard_tokens: int = SHARD_TOKENS,
                    progress: bool = True) -> TokenDataset:
    """Tokenize `files` (paths or directories of .txt/.jsonl/.parquet) with the tokenizer in
    `tokenizer_dir` into `out_dir`, in `workers` processes, once: a second call with unchanged
    inputs returns the existing dataset (`ds.reused` is True) without reading a file."""
    from ..tokenizer import load_tokenizer
    paths = expand_files(files)
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise DataError(f"{tokenizer_dir}: tokenizer has no eos_token; documents need an end marker")
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    key = {"version": FORMAT_VERSION, "tokenizer_sha256": tokenizer_fingerprint(tokenizer_dir),
           "text_field": text_field, "txt_mode": txt_mode,
           "files": [_file_fingerprint(p) for p in paths]}
    if (out_dir / "index.json").is_file():
        try:
            old = TokenDataset.open(out_dir)
        except DataError:
            old = None   # unreadable or from an older version: build it again
        if old is not None and old.index.get("key") == key:
            old.reused = True
            return old
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not a tokenized dataset; choose another output directory")

    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        index = _write_shards(paths, tokenizer_dir, tokenizer, tmp, key, dtype, text_field, txt_mode,
                              max(1, workers), shard_tokens, progress)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenDataset(out_dir, index)


def _file_fingerprint(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _tasks(paths, text_field, txt_mode, counts, bar):
    """(file index, [texts]) groups of about TASK_CHARS characters; never spans two files."""
    for i, p in enumerate(paths):
        texts, chars = [], 0
        for _where, text, nbytes in read_texts(p, text_field, txt_mode, sizes=True):
            bar.update(nbytes)
            texts.append(text)
            chars += len(text)
            counts[i] += 1
            if chars >= TASK_CHARS:
                yield i, texts
                texts, chars = [], 0
        if texts:
            yield i, texts
        if counts[i] == 0:
            what = "file is empty" if p.stat().st_size == 0 else "no non-empty documents"
            raise DataError(f"{p}: no documents ({what})")


def _write_shards(paths, tokenizer_dir, tokenizer, tmp: Path, key, dtype, text_field, txt_mode, workers,
                  shard_tokens, progress) -> dict:
    from tqdm import tqdm
    total_bytes = sum(p.stat().st_size for p in paths)
    counts = [0] * len(paths)
    source_tokens = [0] * len(paths)
    lengths: list[np.ndarray] = []
    shards: list[dict] = []
    shard_file = None
    t0 = time.perf_counter()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {len(paths)} file(s)",
               disable=not progress, file=sys.stderr)
    tasks = _tasks(paths, text_field, txt_mode, counts, bar)
    eos = tokenizer.eos_token_id
    try:
        if workers > 1:
            results = _parallel(tasks, tokenizer_dir, eos, dtype, workers)
        else:
            results = ((i, *_encode(tokenizer, texts, eos, dtype)) for i, texts in tasks)
        for i, tokens, doc_lengths in results:
            if shard_file is None or shards[-1]["tokens"] >= shard_tokens:
                if shard_file is not None:
                    shard_file.close()
                shards.append({"file": f"tokens-{len(shards):05d}.bin", "tokens": 0})
                shard_file = open(tmp / shards[-1]["file"], "wb")
            shard_file.write(tokens.tobytes())
            shards[-1]["tokens"] += len(tokens)
            source_tokens[i] += len(tokens)
            lengths.append(doc_lengths)
            bar.set_postfix_str(f"{sum(source_tokens):,} tokens", refresh=False)
    finally:
        bar.close()
        if shard_file is not None:
            shard_file.close()
    offsets = np.zeros(sum(counts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    np.save(tmp / "documents.npy", offsets)
    index = {"version": FORMAT_VERSION, "key": key, "dtype": np.dtype(dtype).name,
             "vocab_size": tokenizer.vocab_size, "eos_token_id": eos, "bos_token_id": tokenizer.bos_token_id,
             "tokenizer": str(Path(tokenizer_dir).resolve()), "num_documents": int(sum(counts)),
             "num_tokens": int(offsets[-1]), "seconds": round(time.perf_counter() - t0, 3),
             "documents": "documents.npy", "shards": shards,
             "sources": [{**f, "documents": n, "tokens": t} for f, n, t in zip(key["files"], counts, source_tokens)]}
    (tmp / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return index


def _encode(tokenizer, texts, eos, dtype):
    """Token stream (each document + EOS) and document lengths for a list of texts."""
    ids = tokenizer.encode_batch(texts)
    doc_lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.empty(int(doc_lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        flat[pos:pos + len(x)] = x
        pos += len(x)
        flat[pos] = eos
        pos += 1
    return flat, doc_lengths


_worker_tokenizer = None


def _init_worker(tokenizer_dir):
    global _worker_tokenizer
    from ..tokenizer import load_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_task(args):
    (i, texts), eos, dtype = args
    return (i, *_encode(_worker_tokenizer, texts, eos, dtype))


def _parallel(tasks, tokenizer_dir, eos, dtype, workers):
    """Encode tasks in `workers` processes, results in task order."""
    # fork is fastest where it exists; each child uses one core, so the Rust thread pool is off
    # there (setting the variable also silences tokenizers' warning about forking after use)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),))
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    in_flight: deque = deque()   # bounded, so reading never runs far ahead of tokenizing
    with pool:
        for task in tasks:
            in_flight.append(pool.apply_async(_encode_task, ((task, eos, dtype),)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def _replace_dir(tmp: Path, out_dir: Path):
    """Put `tmp` at `out_dir`; an existing dataset there is moved aside first, then removed."""
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(trash)
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out_dir)
