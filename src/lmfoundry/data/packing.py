"""Packing tokenized documents into fixed-shape [B, T] rows whose documents never see each other.

The pretraining stream: documents are drawn from the sources (token-proportional mixture, each
source in its own seeded per-epoch shuffle), cut into pieces of at most T tokens, and wait in a
small pool; every row takes the longest waiting piece that still fits (best fit), until nothing
fits and the rest of the row is padding. Everything that decides the next batch is a few
counters and the pool, so `state_dict()` is small and resuming is exact.
"""
from __future__ import annotations

from bisect import bisect_right, insort
from collections import deque

import numpy as np
import torch

from ..errors import DataError
from .corpus import TokenDataset

IGNORE = -100


class PiecePool:
    """Pieces waiting for a row, by length: `take(space)` returns the longest piece of at most
    `space` tokens, the earliest added among equals."""

    def __init__(self):
        self._buckets: dict[int, deque] = {}
        self._lengths: list[int] = []    # the lengths that have pieces, sorted
        self._n = 0

    def __len__(self):
        return self._n

    def add(self, seq: int, piece, length: int):
        bucket = self._buckets.get(length)
        if bucket is None:
            bucket = self._buckets[length] = deque()
            insort(self._lengths, length)
        bucket.append((seq, piece))
        self._n += 1

    def take(self, space: int):
        i = bisect_right(self._lengths, space) - 1
        if i < 0:
            return None
        length = self._lengths[i]
        bucket = self._buckets[length]
        _, piece = bucket.popleft()
        if not bucket:
            del self._buckets[length]
            self._lengths.pop(i)
        self._n -= 1
        return piece

    def items(self) -> list:
        """[(seq, piece)] in the order they were added."""
        return sorted((x for b in self._buckets.values() for x in b), key=lambda x: x[0])


def fill_row(pool: PiecePool, seq_len: int, refill=None):
    """Take pieces from `pool` into one row of at most `seq_len` tokens (best fit), calling
    `refill()` before each pick so a streaming pool can top itself up; returns the row."""
    row, space = [], seq_len
    while space > 0:
        if refill is not None:
            refill()
        piece = pool.take(space)
        if piece is None:
            break
        row.append(piece)
        space -= piece[-1] - piece[-2]   # pieces end with (start, end)
    return row


def assemble(rows, seq_len: int, fetch) -> dict:
    """Rows of pieces -> the batch dict. `fetch(piece)` gives (tokens, labels or None); labels None
    means plain next-token targets inside the piece."""
    B = len(rows)
    input_ids = np.zeros((B, seq_len), dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE, dtype=np.int64)
    doc_ids = np.zeros((B, seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for d, piece in enumerate(row):
            tokens, targets = fetch(piece)
            n = len(tokens)
            input_ids[r, pos:pos + n] = tokens
            if targets is None:
                labels[r, pos:pos + n - 1] = tokens[1:]
            else:
                labels[r, pos:pos + n] = targets
            doc_ids[r, pos:pos + n] = d
            pos += n
        doc_ids[r, pos:] = len(row)   # padding: its own document
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(doc_ids)}


def _sources(sources) -> tuple[list[str], list[TokenDataset], list[float]]:
    if isinstance(sources, TokenDataset):
        sources = [(sources, 1.0)]
    if isinstance(sources, dict):
        items = list(sources.items())
    else:
        items = [(str(i), s) for i, s in enumerate(sources)]
    if not items:
        raise DataError("PackedBatches: no sources given")
    names, datasets, weights = [], [], []
    for name, s in items:
        ds, w = (s, 1.0) if isinstance(s, TokenDataset) else s
        if not isinstance(ds, TokenDataset):
            raise DataError(f"source {name!r}: expected a TokenDataset or (TokenDataset, weight), got {s!r:.80}")
        if not (isinstance(w, (int, float)) and w >= 0):
            raise DataError(f"source {name!r}: weight must be a number >= 0, got {w!r}")
        if len(ds) == 0:
            raise DataError(f"source {name!r}: {ds.path} has no documents")
        names.append(str(name))
        datasets.append(ds)
        weights.append(float(w))
    for name, ds in zip(names[1:], datasets[1:]):   # mixing token ids of two tokenizers is a silent disaster
        first, key = datasets[0], lambda d: (d.index.get("key") or {}).get("tokenizer_sha256")
        if (ds.vocab_size, ds.eos_token_id) != (first.vocab_size, first.eos_token_id) or \
                None not in (key(ds), key(first)) and key(ds) != key(first):
            raise DataError(f"sources {names[0]!r} ({first.path}) and {name!r} ({ds.path}) were tokenized with "
                            "different tokenizers")
    return names, datasets, weights


def _stages(stages, names, weights) -> list[dict]:
    if stages is None:
        if not any(weights):
            raise DataError("every source has weight 0")
        return [{"tokens": None, "weights": weights}]
    if not isinstance(stages, (list, tuple)) or not stages:
        raise DataError("stages must be a non-empty list of {'tokens': budget, 'mixture': {source: weight}}")
    out = []
    for k, st in enumerate(stages):
        tokens = st.get("tokens") if isinstance(st, dict) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            raise DataError(f"stage {k}: 'tokens' must be a positive integer token budget, got {tokens!r}")
        mixture = st.get("mixture")
        if mixture is None:
            w = list(weights)
        else:
            unknown = [m for m in mixture if str(m) not in names]
            if unknown:
                raise DataError(f"stage {k}: mixture names unknown sources {unknown} (sources: {names})")
            mix = {str(m): v for m, v in mixture.items()}
            if any(not isinstance(v, (int, float)) or v < 0 for v in mix.values()):
                raise DataError(f"stage {k}: mixture weights must be numbers >= 0, got {mixture}")
            w = [float(mix.get(n, 0.0)) for n in names]
        if not any(w):
            raise DataError(f"stage {k}: every source has weight 0")
        out.append({"tokens": tokens, "weights": w})
    return out


def check_args(seq_len, batch_size, seed, rank, world_size, epochs=None, window=1):
    """The batch iterators' shared argument checks, one DataError naming the argument."""
    for what, v in (("seq_len", seq_len), ("batch_size", batch_size), ("window", window),
                    ("world_size", world_size)):
        if not isinstance(v, int) or v < 1:
            raise DataError(f"{what} must be a positive integer, got {v!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise DataError(f"epochs must be a positive integer or None (endless), got {epochs!r}")


class PackedBatches:
    """Pretraining batches {"input_ids", "labels", "doc_ids"}: LongTensor [batch_size, seq_len].

    sources: a TokenDataset, a list of (TokenDataset, weight) (named "0", "1", ...) or a dict
        name -> (TokenDataset, weight). Weights are token proportions: the next document always
        comes from the source furthest below its share of the tokens drawn so far, so the mixture
        holds exactly (to within a document) at every point, not just on average.
    Order: each source is read in a shuffled order that is new every epoch of that source and
        fixed by (seed, source position, epoch). A source that runs out starts its next epoch.
    Packing: documents are never split to fill a row; only documents longer than seq_len are
        split, into seq_len-token chunks (each chunk is its own document for attention and RoPE).
        Rows are filled best-fit from a pool of `window` waiting pieces; the unfilled rest of a
        row is padding (input 0, label -100, its own doc id). Labels: input_ids[t + 1] of the
        same document, -100 at each document's (chunk's) last token, so the EOS every document
        ends with is predicted but nothing is predicted across a boundary.
    stages: a list of {"tokens": budget, "mixture": {name: weight}} (mixture defaults to the
        source weights). Stage k supplies exactly `budget` tokens (the document that crosses the
        budget is cut there and its rest skipped); they are all yielded before any of stage k+1,
        whose rows start fresh (the last row of a stage may be padded). Iteration stops after
        the last stage; its last batch is filled up with all-padding rows. Without stages the
        iterator never ends. `tokens_yielded` counts real (non-padding) tokens of all ranks.
    rank / world_size: every rank builds the same global plan of batch_size * world_size rows
        and reads only its own batch_size rows.
    """

    def __init__(self, sources, seq_len: int, batch_size: int, seed: int = 0, stages=None, *,
                 window: int = 128, rank: int = 0, world_size: int = 1):
        self.names, self.datasets, weights = _sources(sources)
        self.stages = _stages(stages, self.names, weights)
        check_args(seq_len, batch_size, seed, rank, world_size, window=window)
        self.seq_len, self.batch_size, self.seed, self.window = seq_len, batch_size, seed, window
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._reset()

    @property
    def total_tokens(self) -> int | None:
        """The sum of the stage budgets (None without stages: endless)."""
        budgets = [s["tokens"] for s in self.stages]
        return None if None in budgets else sum(budgets)

    @property
    def stage(self) -> int:
        return self._stage

    def _reset(self):
        n = len(self.datasets)
        self._cursors = [[0, 0] for _ in range(n)]     # per source: epoch, position in that epoch's order
        self._partial = None                           # [source, doc, next start] of a long document
        self._pool, self._next_seq = PiecePool(), 0
        self._stage, self._stage_drawn, self._stage_source_tokens = 0, 0, [0] * n
        self._flushing = False                         # the stage's budget is drawn; empty the pool
        self._done = False
        self.tokens_yielded, self.batches_yielded = 0, 0

    # ---- drawing documents ----
    def _order(self, src: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(src)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, src, epoch])
            cached = self._perms[src] = (epoch, rng.permutation(len(self.datasets[src])))
        return cached[1]

    def _choose_source(self) -> int:
        weights = self.stages[self._stage]["weights"]
        return min((i for i, w in enumerate(weights) if w > 0),
                   key=lambda i: (self._stage_source_tokens[i] / weights[i], i))

    def _draw(self):
        if self._partial is not None:
            src, doc, start = self._partial
        else:
            src = self._choose_source()
            epoch, pos = self._cursors[src]
            doc = int(self._order(src, epoch)[pos])
            self._cursors[src] = [epoch + 1, 0] if pos + 1 == len(self.datasets[src]) else [epoch, pos + 1]
            start = 0
        length = int(self.datasets[src].doc_lengths[doc])
        end = min(length, start + self.seq_len)
        budget = self.stages[self._stage]["tokens"]
        if budget is not None:
            end = min(end, start + budget - self._stage_drawn)
        self._partial = [src, doc, end] if end < length else None
        self._stage_drawn += end - start
        self._stage_source_tokens[src] += end - start
        if budget is not None and self._stage_drawn >= budget:
            self._flushing, self._partial = True, None
        self._pool.add(self._next_seq, (src, doc, start, end), end - start)
        self._next_seq += 1

    def _refill(self):
        while len(self._pool) < self.window and not self._flushing:
            self._draw()

    def _next_row(self):
        if self._flushing and not len(self._pool):
            if self._stage + 1 == len(self.stages):
                return None
            self._stage += 1
            self._stage_drawn, self._stage_source_tokens = 0, [0] * len(self.datasets)
            self._flushing = False
        return fill_row(self._pool, self.seq_len, self._refill)

    def _fetch(self, piece):
        src, doc, start, end = piece
        return self.datasets[src].document(doc)[start:end], None

    # ---- iteration ----
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        rows, total = [], self.batch_size * self.world_size
        while len(rows) < total:
            row = self._next_row()
            if row is None:
                self._done = True
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        rows += [[] for _ in range(total - len(rows))]
        self.tokens_yielded += sum(p[3] - p[2] for row in rows for p in row)
        self.batches_yielded += 1
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return assemble(mine, self.seq_len, self._fetch)

    # ---- exact resume ----
    def _identity(self) -> dict:
        return {"seq_len": self.seq_len, "global_rows": self.batch_size * self.world_size, "seed": self.seed,
                "window": self.window, "sources": self.names, "documents": [len(d) for d in self.datasets],
                "stages": self.stages}

    def state_dict(self) -> dict:
        return {"version": 1, **self._identity(), "cursors": [list(c) for c in self._cursors],
                "partial": self._partial, "pool": [[seq, *piece] for seq, piece in self._pool.items()],
                "next_seq": self._next_seq, "stage": self._stage, "stage_drawn": self._stage_drawn,
                "stage_source_tokens": list(self._stage_source_tokens), "flushing": self._flushing,
                "done": self._done, "tokens_yielded": self.tokens_yielded, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict):
        mine = self._identity()
        theirs = {k: state.get(k) for k in mine}
        if json_like(theirs) != json_like(mine):
            diff = [k for k in mine if json_like(mine[k]) != json_like(theirs[k])]
            raise DataError(f"cannot resume: the saved data state differs in {diff} "
                            f"(saved {[theirs[k] for k in diff]}, now {[mine[k] for k in diff]})")
        self._reset()
        self._cursors = [list(c) for c in state["cursors"]]
        self._partial = list(state["partial"]) if state["partial"] is not None else None
        for seq, src, doc, start, end in state["pool"]:
            self._pool.add(seq, (src, doc, start, end), end - start)
        self._next_seq, self._stage = state["next_seq"], state["stage"]
        self._stage_drawn, self._stage_source_tokens = state["stage_drawn"], list(state["stage_source_tokens"])
        self._flushing, self._done = state["flushing"], state["done"]
        self.tokens_yielded, self.batches_yielded = state["tokens_yielded"], state["batches_yielded"]


def json_like(x):
    """Tuples and lists compare equal after a JSON round trip; normalise before comparing."""
    if isinstance(x, (list, tuple)):
        return [json_like(v) for v in x]
    if isinstance(x, dict):
        return {str(k): json_like(v) for k, v in x.items()}
    return x
