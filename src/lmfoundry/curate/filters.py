"""Rule-based quality filters: each rule a row of data (its published default), one engine.

A rule is (name, parameter, kind, statistic): the document is dropped when the statistic is
below a "min" parameter or above a "max" one; a parameter set to null/0 switches its rule off
(as in datatrove). Rules run in table order and the first that fails is the reason recorded.

| filter            | source of the rules and defaults                                             |
| gopher_quality    | Gopher (Rae et al. 2021) A.1; datatrove GopherQualityFilter                   |
| gopher_repetition | Gopher Table A1; datatrove GopherRepetitionFilter                            |
| c4                | C4 (Raffel et al. 2020) line rules; datatrove C4QualityFilter (it edits text) |
| fineweb           | FineWeb's extra rules; datatrove FineWebQualityFilter                        |
| length            | plain bounds on characters and words (no published defaults: all off)       |

Statistics come from `Doc` (words, lines, paragraphs computed once and shared by every rule).
English-tuned settings are wrong for Korean (no English stop words; eojeol are short), so
LANGUAGE_DEFAULTS replaces them per detected language; users can override both in YAML.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from .text import SENTENCE_END, sentence_count, words

# ---------------------------------------------------------------- symbols the rules count

# datatrove's PUNCTUATION_SET: a "word" made only of these is a symbol, not a word.
SYMBOL_CHARS = set("!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»") | {
    chr(c) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for c in range(a, b)} | SENTENCE_END
TERMINAL = tuple(SENTENCE_END)
STOP_WORDS_EN = ["the", "be", "to", "of", "and", "that", "have", "with"]
# Korean "stop words" are particles and endings glued to the word (eojeol), matched as suffixes.
PARTICLES_KO = ["은", "는", "이", "가", "을", "를", "의", "에", "에서", "으로", "로", "와", "과", "도", "만", "까지",
                "부터", "다", "고", "며", "면", "서", "요", "니다", "지만", "하여", "해서", "한", "된", "인"]
C4_POLICY = ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"]
C4_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
C4_END = (".", "?", "!", '"', "'")

# ---------------------------------------------------------------- the rule tables

MIN, MAX = "min", "max"
RULES: dict[str, list[tuple[str, str, str, str | tuple]]] = {
    "gopher_quality": [
        ("min_doc_words", "min_doc_words", MIN, "n_words"),
        ("max_doc_words", "max_doc_words", MAX, "n_words"),
        ("min_avg_word_length", "min_avg_word_length", MIN, "avg_word_length"),
        ("max_avg_word_length", "max_avg_word_length", MAX, "avg_word_length"),
        ("max_hash_ratio", "max_symbol_word_ratio", MAX, "hash_ratio"),
        ("max_ellipsis_ratio", "max_symbol_word_ratio", MAX, "ellipsis_ratio"),
        ("max_bullet_lines_ratio", "max_bullet_lines_ratio", MAX, "bullet_lines_ratio"),
        ("max_ellipsis_lines_ratio", "max_ellipsis_lines_ratio", MAX, "ellipsis_lines_ratio"),
        ("min_alpha_words_ratio", "max_non_alpha_words_ratio", MIN, "alpha_words_ratio"),
        ("min_stop_words", "min_stop_words", MIN, "stop_words"),
    ],
    "gopher_repetition": [
        ("dup_para_frac", "dup_para_frac", MAX, "dup_para_frac"),
        ("dup_para_char_frac", "dup_para_char_frac", MAX, "dup_para_char_frac"),
        ("dup_line_frac", "dup_line_frac", MAX, "dup_line_frac"),
        ("dup_line_char_frac", "dup_line_char_frac", MAX, "dup_line_char_frac"),
        *[(f"top_{n}_gram_frac", f"top_{n}_gram_frac", MAX, ("top_ngram_frac", n)) for n in (2, 3, 4)],
        *[(f"dup_{n}_gram_frac", f"dup_{n}_gram_frac", MAX, ("dup_ngram_frac", n)) for n in range(5, 11)],
    ],
    "fineweb": [
        ("line_punct_ratio", "line_punct_thr", MIN, "line_punct_ratio"),
        ("short_line_ratio", "short_line_thr", MAX, "short_line_ratio"),
        ("char_dup_ratio", "char_duplicates_ratio", MAX, "char_dup_ratio"),
        ("list_ratio", "new_line_ratio", MAX, "newline_ratio"),
    ],
    "length": [
        ("min_chars", "min_chars", MIN, "n_chars"),
        ("max_chars", "max_chars", MAX, "n_chars"),
        ("min_words", "min_words", MIN, "n_words"),
        ("max_words", "max_words", MAX, "n_words"),
    ],
}

# Parameters of each filter with their published defaults (the keys a YAML step may set).
DEFAULTS: dict[str, dict] = {
    "gopher_quality": {"min_doc_words": 50, "max_doc_words": 100_000, "min_avg_word_length": 3,
                       "max_avg_word_length": 10, "max_symbol_word_ratio": 0.1, "max_bullet_lines_ratio": 0.9,
                       "max_ellipsis_lines_ratio": 0.3, "max_non_alpha_words_ratio": 0.8, "min_stop_words": 2,
                       "stop_words": STOP_WORDS_EN, "stop_word_match": "word"},
    "gopher_repetition": {"dup_line_frac": 0.3, "dup_para_frac": 0.3, "dup_line_char_frac": 0.2,
                          "dup_para_char_frac": 0.2, "top_2_gram_frac": 0.2, "top_3_gram_frac": 0.18,
                          "top_4_gram_frac": 0.16, "dup_5_gram_frac": 0.15, "dup_6_gram_frac": 0.14,
                          "dup_7_gram_frac": 0.13, "dup_8_gram_frac": 0.12, "dup_9_gram_frac": 0.11,
                          "dup_10_gram_frac": 0.1},
    "c4": {"remove_citations": True, "filter_no_terminal_punct": True, "min_num_sentences": 5,
           "min_words_per_line": 3, "max_word_length": 1000, "filter_lorem_ipsum": True, "filter_javascript": True,
           "filter_curly_bracket": True, "filter_policy": True},
    "fineweb": {"line_punct_thr": 0.12, "line_punct_exclude_zero": False, "short_line_thr": 0.67,
                "short_line_length": 30, "char_duplicates_ratio": 0.01, "new_line_ratio": 0.3},
    "length": {"min_chars": None, "max_chars": None, "min_words": None, "max_words": None},
}

# Per-language replacements of the English-tuned settings (a language not listed uses DEFAULTS).
# Korean: eojeol carry particles, so "stop words" are particle suffixes; eojeol average about
# 3 syllables, so the 3-10 character band would drop most Korean prose; lines are denser.
LANGUAGE_DEFAULTS: dict[str, dict[str, dict]] = {
    "ko": {"gopher_quality": {"min_avg_word_length": 1.5, "max_avg_word_length": 10, "stop_words": PARTICLES_KO,
                              "stop_word_match": "suffix", "min_stop_words": 3},
           "fineweb": {"short_line_length": 15}},
}


@dataclass
class Removal:
    """Why a document was dropped: the step, its rule, the measured value and the threshold."""
    step: str
    rule: str
    value: float | int | str | None = None
    threshold: float | int | str | None = None

    def as_dict(self) -> dict:
        v = round(self.value, 4) if isinstance(self.value, float) else self.value
        return {"step": self.step, "rule": self.rule, "value": v, "threshold": self.threshold}


# ---------------------------------------------------------------- statistics of one document

def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated items, their characters): every occurrence after the first counts."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


class Doc:
    """A document's text and everything the rules measure on it, each computed on first use."""

    _PARA = re.compile(r"\n{2,}")
    _LINES = re.compile(r"\n+")

    def __init__(self, text: str, lang: str = "en"):
        self.text, self.lang = text, lang

    def set_text(self, text: str):
        """Replace the text (C4 edits it, redaction rewrites it); forget every statistic."""
        lang = self.lang
        self.__dict__.clear()
        self.text, self.lang = text, lang

    @cached_property
    def words(self) -> list[str]:
        return words(self.text)

    @cached_property
    def word_ids(self) -> list[int]:
        ids: dict[str, int] = {}
        return [ids.setdefault(w, len(ids)) for w in self.words]

    @cached_property
    def content_words(self) -> list[str]:
        return [w for w in self.words if not SYMBOL_CHARS.issuperset(w)]

    def n_chars(self, _):
        return len(self.text)

    def n_words(self, _):
        return len(self.content_words)

    def avg_word_length(self, _):
        cw = self.content_words
        return sum(map(len, cw)) / len(cw) if cw else float("nan")

    def hash_ratio(self, _):
        return self.text.count("#") / len(self.words)

    def ellipsis_ratio(self, _):
        return (self.text.count("...") + self.text.count("…")) / len(self.words)

    @cached_property
    def splitlines(self) -> list[str]:
        return self.text.splitlines()

    def bullet_lines_ratio(self, _):
        return sum(s.lstrip().startswith(("•", "-")) for s in self.splitlines) / len(self.splitlines)

    def ellipsis_lines_ratio(self, _):
        return sum(s.rstrip().endswith(("...", "…")) for s in self.splitlines) / len(self.splitlines)

    def alpha_words_ratio(self, _):
        return sum(w.isalpha() or any(c.isalpha() for c in w) for w in self.words) / len(self.words)

    def stop_words(self, p):
        stop = set(p["stop_words"])
        if p["stop_word_match"] == "suffix":     # particles of 1-4 characters glued to a longer word
            return len(stop.intersection(w[-k:] for w in set(self.words) for k in (1, 2, 3, 4) if len(w) > k))
        return len(stop.intersection(self.words))

    # Gopher repetition
    def _dup_frac(self, items: list[str]):
        n, chars = _duplicates(items)
        return n / len(items), chars / len(self.text)

    @cached_property
    def _paragraph_dups(self):
        return self._dup_frac(self._PARA.split(self.text.strip()))

    @cached_property
    def _line_dups(self):
        return self._dup_frac(self._LINES.split(self.text))

    def dup_para_frac(self, _):
        return self._paragraph_dups[0]

    def dup_para_char_frac(self, _):
        return self._paragraph_dups[1]

    def dup_line_frac(self, _):
        return self._line_dups[0]

    def dup_line_char_frac(self, _):
        return self._line_dups[1]

    def top_ngram_frac(self, _, n: int):
        """Characters of the most frequent n-gram (first seen wins a tie) times its count."""
        ids, ws = self.word_ids, self.words
        if len(ids) < n:
            return 0.0
        counts = Counter(zip(*(ids[i:] for i in range(n))))
        gram, count = counts.most_common(1)[0]
        start = next(i for i in range(len(ids)) if tuple(ids[i:i + n]) == gram)
        return (sum(len(w) for w in ws[start:start + n]) + n - 1) * count / len(self.text)

    @cached_property
    def _repeat_starts(self) -> list[int]:
        """Positions whose 5-gram occurs more than once: the only places a repeated n-gram
        (n >= 5) can start."""
        ids = self.word_ids
        grams = list(zip(ids, ids[1:], ids[2:], ids[3:], ids[4:]))
        counts = Counter(grams)
        return [i for i, g in enumerate(grams) if counts[g] > 1]

    def dup_ngram_frac(self, _, n: int):
        """Characters in repeated n-grams, scanning left to right and jumping past each repeat
        (Gopher's definition as datatrove implements it). A position whose n-gram occurs once
        in the whole text cannot change the outcome, so only repeat candidates are visited."""
        ids, ws = self.word_ids, self.words
        starts = [i for i in self._repeat_starts if i + n <= len(ids)]
        grams = [tuple(ids[i:i + n]) for i in starts]
        counts = Counter(grams)
        seen, chars, idx = set(), 0, 0
        for pos, g in zip(starts, grams):
            if pos < idx or counts[g] < 2:
                continue
            if g in seen:
                chars += sum(len(w) for w in ws[pos:pos + n])
                idx = pos + n
            else:
                seen.add(g)
                idx = pos + 1
        return chars / len(self.text)

    # FineWeb
    @cached_property
    def nonempty_lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line.strip()]

    def line_punct_ratio(self, p):
        lines = self.nonempty_lines
        ratio = sum(line.endswith(TERMINAL) for line in lines) / len(lines)
        return 1.0 if ratio == 0 and p["line_punct_exclude_zero"] else ratio

    def short_line_ratio(self, p):
        lines = self.nonempty_lines
        return sum(len(line) <= p["short_line_length"] for line in lines) / len(lines)

    def char_dup_ratio(self, _):
        return _duplicates(self.nonempty_lines)[1] / max(len(self.text.replace("\n", "")), 1)

    def newline_ratio(self, _):
        return self.text.count("\n") / max(len(self.words), 1)


# ---------------------------------------------------------------- the engine

def settings(step: str, params: dict, lang: str) -> dict:
    """Defaults, then the language's replacements, then the user's values, then the user's
    per-language values (`params["languages"][lang]`)."""
    out = dict(DEFAULTS[step])
    out.update(LANGUAGE_DEFAULTS.get(lang, {}).get(step, {}))
    out.update({k: v for k, v in params.items() if k != "languages"})
    out.update((params.get("languages") or {}).get(lang, {}))
    return out


def check(step: str, doc: Doc, params: dict) -> Removal | None:
    """Apply one filter's rule table (or C4's line rules) to `doc`; the first failing rule."""
    p = settings(step, params, doc.lang)
    if step == "c4":
        return c4(doc, p)
    if not doc.words and step != "length":
        return Removal(step, "no_words", 0, None)
    if step == "fineweb" and not doc.nonempty_lines:
        return Removal(step, "empty")
    for rule, param, kind, stat in RULES[step]:
        threshold = p[param]
        if not threshold:
            continue
        name, *args = stat if isinstance(stat, tuple) else (stat,)
        value = getattr(doc, name)(p, *args)
        if (value < threshold) if kind == MIN else (value > threshold):
            return Removal(step, rule, value, threshold)
    return None


def c4(doc: Doc, p: dict) -> Removal | None:
    """C4's line rules: drop lines (too long a word, no terminal punctuation, too few words,
    'javascript', policy boilerplate), drop the document for 'lorem ipsum', a curly bracket or
    fewer than `min_num_sentences` sentences in what is left; the kept lines replace the text."""
    kept, sentences = [], 0
    for line in doc.text.splitlines():
        line = line.strip()
        line_words = line.split()
        if p["max_word_length"] != -1 and any(len(w) > p["max_word_length"] for w in line_words):
            continue
        if p["remove_citations"]:
            line = C4_CITATION.sub("", line)
        if p["filter_no_terminal_punct"] and (not line.endswith(C4_END) or line.endswith("...")):
            continue
        if len(line_words) < p["min_words_per_line"]:
            continue
        lower = line.lower()
        if p["filter_lorem_ipsum"] and "lorem ipsum" in lower:
            return Removal("c4", "lorem_ipsum")
        if p["filter_javascript"] and "javascript" in lower:
            continue
        if p["filter_curly_bracket"] and "{" in line:
            return Removal("c4", "curly_bracket")
        if p["filter_policy"] and any(x in lower for x in C4_POLICY):
            continue
        if p["min_num_sentences"] != -1:
            sentences += sentence_count(words(line))
        kept.append(line)
    if sentences < p["min_num_sentences"]:
        return Removal("c4", "min_num_sentences", sentences, p["min_num_sentences"])
    text = "\n".join(kept).strip()
    if text != doc.text:
        doc.set_text(text)
    return None
