"""Rule filters against datatrove (the reference), document by document, and the Korean settings.

datatrove's English filters split words with a blank spaCy "en" pipeline (no model download);
both run offline here. Tolerance: none; every keep/drop decision (and C4's edited text) must
be identical on the generated corpus, which reaches every rule near and far from its threshold.
"""
import collections

import pytest

from lmfoundry.curate import synth
from lmfoundry.curate.filters import DEFAULTS, LANGUAGE_DEFAULTS, Doc, check, settings
from lmfoundry.curate.lang import identify
from lmfoundry.curate.text import sentence_count, words

datatrove = pytest.importorskip("datatrove")
from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,  # noqa: E402
                                        GopherRepetitionFilter)
from datatrove.utils.text import split_into_sentences, split_into_words  # noqa: E402

ENGLISH_KINDS = {k: 1 for k in synth.KINDS if not k.endswith("_ko")}
REFERENCE = {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
             "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}


@pytest.fixture(scope="module")
def english_docs():
    return [d["text"] for d in synth.corpus(600, seed=1, weights=ENGLISH_KINDS, duplicate_rate=0)]


def test_words_equal_spacy_english_tokens(english_docs):
    extra = ["Don't stop, Mr. Smith... it's 10km (approx.) -- see https://example.com/a?b=c. Wow!!!",
             "U.S.A. e-mail co-op well-known 3:30 p.m. $5.00 I'm you'll they'd've cannot gonna dont"]
    for text in english_docs + extra:
        assert words(text) == split_into_words(text), text[:200]


def test_sentence_count_equals_spacy_sentencizer(english_docs):
    lines = [line.strip() for t in english_docs for line in t.splitlines() if line.strip()]
    for line in lines[:1500]:
        assert sentence_count(words(line)) == len(split_into_sentences(line)), line


@pytest.mark.parametrize("step", list(REFERENCE))
def test_keep_drop_decisions_equal_datatrove(step, english_docs):
    ref = REFERENCE[step]()
    outcomes = collections.Counter()
    for i, text in enumerate(english_docs):
        theirs = Document(text=text, id=str(i))
        keep_theirs = ref.filter(theirs) is True
        ours = Doc(text, "en")
        removal = check(step, ours, {})
        assert (removal is None) == keep_theirs, (step, removal, text[:300])
        if keep_theirs and step == "c4":
            assert ours.text == theirs.text                     # C4 edits the text: the same lines survive
        outcomes[removal.rule if removal else "kept"] += 1
    # the corpus exercises the filter: documents are kept and dropped for several reasons
    assert outcomes["kept"] > 50 and len(outcomes) >= 3, outcomes


def test_non_default_thresholds_match_datatrove_too(english_docs):
    mine = {"min_doc_words": 80, "max_avg_word_length": 6, "min_stop_words": 4, "max_non_alpha_words_ratio": 0.9}
    ref = GopherQualityFilter(**mine)
    for i, text in enumerate(english_docs[:300]):
        assert (check("gopher_quality", Doc(text), mine) is None) == (ref.filter(Document(text=text, id=str(i)))
                                                                      is True)


@pytest.fixture(scope="module")
def korean_docs():
    return list(synth.corpus(240, seed=2, weights={"good_ko": 1, "spam_ko": 1}, duplicate_rate=0))


def _verdict(text, lang):
    doc = Doc(text, lang)
    for step in ("gopher_quality", "gopher_repetition", "c4", "fineweb"):
        removal = check(step, doc, {})
        if removal:
            return f"{step}/{removal.rule}"
    return "kept"


def test_korean_settings_keep_good_korean_and_drop_korean_spam(korean_docs):
    verdicts = collections.Counter((d["kind"], _verdict(d["text"], identify(d["text"])[0]) == "kept")
                                   for d in korean_docs)
    assert verdicts[("good_ko", False)] == 0 and verdicts[("good_ko", True)] > 80
    assert verdicts[("spam_ko", True)] == 0 and verdicts[("spam_ko", False)] > 80


def test_english_settings_would_drop_good_korean(korean_docs):
    """Why per-language settings exist: Gopher's English word length and stop words reject Korean prose."""
    good = [d["text"] for d in korean_docs if d["kind"] == "good_ko"]
    reasons = collections.Counter(_verdict(t, "en") for t in good)
    assert reasons["kept"] == 0
    assert set(reasons) <= {"gopher_quality/min_avg_word_length", "gopher_quality/min_stop_words",
                            "gopher_quality/min_doc_words"}


def test_korean_spam_without_phone_numbers_is_dropped_by_the_particle_rule():
    spam = "\n".join(" ".join(synth.KO_SPAM[i:i + 8]) for i in range(0, 10)) * 3
    assert _verdict(spam, "ko") == "gopher_quality/min_stop_words"


def test_settings_layer_defaults_language_user_and_user_language():
    p = settings("gopher_quality", {"min_doc_words": 30, "languages": {"ko": {"min_stop_words": 5}}}, "ko")
    assert p["min_doc_words"] == 30                                           # user over default
    assert p["stop_word_match"] == "suffix"                                   # Korean default
    assert p["min_stop_words"] == 5                                           # user's Korean value wins
    assert settings("gopher_quality", {}, "en")["min_avg_word_length"] == DEFAULTS["gopher_quality"][
        "min_avg_word_length"] != LANGUAGE_DEFAULTS["ko"]["gopher_quality"]["min_avg_word_length"]


def test_a_threshold_of_zero_or_none_switches_its_rule_off():
    short = "The cat sat on the mat with the dog."
    assert check("gopher_quality", Doc(short), {}).rule == "min_doc_words"
    assert check("gopher_quality", Doc(short), {"min_doc_words": None, "min_stop_words": 0}) is None


@pytest.mark.parametrize("text,lang", [("오늘은 날씨가 정말 좋다. 우리는 공원에서 산책을 했다.", "ko"),
                                       ("The cat sat on the mat and looked at the birds.", "en"),
                                       ("Le chat est assis sur le tapis près de la fenêtre.", "latn"),
                                       ("12345 67890 !!!", "und"),
                                       ("이 모델은 Python과 PyTorch로 구현되었고 GPU에서 학습했다.", "ko")])
def test_script_language_identification(text, lang):
    assert identify(text)[0] == lang


def test_langid_backend_names_languages():
    pytest.importorskip("py3langid")
    assert identify("Le chat est assis sur le tapis près de la fenêtre.", "langid")[0] == "fr"
    assert identify("오늘은 날씨가 정말 좋다. 우리는 공원에서 산책을 했다.", "langid")[0] == "ko"
