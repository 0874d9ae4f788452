"""Deduplication: exact (normalised-text hash) and near (MinHash over word 5-grams, LSH bands).

Per document (in the workers, shard by shard):
    exact_hash(text)              16-byte blake2b of the NFKC, lower-cased, whitespace-collapsed text
    MinHasher(...).signature(text) num_perm 32-bit minimums of (a*h + b) >> 32 over the 64-bit
                                  hashes h of the word 5-grams (words from text.shingle_words)
Across all shards, once (`find_duplicates`, the merge step):
    exact: every copy after the first (in shard order, then position) is removed;
    near:  documents sharing any LSH band (rows consecutive minhashes) are candidates; a candidate
           pair is confirmed when the share of equal minhashes (an unbiased estimate of the
           Jaccard similarity) is at least threshold - VERIFY_SLACK; confirmed pairs are joined
           with union-find and each cluster keeps its first document.

Bands: datatrove/FineWeb use 14 bands x 8 rows (112 hashes) for 0.8. Here, unless given, rows
are the most that still make a pair AT the threshold a candidate with probability >= 0.9,
1 - (1 - t^rows)^bands >= 0.9 with bands = num_perm // rows (0.8 and 112 hashes -> 14 x 8).
The verification removes band collisions far below the threshold; VERIFY_SLACK (two standard
errors of the estimate at the threshold) keeps it from costing recall at the threshold.
"""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np

from .text import shingle_words

MASK64 = (1 << 64) - 1
_word_hash_cache: dict[str, int] = {}


def exact_hash(text: str) -> bytes:
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


def _word_hashes(tokens: list[str]) -> np.ndarray:
    cache = _word_hash_cache
    out = []
    for w in tokens:
        h = cache.get(w)
        if h is None:
            h = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
            if len(cache) > 1 << 21:
                cache.clear()
            cache[w] = h
        out.append(h)
    return np.array(out, dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of a 64-bit value (vectorised, wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every run of n consecutive tokens (one hash of all of them if fewer)."""
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    w = _word_hashes(tokens)
    n = min(n, len(w))
    with np.errstate(over="ignore"):
        h = np.zeros(len(w) - n + 1, dtype=np.uint64)
        for i in range(n):
            h = h * np.uint64(0x100000001B3) + w[i:len(w) - n + 1 + i]
        return _mix(h)


def choose_bands(threshold: float, num_perm: int, min_recall: float = 0.9) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still catch a pair at `threshold` with
    probability >= min_recall."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= min_recall:
            best = (bands, rows)
    return best


@dataclass(frozen=True)
class MinHasher:
    num_perm: int = 112
    ngram: int = 5
    seed: int = 1

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        return a, b

    def signature(self, text: str, ab=None) -> np.ndarray:
        """num_perm uint32 minhashes of the text's word n-grams (all 0xFFFFFFFF if it has none)."""
        a, b = ab if ab is not None else self.params()
        h = ngram_hashes(shingle_words(text), self.ngram)
        if not len(h):
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        with np.errstate(over="ignore"):
            return ((h[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).min(axis=0).astype(np.uint32)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[docs, bands] uint64: one hash per band of `rows` consecutive minhashes."""
    sig = signatures[:, :bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    with np.errstate(over="ignore"):
        h = np.zeros(sig.shape[:2], dtype=np.uint64)
        for r in range(rows):
            h = h * np.uint64(0x9E3779B97F4A7C15) + sig[:, :, r]
        return _mix(h + np.arange(bands, dtype=np.uint64)[None, :])


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def roots(self) -> np.ndarray:
        """Every element's root (parents always point to smaller ids, so pointer jumping ends)."""
        p = self.parent
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return q
            p = q

    def union(self, a: int, b: int):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)      # the smaller id (earlier document) is the root


def exact_duplicates(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids of copies, ids of the first document each copies) for [docs] 16-byte hashes."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    keep_of = first[inverse.reshape(-1)]
    dup = np.nonzero(keep_of != np.arange(len(hashes)))[0]
    return dup, keep_of[dup]


def candidate_pairs(bands: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """[pairs, 2] (earlier, later) ids sharing a band: each document with the first and the
    previous document of its bucket, in id order."""
    ids = np.nonzero(alive)[0]
    pairs = []
    for b in range(bands.shape[1]):
        col = bands[ids, b]
        order = np.lexsort((ids, col))
        sorted_ids, sorted_col = ids[order], col[order]
        same = np.nonzero(sorted_col[1:] == sorted_col[:-1])[0] + 1
        if not len(same):
            continue
        starts = np.r_[0, np.nonzero(sorted_col[1:] != sorted_col[:-1])[0] + 1]
        first_of = starts[np.searchsorted(starts, np.arange(len(sorted_col)), side="right") - 1]
        pairs.append(np.stack([sorted_ids[first_of[same]], sorted_ids[same]], axis=1))
        prev = same[first_of[same] != same - 1]
        pairs.append(np.stack([sorted_ids[prev - 1], sorted_ids[prev]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def near_duplicates(signatures, bands: np.ndarray, alive: np.ndarray, threshold: float,
                    chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids removed, id of the kept document of their cluster, estimated similarity to the
    document that joined them) over documents with `alive` set. `signatures[i]` may be a
    memory-mapped view: only candidate pairs are read."""
    num_perm = signatures.shape[1]
    slack = verify_slack(threshold, num_perm)
    pairs = candidate_pairs(bands, alive)
    uf = UnionFind(len(alive))
    similarity = np.zeros(len(alive), dtype=np.float32)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        est = (signatures[p[:, 0]] == signatures[p[:, 1]]).mean(axis=1)
        for (a, b), e in zip(p[est >= threshold - slack], est[est >= threshold - slack]):
            uf.union(int(a), int(b))
            similarity[b] = max(similarity[b], e)
    roots = uf.roots()
    removed = np.nonzero((roots != np.arange(len(alive))) & alive)[0]
    return removed, roots[removed], similarity[removed]


def verify_slack(threshold: float, num_perm: int) -> float:
    """Two standard errors of the minhash estimate of a Jaccard similarity equal to threshold."""
    return 2 * float(np.sqrt(threshold * (1 - threshold) / num_perm))
