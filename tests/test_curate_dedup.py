"""Deduplication: MinHash recall and false merges at known Jaccard similarities (measured on the
shingle sets, not assumed), exactness of exact dedup, and near duplicates in Korean."""
import random
import string

import numpy as np
import pytest

from lmfoundry.curate import synth
from lmfoundry.curate.dedup import (MinHasher, band_hashes, choose_bands, exact_duplicates, exact_hash,
                                    near_duplicates)
from lmfoundry.curate.text import shingle_words


def _shingles(text, n=5):
    w = shingle_words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _jaccard(a, b):
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def _run(texts, threshold=0.8, num_perm=112):
    hasher = MinHasher(num_perm=num_perm)
    ab = hasher.params()
    sigs = np.stack([hasher.signature(t, ab) for t in texts])
    bands, rows = choose_bands(threshold, num_perm)
    removed, kept_of, _ = near_duplicates(sigs, band_hashes(sigs, bands, rows), np.ones(len(texts), bool), threshold)
    return dict(zip(removed.tolist(), kept_of.tolist()))


@pytest.fixture(scope="module")
def planted():
    """600 random base documents, each followed by a variant with some words replaced; the pair's
    true 5-gram Jaccard similarity is computed exactly."""
    rng = random.Random(0)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(20000)]
    texts, pairs = [], []
    for i in range(600):
        base = rng.choices(vocab, k=300)
        variant = list(base)
        for p in rng.sample(range(300), rng.choice([rng.randint(0, 8), rng.randint(8, 40)])):
            variant[p] = rng.choice(vocab)
        a, b = " ".join(base), " ".join(variant)
        texts += [a, b]
        pairs.append((2 * i, 2 * i + 1, _jaccard(a, b)))
    return texts, pairs, _run(texts)


def test_minhash_recall_above_the_threshold(planted):
    texts, pairs, dups = planted
    above = [(a, b) for a, b, j in pairs if j >= 0.85]
    found = sum(dups.get(b) == a for a, b in above)
    assert len(above) > 100 and found / len(above) >= 0.95


def test_minhash_false_merges_well_below_the_threshold(planted):
    texts, pairs, dups = planted
    below = [(a, b) for a, b, j in pairs if j <= 0.6]
    merged = sum(b in dups for a, b in below)
    assert len(below) > 100 and merged / len(below) <= 0.05
    assert all(a // 2 == b // 2 for a, b in dups.items())     # never a merge of unrelated documents


def test_each_cluster_keeps_its_first_document():
    rng = random.Random(1)
    base = synth.english(rng, 6)
    copies = [base] + [synth.near_duplicate(rng, base, 0.01) for _ in range(4)]
    texts = [synth.english(rng, 6)] + copies
    dups = _run(texts)
    assert sorted(dups) == [2, 3, 4, 5] and set(dups.values()) == {1}


def test_band_choice_matches_datatrove_at_0_8_and_adapts():
    assert choose_bands(0.8, 112) == (14, 8)             # datatrove / FineWeb: 14 buckets x 8 hashes
    bands, rows = choose_bands(0.5, 112)
    assert 1 - (1 - 0.5 ** rows) ** bands >= 0.9


def test_exact_dedup_is_exact():
    texts = ["Hello  World", "hello world", "Hello World!", "hello\nworld", "Other", "Hello World!"]
    hashes = np.frombuffer(b"".join(exact_hash(t) for t in texts), dtype=np.dtype((np.void, 16)))
    dup, first = exact_duplicates(hashes)
    # case and whitespace are normalised; punctuation is not
    assert dict(zip(dup.tolist(), first.tolist())) == {1: 0, 3: 0, 5: 2}


def test_near_duplicates_are_found_in_korean_text():
    rng = random.Random(3)
    docs = [synth.korean(rng, 4) for _ in range(40)]
    variants = [synth.near_duplicate(rng, d, 0.02) for d in docs[:20]]
    assert all(_jaccard(d, v) > 0.8 for d, v in zip(docs, variants))
    dups = _run(docs + variants)
    assert {b: a for b, a in dups.items()} == {40 + i: i for i in range(20)}


def test_korean_shingles_stay_composed_syllables():
    """datatrove's normaliser decomposes Hangul into jamo (NFD); ours keeps syllables (NFKC)."""
    assert shingle_words("한국어 텍스트, 123개!") == ["한국어", "텍스트", "0개"]
