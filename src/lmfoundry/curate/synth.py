"""Deterministic synthetic corpora for the curation tests and benchmark: English and Korean
prose, the kinds of junk each filter exists for, and planted near-duplicates.

    docs = list(corpus(1000, seed=0))          # [{"text", "id", "kind"}], kinds listed in KINDS

Nothing here is real web text; the sentences are built from templates and word lists, so every
run of a seed gives the same corpus.
"""
from __future__ import annotations

import random

SUBJECTS = ["The committee", "Our team", "A local farmer", "The new library", "Most students", "The city council",
            "Dr. Smith", "My neighbour", "The museum", "Researchers at the institute", "The old bridge",
            "Mr. Lee", "The company", "Her grandmother", "The volunteers", "This small village"]
VERBS = ["has published", "will discuss", "wanted to improve", "did not expect", "decided to rebuild",
         "is planning", "can't explain", "reported", "has been studying", "won't change", "described",
         "is known for", "couldn't find", "recommended", "celebrated", "finished"]
OBJECTS = ["the annual report", "a well-known recipe", "the history of the region", "the results of the survey",
           "a plan for the river", "the cost of the project", "an exhibition of paintings", "the school's garden",
           "the rules of the game", "a map of the coast", "the train schedule", "its 150-year-old archive",
           "the U.S. market", "the winter festival", "a long letter", "the water supply"]
TAILS = ["last week", "in the morning", "after the meeting", "for the third time", "with great care",
         "because of the rain", "before the holidays", "at 9 a.m.", "in 2021", "(see page 12)", "without any help",
         "as expected", "on Monday", "with the support of 40 people", "despite the cost", "by the end of May"]
CONNECT = ["However,", "In addition,", "Meanwhile,", "As a result,", "Later,", "Still,", "Of course,", "Then"]
NOUNS = "water light garden river market school music paper window stone road table cloud forest village".split()

KO_SENTENCES = [
    "오늘 아침에는 비가 조금 내렸지만 오후에는 날씨가 맑아졌다.", "우리 동네 도서관은 주말에도 늦게까지 문을 연다.",
    "시청은 다음 달부터 버스 노선을 새로 조정할 계획이라고 밝혔다.", "할머니께서는 매년 가을마다 김치를 직접 담그신다.",
    "연구진은 이번 실험 결과가 예상보다 훨씬 좋았다고 설명했다.", "학생들은 시험이 끝난 뒤 운동장에서 축구를 했다.",
    "이 박물관에는 조선 시대의 도자기가 많이 전시되어 있다.", "새로 생긴 카페는 조용해서 책을 읽기에 좋다.",
    "정부는 청년 일자리를 늘리기 위한 정책을 발표했다.", "강을 따라 걷는 산책로가 작년에 새로 만들어졌다.",
    "회의에서는 예산 문제를 두고 여러 의견이 오갔다.", "아이들은 방학 동안 과학 캠프에 참여할 예정이다.",
    "그 작가는 어린 시절의 기억을 바탕으로 소설을 썼다.", "마을 사람들은 축제를 준비하느라 무척 바빴다.",
    "전문가들은 충분한 수면이 건강에 중요하다고 강조한다.", "이 지역은 여름에 비가 많이 오고 겨울에는 건조하다.",
    "우리는 주말에 가족과 함께 등산을 다녀왔다.", "공장은 환경 기준을 지키기 위해 설비를 바꾸었다.",
    "선생님께서는 학생들에게 매일 일기를 쓰라고 하셨다.", "시장에서는 제철 과일을 저렴한 가격에 팔고 있었다.",
    "그는 외국어를 배우려고 매일 한 시간씩 공부한다.", "오래된 다리는 안전 점검을 마친 뒤 다시 개통되었다.",
    "회사는 새로운 제품을 내년 봄에 출시할 계획이다.", "도시의 공원은 시민들이 쉬는 중요한 공간이 되었다.",
]
KO_SPAM = ["카지노", "바카라", "토토사이트", "먹튀검증", "무료상담", "대출", "급전", "당일승인", "최저금리", "클릭",
           "이벤트", "가입머니", "첫충", "무한매충", "고액환전", "안전놀이터", "신규가입", "즉시지급"]

KINDS = ("good", "good_ko", "short", "hashtags", "bullets", "ellipsis", "symbols", "no_stopwords", "repetitive",
         "keyword_spam", "spam_ko", "lorem", "code", "menu", "boilerplate")


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."
    return f"{rng.choice(CONNECT)} {s[0].lower()}{s[1:]}" if rng.random() < 0.25 else s


def english(rng: random.Random, paragraphs: int = 4) -> str:
    return "\n\n".join(" ".join(sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(paragraphs))


def korean(rng: random.Random, paragraphs: int = 3) -> str:
    picked = rng.sample(KO_SENTENCES, min(len(KO_SENTENCES), paragraphs * 4))
    return "\n\n".join(" ".join(picked[i::paragraphs]) for i in range(paragraphs))


def junk(rng: random.Random, kind: str) -> str:
    """A document of one kind of junk (with some prose, so rules meet it near their thresholds)."""
    prose = english(rng, rng.randint(1, 3))
    n = rng.randint(3, 30)
    if kind == "short":
        return " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
    if kind == "hashtags":
        return prose + "\n" + " ".join(f"#{rng.choice(NOUNS)}" for _ in range(n))
    if kind == "bullets":
        return "\n".join(f"- {rng.choice(OBJECTS)}" for _ in range(n)) + ("\n" + prose if rng.random() < .5 else "")
    if kind == "ellipsis":
        return "\n".join(sentence(rng)[:-1] + "..." for _ in range(n)) + "\n" + prose
    if kind == "symbols":
        return prose + "\n" + " ".join(rng.choice(["|", "•", "123", "4.5", "$9.99", "->", "***"]) for _ in range(n * 4))
    if kind == "no_stopwords":
        return " ".join(rng.choice(NOUNS).capitalize() + rng.choice([".", ",", ""]) for _ in range(n * 10))
    if kind == "repetitive":
        line = sentence(rng)
        return "\n".join([line] * n + [sentence(rng) for _ in range(rng.randint(1, 10))])
    if kind == "keyword_spam":
        words = rng.sample(NOUNS, 4)
        return " ".join(f"best {rng.choice(words)} cheap {rng.choice(words)}" for _ in range(n * 3))
    if kind == "spam_ko":
        phone = f" 010-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}" if rng.random() < 0.5 else ""
        return "\n".join(" ".join(rng.sample(KO_SPAM, 8)) + phone for _ in range(n + 5))
    if kind == "lorem":
        return prose + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    if kind == "code":
        return prose + "\nfunction f(x) { return x + 1; }\nPlease enable JavaScript to view the comments."
    if kind == "menu":
        return "\n".join(rng.choice(NOUNS).capitalize() for _ in range(n)) + "\n" + prose
    if kind == "boilerplate":
        return prose + "\nBy using this site you agree to our Terms of Use and Privacy Policy.\nThis site uses cookies."
    raise ValueError(kind)


def document(rng: random.Random, kind: str) -> str:
    if kind == "good":
        return english(rng, rng.randint(2, 8))
    if kind == "good_ko":
        return korean(rng, rng.randint(2, 5))
    return junk(rng, kind)


def near_duplicate(rng: random.Random, text: str, edit_fraction: float) -> str:
    """`text` with about `edit_fraction` of its words replaced (5-gram Jaccard drops accordingly)."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * edit_fraction)):
        words[i] = rng.choice(NOUNS)
    return " ".join(words)


def corpus(n: int, seed: int = 0, weights: dict | None = None, duplicate_rate: float = 0.1):
    """n records {"text", "id", "kind"}: mostly good English and Korean, each junk kind, and
    exact / near copies of earlier documents (kind "exact_dup" / "near_dup")."""
    rng = random.Random(seed)
    weights = weights or {"good": 40, "good_ko": 15, **{k: 3 for k in KINDS[2:]}}
    kinds, w = zip(*weights.items())
    recent: list[str] = []
    for i in range(n):
        if recent and rng.random() < duplicate_rate:
            src = rng.choice(recent)
            if rng.random() < 0.4:
                yield {"text": src, "id": i, "kind": "exact_dup"}
            else:
                yield {"text": near_duplicate(rng, src, rng.choice([0.01, 0.02, 0.03])), "id": i, "kind": "near_dup"}
            continue
        kind = rng.choices(kinds, w)[0]
        text = document(rng, kind)
        if kind in ("good", "good_ko"):
            recent = (recent + [text])[-50:]
        yield {"text": text, "id": i, "kind": kind}
