"""Language and script identification, good enough to route English and Korean.

    identify("오늘은 날씨가 좋다.")          # ("ko", 1.0)   Hangul share of the letters
    identify("The cat sat on the mat.")     # ("en", 0.83)  Latin letters and English function words

backend "script" (default, no dependency): the share of letters in each script of the first
SAMPLE characters decides: Hangul ≥ KO_MIN_HANGUL -> "ko"; mostly Latin with enough English
function words -> "en"; other Latin text -> "latn"; CJK ideographs -> "zh", kana -> "ja",
Cyrillic -> "ru" (script names, not a claim about the language); no letters -> "und".
backend "langid": py3langid's model (ships inside the package, 97 languages; `lmfoundry[curate]`);
its probability is the score.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import DataError

SAMPLE = 4000
KO_MIN_HANGUL = 0.3          # Korean web text mixes in Latin words; Hangul syllables are dense
EN_MIN_FUNCTION_WORDS = 0.05
EN_FUNCTION_WORDS = frozenset(
    "the of and to a in is that for it on as with was by at be this are or from an not have has had but which "
    "you they we he she his her their its our can will would there been were what all if so".split())
_LETTER = re.compile(r"[^\W\d_]")
SCRIPTS = [  # (label, code point ranges)
    ("ko", [(0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F)]),
    ("latn", [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)]),
    ("zh", [(0x4E00, 0x9FFF), (0x3400, 0x4DBF)]),
    ("ja", [(0x3040, 0x30FF)]),
    ("ru", [(0x400, 0x4FF)]),
]

_RANGES = sorted((a, b, i) for i, (_, ranges) in enumerate(SCRIPTS) for a, b in ranges)
_EDGES = np.array([x for a, b, _ in _RANGES for x in (a, b + 1)], dtype=np.uint32)
_RANGE_OWNER = np.array([i for _, _, i in _RANGES])


def script_shares(text: str) -> tuple[dict[str, float], int]:
    """{script: share of the letters} over the first SAMPLE characters, and the letter count."""
    cps = np.frombuffer(text[:SAMPLE].encode("utf-32-le"), dtype=np.uint32)
    slot = np.searchsorted(_EDGES, cps, side="right")          # odd slots lie inside a range
    per_range = np.bincount(slot, minlength=len(_EDGES) + 1)[1::2]
    counts = {name: int(per_range[_RANGE_OWNER == i].sum()) for i, (name, _) in enumerate(SCRIPTS)}
    letters = len(_LETTER.findall(text[:SAMPLE]))
    return {k: v / letters for k, v in counts.items()} if letters else {}, letters


def identify_script(text: str) -> tuple[str, float]:
    shares, letters = script_shares(text)
    if not letters:
        return "und", 0.0
    if shares["ko"] >= KO_MIN_HANGUL:
        return "ko", round(shares["ko"], 4)
    label, share = max(shares.items(), key=lambda kv: kv[1])
    if label == "latn":
        tokens = text[:SAMPLE].lower().split()
        function = sum(t.strip(".,;:!?\"'()") in EN_FUNCTION_WORDS for t in tokens) / max(len(tokens), 1)
        if function >= EN_MIN_FUNCTION_WORDS:
            return "en", round(share, 4)
    return label, round(share, 4)


_langid = None


def identify_langid(text: str) -> tuple[str, float]:
    global _langid
    if _langid is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise DataError("language backend 'langid' needs py3langid (pip install 'lmfoundry[curate]')") from None
        _langid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    label, prob = _langid.classify(text[:SAMPLE])
    return label, round(float(prob), 4)


BACKENDS = {"script": identify_script, "langid": identify_langid}


def identify(text: str, backend: str = "script") -> tuple[str, float]:
    """(language code, score in [0, 1]) of a text."""
    return BACKENDS[backend](text)
