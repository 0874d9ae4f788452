"""Words, sentences and normalised text: what every curation rule counts.

    words("Don't stop, Mr. Smith.")   # ['Do', "n't", 'stop', ',', 'Mr.', 'Smith', '.']
    sentence_count(words(line))        # the sentences a line holds
    shingle_words(text)                # lower-cased, digits -> 0, punctuation -> space, NFKC

`words` follows the rules of spaCy's blank English tokenizer, which datatrove's Gopher, C4 and
FineWeb filters use for English ("eng" -> spacy.blank("en")): split on whitespace; peel prefixes
(opening punctuation, quotes, currency) and suffixes (closing punctuation, quotes, "'s", units
after digits, a final period after a lower-case letter, a digit or two capitals) off each chunk;
keep contractions, abbreviations and URLs as their special cases say; split the rest on infixes
(ellipses, hyphens between letters, "," between letters, ":<>=/" between letters or digits).
The rules are written here, in our words; tests compare the output with spaCy's token by token.
For Korean the same rules give eojeol (space-separated words) with punctuation split off.
"""
from __future__ import annotations

import re
import sys
import unicodedata

# ---------------------------------------------------------------- character classes


def _chars(test) -> str:
    """A regex character class body of every BMP character for which `test` holds."""
    out, start = [], None
    for cp in range(0x10000 + 1):
        ok = cp < 0x10000 and not 0xD800 <= cp <= 0xDFFF and test(chr(cp))
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            out.append(re.escape(chr(start)) + ("-" + re.escape(chr(cp - 1)) if cp - 1 > start else ""))
            start = None
    return "".join(out)


def _uncased(c: str) -> bool:
    return c.isalpha() and not c.isupper() and not c.islower()


# Letters of scripts without case (Hangul, CJK, Arabic, ...) count as both lower and upper, as in spaCy.
LOWER = _chars(lambda c: c.islower() or _uncased(c))
UPPER = _chars(lambda c: c.isupper() or _uncased(c))
ALPHA = _chars(str.isalpha)
SYMBOLS = _chars(lambda c: unicodedata.category(c) == "So")          # dingbats, emoji (BMP)
PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉〈〉⟦⟧"
CURRENCY = ["US$", "C$", "A$", "$", "£", "€", "¥", "฿", "₽", "﷼", "₴", "₩", "₪", "₫", "₹", "₺", "₿", "₱", "₦", "₲"]
UNITS = ("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h "
         "kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %").split()
HYPHENS = ["---", "--", "——", "-", "–", "—", "~"]
SENTENCE_END = set(".!?։؟۔।॥၊။።፧፨‼‽⁇⁈⁉⸮⸼！．？｡。﹒﹖﹗")


def _alt(items) -> str:
    return "|".join(re.escape(x) for x in sorted(items, key=len, reverse=True))


def _class(chars: str) -> str:
    return "[" + "".join(re.escape(c) for c in chars) + "]"


_prefix = re.compile("^(?:§|%|=|—|–|\\+(?![0-9])|" + _class(PUNCT) + "|\\.\\.+|" + _class(QUOTES) + "|"
                     + _alt(CURRENCY) + f"|[{SYMBOLS}])")
_suffix = re.compile("(?:" + "|".join(
    x + "$" for x in [_class(PUNCT), "\\.\\.+", _class(QUOTES), f"[{SYMBOLS}]", "'s", "'S", "’s", "’S", "—", "–",
                      "(?<=[0-9])\\+", "(?<=°[FfCcKk])\\.", "(?<=[0-9])(?:" + _alt(CURRENCY) + ")",
                      "(?<=[0-9])(?:" + _alt(UNITS) + ")",
                      f"(?<=[0-9{LOWER}%²\\-\\+{re.escape(PUNCT + QUOTES)}])\\.", f"(?<=[{UPPER}][{UPPER}])\\."]) + ")")
_infix = re.compile("|".join([
    "\\.\\.+", "…", f"[{SYMBOLS}]", "(?<=[0-9])[+\\-\\*^](?=[0-9-])",
    f"(?<=[{LOWER}{re.escape(QUOTES)}])\\.(?=[{UPPER}{re.escape(QUOTES)}])", f"(?<=[{ALPHA}]),(?=[{ALPHA}])",
    f"(?<=[{ALPHA}0-9])(?:{_alt(HYPHENS)})(?=[{ALPHA}])", f"(?<=[{ALPHA}0-9])[:<>=/](?=[{ALPHA}])"]))
_url = re.compile(r"^(?:[\w+.-]{2,}://)?(?:\S+(?::\S*)?@)?(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]"
                  r"{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+[" + LOWER + r"]{2,63}(?::\d{2,5})?(?:[/?#]\S*)?$")

# ---------------------------------------------------------------- special cases (English)
# Contractions split as spaCy's English exceptions do: the base, then the clitic; also the
# forms typed without an apostrophe ("dont" -> do + nt). Abbreviations stay whole.
# base -> clitics; every pronoun-like base also takes 'd, 'd've, 'll, 'll've; the n't bases take n't
# (and n't've unless marked with *); ca/wo/sha/ai are can/will/shall/ain't cut before "n't".
CLITICS = {"he she it that this": "'s", "i": "'m 've", "you we they these those": "'re 've",
           "how what when where who why there": "'re 's 've", "could might must should would not": "'ve"}
NT_BASES = ("ca wo sha ai* do does did is* are* was* were* have* has* had could would should might must need ought "
            "may dare*")
WHOLE = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "let's": ("let", "'s"),
         "y'all": ("y'", "all"), "c'mon": ("c'm", "on"), "i'ma": ("i", "'m", "a")}
NOT_WITHOUT_APOSTROPHE = {"its", "ill", "well", "hell", "shell", "were", "shed", "lets", "cmon", "whore", "heres"}
ABBREVIATIONS = ("Mr. Mrs. Ms. Dr. Prof. St. Mt. Jr. Gen. Gov. Sen. Rep. Rev. Adm. Inc. Ltd. Co. Corp. Bros. "
                 "Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. vs. v.s. co. a.m. p.m. e.g. i.e. "
                 "E.g. E.G. I.e. I.E. Ph.D. D.C. N.Y. N.J. N.C. N.D. N.H. N.M. S.C. Messrs. Calif. Colo. Conn. Fla. "
                 "Ala. Ariz. Ark. Del. Ga. Ia. Id. Ill. Ind. Kan. Kans. Ky. La. Mass. Md. Mich. Minn. Miss. Mo. Mont. "
                 "Neb. Nebr. Nev. Okla. Ore. Pa. Tenn. Va. Wash. Wis. and/or w/o C++").split()
EMOTICONS = (":) :-) :)) :( :-( :(( ;) ;-) :D :-D :P :p :-P :-p :/ :-/ :| :-| :* :-* :] :-] :[ ): )-: (: (-: (; :o "
             ":O :-o :-O :3 <3 </3 XD xD =) =( =D =] =[ =| =/ ^_^ -_- o_O O_o o.O O.o 8) 8-) :'( :') >:( :o) "
             "''").split()


def _special_cases() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}

    def add(parts, bare=True):
        for form in (parts, (("I" if parts[0] == "i" else parts[0].capitalize()),) + parts[1:]):
            for apos in ("'", "’"):
                toks = tuple(p.replace("'", apos) for p in form)
                out["".join(toks)] = toks
            plain = tuple(p.replace("'", "") for p in form)
            if bare and "".join(plain).lower() not in NOT_WITHOUT_APOSTROPHE:
                out["".join(plain)] = plain
    pronouns = []
    for bases, clitics in CLITICS.items():
        for base in bases.split():
            for c in clitics.split():
                add((base, c))
            if base not in ("could", "might", "must", "should", "would", "not"):
                pronouns.append(base)
    for base in pronouns:
        for c in ("'d", "'ll"):
            add((base, c))
            add((base, c, "'ve"))
    for base in NT_BASES.split():
        add((base.rstrip("*"), "n't"))
        if not base.endswith("*"):
            add((base, "n't", "'ve"))
    for word, parts in WHOLE.items():
        add(parts, bare=word not in ("let's", "c'mon"))
    for a in ABBREVIATIONS + EMOTICONS + [f"{c}." for c in "abcdefghijklmnopqrstuvwxyzäöü"]:
        out[a] = (a,)
    for h in range(1, 13):
        for ap in ("am", "pm", "a.m.", "p.m."):
            out[f"{h}{ap}"] = (str(h), ap)
    return out


SPECIAL = _special_cases()
_cache: dict[str, tuple[str, ...]] = {}
CACHE_LIMIT = 1 << 20


def _split(chunk: str) -> tuple[str, ...]:
    """The tokens of one whitespace-free chunk (spaCy's affix loop, then specials, URLs, infixes)."""
    prefixes: list[str] = []
    suffixes: list[str] = []
    s, last = chunk, -1
    while s and len(s) != last and s not in SPECIAL:
        last = len(s)
        m = _prefix.search(s)
        pre = m.end() if m else 0
        if pre and s[pre:] in SPECIAL:
            prefixes.append(s[:pre])
            s = s[pre:]
            break
        m = _suffix.search(s[pre:])
        suf = m.end() - m.start() if m else 0
        if suf and s[:-suf] in SPECIAL:
            suffixes.append(s[-suf:])
            s = s[:-suf]
            break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
    middle: list[str] = []
    if s in SPECIAL:
        middle = list(SPECIAL[s])
    elif s and _url.match(s):
        middle = [s]
    elif s:
        start = 0
        for m in _infix.finditer(s):
            if m.start() == 0:
                continue
            if m.start() != start:
                middle.append(s[start:m.start()])
            if m.end() != m.start():
                middle.append(m.group())
            start = m.end()
        if s[start:]:
            middle.append(s[start:])
    return tuple(prefixes + middle + suffixes[::-1])


def words(text: str) -> list[str]:
    """The words of a text, punctuation split off (see the module docstring)."""
    out: list[str] = []
    cache = _cache
    for chunk in text.split():
        toks = cache.get(chunk)
        if toks is None:
            toks = (chunk,) if chunk.isalpha() and chunk not in SPECIAL else _split(chunk)
            if len(cache) >= CACHE_LIMIT:
                cache.clear()
            cache[sys.intern(chunk) if len(chunk) < 20 else chunk] = toks
        out.extend(toks)
    return out


def is_punct(token: str) -> bool:
    """Every character is Unicode punctuation (category P*)."""
    return all(unicodedata.category(c)[0] == "P" for c in token)


def sentence_count(tokens: list[str]) -> int:
    """Sentences as spaCy's sentencizer finds them: a new one starts at the first token that is
    not punctuation after a sentence-final mark ('.', '!', '?', ...)."""
    if not tokens:
        return 0
    count, seen_end = 1, False
    for tok in tokens:
        if tok in SENTENCE_END:
            seen_end = True
        elif seen_end and not is_punct(tok):
            count += 1
            seen_end = False
    return count


# ---------------------------------------------------------------- normalised text (dedup, decontamination)

_DIGITS = re.compile(r"\d+(?:[.,]\d+)?")
_NOT_WORD = re.compile(r"[^\w]+|_+")


def shingle_words(text: str) -> list[str]:
    """Words compared by deduplication and decontamination: NFKC (Hangul stays composed, unlike
    datatrove's NFD), lower case, numbers -> "0", punctuation and symbols -> space."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _NOT_WORD.sub(" ", _DIGITS.sub("0", text)).split()
