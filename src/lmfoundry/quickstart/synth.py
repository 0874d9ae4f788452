"""Every dataset of the quickstart, generated here from templates and closed vocabularies.

The quickstart reproduces the SOLAR 10.7B recipe (pretrain -> depth up-scale -> continued
pretraining -> SFT -> merge -> DPO) with a ~2-3M parameter model trained for minutes on a CPU.
A model that small learns only a small, low-entropy world, so this is one: ~40 people, a dozen
places, foods, animals and things, a few kinds of fact (capitals, animal sounds and legs, colours,
opposites, days, months), small-number arithmetic and word problems, all in English and in
Korean (particles chosen by the final consonant, see `josa`). Nothing is downloaded; the same
seed gives the same bytes. Held-out and test questions are drawn first and every training draw
that would repeat one is rejected; the facts themselves are shared on purpose (the knowledge the
multiple-choice test asks about).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path


# ---------------------------------------------------------------- Korean particles

def _final_sound(word: str) -> tuple[bool, bool]:
    """(has a final consonant, that consonant is ㄹ) for the last syllable of `word` as read aloud."""
    w = word.rstrip("'\".,!? ")
    last = w[-1]
    if "가" <= last <= "힣":
        jong = (ord(last) - 0xAC00) % 28
        return jong != 0, jong == 8
    if last.isdigit():
        n = int(w[len(w.rstrip("0123456789")):])
        if n % 10:   # 일 이 삼 사 오 육 칠 팔 구: final consonant on 1 3 6 7 8, ㄹ on 1 7 8
            return last in "13678", last in "178"
        return True, False    # 영 십 백 천 만
    raise ValueError(f"josa: cannot read the final sound of {word!r}")


def josa(word, pair: str) -> str:
    """`word` with the particle of `pair` ("은/는", "이/가", "을/를", "과/와", "으로/로") that fits it."""
    word = str(word)
    after_consonant, after_vowel = pair.split("/")
    batchim, rieul = _final_sound(word)
    if after_consonant == "으로":   # ㄹ takes 로: 서울로, 칠(7)로
        return word + ("으로" if batchim and not rieul else "로")
    return word + (after_consonant if batchim else after_vowel)


_SLOT = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def fill(template: str, slots: dict) -> str:
    """str.format-like: "{name}" is the slot, "{name:은/는}" the slot with its particle."""
    return _SLOT.sub(lambda m: josa(slots[m[1]], m[2]) if m[2] else str(slots[m[1]]), template)


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---------------------------------------------------------------- vocabularies

def _rows(text: str) -> list[tuple]:
    """A table written inline: rows split by ";", fields by ","; digits become ints, empty fields None."""
    return [tuple(int(f) if f.isdigit() else (f or None) for f in map(str.strip, row.split(",")))
            for row in text.split(";") if row.strip()]


# (English, Korean) unless noted
PEOPLE_EN = _rows("Tom, 톰; Anna, 안나; Ben, 벤; Mia, 미아; Sam, 샘; Lily, 릴리; Jack, 잭; Emma, 엠마; Leo, 레오; "
                  "Nora, 노라; Max, 맥스; Ella, 엘라; Dan, 댄; Zoe, 조이; Ryan, 라이언; Kate, 케이트; Paul, 폴; "
                  "Amy, 에이미; Noah, 노아; Ruth, 루스")
PEOPLE_KO = _rows("Minsu, 민수; Jiyoung, 지영; Seojun, 서준; Haeun, 하은; Doyun, 도윤; Subin, 수빈; Hyunwoo, 현우; "
                  "Yejin, 예진; Junho, 준호; Jimin, 지민; Jiho, 지호; Yuna, 유나; Sungmin, 성민; Sohee, 소희; "
                  "Jaewon, 재원; Daeun, 다은; Woojin, 우진; Mina, 미나; Donghyun, 동현; Eunji, 은지")
PLACES = _rows("park, 공원; school, 학교; market, 시장; library, 도서관; beach, 바닷가; farm, 농장; zoo, 동물원; "
               "station, 역; bakery, 빵집; lake, 호숫가; river, 강가; playground, 놀이터")
TIMES = _rows("morning, 아침; afternoon, 오후; evening, 저녁")
FOODS = _rows("an apple, 사과; a banana, 바나나; bread, 빵; rice, 밥; soup, 수프; noodles, 국수; cake, 케이크; "
              "kimchi, 김치; a sandwich, 샌드위치; ice cream, 아이스크림; an egg, 달걀; a cookie, 쿠키")
# (English, Korean now, Korean past)
WEATHER = _rows("sunny, 날씨가 맑습니다, 날씨가 맑았습니다; rainy, 비가 옵니다, 비가 왔습니다; "
                "windy, 바람이 붑니다, 바람이 불었습니다; cloudy, 날씨가 흐립니다, 날씨가 흐렸습니다; "
                "warm, 날씨가 따뜻합니다, 날씨가 따뜻했습니다; cold, 날씨가 춥습니다, 날씨가 추웠습니다; "
                "snowy, 눈이 옵니다, 눈이 왔습니다")
FEELINGS = _rows("happy, 기쁩니다, 기뻤습니다; tired, 피곤합니다, 피곤했습니다; hungry, 배가 고픕니다, 배가 고팠습니다; "
                 "sleepy, 졸립니다, 졸렸습니다; excited, 신이 납니다, 신이 났습니다; calm, 마음이 편안합니다, 마음이 편안했습니다")
# (singular, plural, Korean, Korean counter)
THINGS = _rows("apple, apples, 사과, 개; pencil, pencils, 연필, 자루; book, books, 책, 권; cookie, cookies, 쿠키, 개; "
               "egg, eggs, 달걀, 개; marble, marbles, 구슬, 개; candy, candies, 사탕, 개; pen, pens, 펜, 자루; "
               "notebook, notebooks, 공책, 권; card, cards, 카드, 장; sticker, stickers, 스티커, 장; "
               "flower, flowers, 꽃, 송이; balloon, balloons, 풍선, 개; orange, oranges, 오렌지, 개")
# (singular, plural, Korean, sound, Korean sound, legs); counted with 마리; the first eight live on a farm
ANIMALS = _rows("dog, dogs, 개, woof, 멍멍, 4; cat, cats, 고양이, meow, 야옹, 4; cow, cows, 소, moo, 음매, 4; "
                "duck, ducks, 오리, quack, 꽥꽥, 2; chicken, chickens, 닭, cluck, 꼬꼬댁, 2; pig, pigs, 돼지, oink, 꿀꿀, 4; "
                "sheep, sheep, 양, baa, 메에, 4; horse, horses, 말, neigh, 히힝, 4; frog, frogs, 개구리, ribbit, 개굴개굴, 4; "
                "bird, birds, 새, tweet, 짹짹, 2; lion, lions, 사자, roar, 어흥, 4; owl, owls, 부엉이, hoot, 부엉부엉, 2; "
                "bee, bees, 벌, buzz, 윙윙, 6; spider, spiders, 거미, , , 8; ant, ants, 개미, , , 6")
FARM_ANIMALS, SOUND_ANIMALS = ANIMALS[:8], [a for a in ANIMALS if a[3]]
# (country, Korean, capital, Korean)
COUNTRIES = _rows("Japan, 일본, Tokyo, 도쿄; France, 프랑스, Paris, 파리; Korea, 한국, Seoul, 서울; "
                  "China, 중국, Beijing, 베이징; Germany, 독일, Berlin, 베를린; Italy, 이탈리아, Rome, 로마; "
                  "Spain, 스페인, Madrid, 마드리드; England, 영국, London, 런던; Egypt, 이집트, Cairo, 카이로; "
                  "Russia, 러시아, Moscow, 모스크바; Canada, 캐나다, Ottawa, 오타와; Australia, 호주, Canberra, 캔버라; "
                  "India, 인도, New Delhi, 뉴델리; Thailand, 태국, Bangkok, 방콕; Greece, 그리스, Athens, 아테네")
COLORS = dict(_rows("red, 빨간색; yellow, 노란색; green, 초록색; blue, 파란색; purple, 보라색; orange, 주황색; "
                    "white, 흰색; black, 검은색; brown, 갈색"))
COLORED = _rows("an apple, 사과, red; a banana, 바나나, yellow; a lemon, 레몬, yellow; a grape, 포도, purple; "
                "a strawberry, 딸기, red; a carrot, 당근, orange; the sky, 하늘, blue; snow, 눈, white; "
                "milk, 우유, white; grass, 풀, green; a cucumber, 오이, green; coal, 석탄, black; "
                "chocolate, 초콜릿, brown; a tomato, 토마토, red")
OPPOSITES = _rows("big, 크다, small, 작다; hot, 뜨겁다, cold, 차갑다; fast, 빠르다, slow, 느리다; long, 길다, short, 짧다; "
                  "happy, 기쁘다, sad, 슬프다; heavy, 무겁다, light, 가볍다; high, 높다, low, 낮다; "
                  "bright, 밝다, dark, 어둡다; clean, 깨끗하다, dirty, 더럽다; strong, 강하다, weak, 약하다")
DAYS = _rows("Monday, 월요일; Tuesday, 화요일; Wednesday, 수요일; Thursday, 목요일; Friday, 금요일; "
             "Saturday, 토요일; Sunday, 일요일")
MONTHS = [(m, f"{i}월") for i, m in enumerate("January February March April May June July August September "
                                                "October November December".split(), 1)]


# ---------------------------------------------------------------- facts

# category: (English statements, questions, short answer, then the same in Korean); " | " separates
# alternatives, and the first statement is also the answer to the questions
FACT_TEMPLATES = {
    "capital": ("The capital of {c} is {k}. | {k} is the capital of {c}. | The capital city of {c} is {k}. | "
                "People in {c} call {k} their capital.",
                "What is the capital of {c}? | Which city is the capital of {c}? | What city is the capital of {c}?",
                "{k}",
                "{c}의 수도는 {k}입니다. | {k:은/는} {c}의 수도입니다. | {c}에 가면 수도 {k:을/를} 볼 수 있습니다.",
                "{c}의 수도는 어디입니까? | {c}의 수도는 어느 도시입니까? | 어느 도시가 {c}의 수도입니까?", "{k}"),
    "sound": ("{An_a} says {s}. | {Pl} say {s}. | The sound of {an_a} is {s}. | {An_a} makes the sound {s}.",
              "What sound does {an_a} make? | What does {an_a} say? | Which sound does {an_a} make?", "{s}",
              "{a:은/는} {s} 소리를 냅니다. | {a}의 소리는 {s}입니다. | {a:이/가} 내는 소리는 {s}입니다.",
              "{a:은/는} 어떤 소리를 냅니까? | {a:이/가} 내는 소리는 무엇입니까? | {a}의 소리는 무엇입니까?", "{s}"),
    "legs": ("{An_a} has {n} legs. | {Pl} have {n} legs. | {An_a} walks on {n} legs. | Every {a} has {n} legs.",
             "How many legs does {an_a} have? | How many legs do {pl} have?", "{n}",
             "{a:은/는} 다리가 {n}개입니다. | {a}의 다리는 {n}개입니다. | {a:은/는} 다리 {n}개로 걷습니다.",
             "{a:은/는} 다리가 몇 개입니까? | {a}의 다리는 몇 개입니까?", "{n}개"),
    "color": ("{X} is {col}. | The color of {x} is {col}. | {X} has a {col} color. | Everyone knows that {x} is {col}.",
              "What color is {x}? | What is the color of {x}?", "{col}",
              "{x}의 색깔은 {col}입니다. | {x:은/는} {col}입니다. | {x:은/는} 색깔이 {col}입니다.",
              "{x:은/는} 무슨 색입니까? | {x}의 색깔은 무엇입니까?", "{col}"),
    "opposite": ("The opposite of {w} is {o}. | The words {w} and {o} are opposites. | {W} is the opposite of {o}.",
                 "What is the opposite of {w}? | What word means the opposite of {w}?", "{o}",
                 "{w}의 반대말은 {o}입니다. | {w:과/와} {o:은/는} 서로 반대말입니다. | {o:은/는} {w}의 반대말입니다.",
                 "{w}의 반대말은 무엇입니까? | {w:과/와} 반대되는 말은 무엇입니까?", "{bare}"),
    "day": ("The day after {d} is {d2}. | {d2} comes after {d}. | {d} comes before {d2}. | After {d} comes {d2}.",
            "What day comes after {d}? | Which day comes after {d}? | What is the day after {d}?", "{d2}",
            "{d} 다음 날은 {d2}입니다. | {d2:은/는} {d} 다음에 옵니다. | {d} 다음에는 {d2:이/가} 옵니다.",
            "{d} 다음 날은 무슨 요일입니까? | {d} 다음에 오는 요일은 무엇입니까?", "{d2}"),
    "month": ("The month after {m} is {m2}. | {m2} comes after {m}. | {m} comes before {m2}. | After {m} comes {m2}.",
              "What month comes after {m}? | Which month comes after {m}? | What is the month after {m}?", "{m2}",
              "{m} 다음 달은 {m2}입니다. | {m2:은/는} {m} 다음에 옵니다. | {m} 다음에는 {m2:이/가} 옵니다.",
              "{m} 다음 달은 몇 월입니까? | {m} 다음에 오는 달은 무엇입니까?", "{m2}"),
}
# (category, language) -> ([statements], [questions], short answer)
FACT_FORMS = {(category, lang): (t[i].split(" | "), t[i + 1].split(" | "), t[i + 2])
              for category, t in FACT_TEMPLATES.items() for lang, i in (("en", 0), ("ko", 3))}
TOPICS = {"capital": ("Countries and their capitals.", "나라와 수도"), "sound": ("Animal sounds.", "동물의 소리"),
          "legs": ("Animal legs.", "동물의 다리"), "color": ("Colors of things.", "물건의 색깔"),
          "opposite": ("Opposite words.", "반대말"), "day": ("Days of the week.", "요일"),
          "month": ("Months of the year.", "열두 달")}
EXTRA_FACTS = {
    "day": ("A week has seven days: " + ", ".join(d for d, _ in DAYS[:-1]) + " and Sunday.",
            "일주일은 " + ", ".join(k for _, k in DAYS) + "의 7일입니다."),
    "month": ("A year has twelve months: " + ", ".join(m for m, _ in MONTHS[:-1]) + " and December.",
              "일 년은 1월부터 12월까지 열두 달입니다.")}


@dataclass(frozen=True)
class Fact:
    category: str
    slots: dict          # language -> slot values

    def say(self, rng, lang) -> str:
        return fill(rng.choice(FACT_FORMS[self.category, lang][0]), self.slots[lang])

    def ask(self, rng, lang) -> str:
        return fill(rng.choice(FACT_FORMS[self.category, lang][1]), self.slots[lang])

    def answer(self, lang) -> str:
        return fill(FACT_FORMS[self.category, lang][0][0], self.slots[lang])

    def short(self, lang) -> str:
        return fill(FACT_FORMS[self.category, lang][2], self.slots[lang])


def _facts() -> list[Fact]:
    out = [Fact("capital", {"en": {"c": c, "k": k}, "ko": {"c": ck, "k": kk}}) for c, ck, k, kk in COUNTRIES]
    for a in ANIMALS:
        art = "an" if a[0][0] in "aeiou" else "a"
        en = {"a": a[0], "an_a": f"{art} {a[0]}", "An_a": f"{cap(art)} {a[0]}", "pl": a[1], "Pl": cap(a[1])}
        if a[3]:
            out.append(Fact("sound", {"en": {**en, "s": a[3]}, "ko": {"a": a[2], "s": a[4]}}))
        out.append(Fact("legs", {"en": {**en, "n": a[5]}, "ko": {"a": a[2], "n": a[5]}}))
    out += [Fact("color", {"en": {"x": x, "X": cap(x), "col": col}, "ko": {"x": xk, "col": COLORS[col]}})
            for x, xk, col in COLORED]
    for w, wk, o, ok in OPPOSITES:
        for (a, ak), (b, bk) in (((w, wk), (o, ok)), ((o, ok), (w, wk))):
            out.append(Fact("opposite", {"en": {"w": a, "W": cap(a), "o": b},
                                         "ko": {"w": f"'{ak}'", "o": f"'{bk}'", "bare": bk}}))
    for category, seq, key in (("day", DAYS, "d"), ("month", MONTHS, "m")):
        for i, (e, k) in enumerate(seq):
            e2, k2 = seq[(i + 1) % len(seq)]
            out.append(Fact(category, {"en": {key: e, key + "2": e2}, "ko": {key: k, key + "2": k2}}))
    return out


FACTS = _facts()


# ---------------------------------------------------------------- everyday sentences (parallel)

# (English present, English past, Korean present, Korean past); a story is an opening, a middle
# drawn from MIDDLE in order, and the two closing sentences
OPENING = [("It is {weather} today.", "It was {weather} that day.", "오늘은 {weather}.", "그날은 {weather_past}."),
           ("{name} wakes up early.", "{name} woke up early.", "{name:은/는} 일찍 일어납니다.", "{name:은/는} 일찍 일어났습니다."),
           ("{name} goes to the {place} in the {time}.", "{name} went to the {place} in the {time}.",
            "{name:은/는} {time}에 {place:으로/로} 갑니다.", "{name:은/는} {time}에 {place:으로/로} 갔습니다.")]
MIDDLE = [("{name} meets {friend} at the {place}.", "{name} met {friend} at the {place}.",
           "{name:은/는} {place}에서 {friend:을/를} 만납니다.", "{name:은/는} {place}에서 {friend:을/를} 만났습니다."),
          ("{name} eats {food} at the {place}.", "{name} ate {food} at the {place}.",
           "{name:은/는} {place}에서 {food:을/를} 먹습니다.", "{name:은/는} {place}에서 {food:을/를} 먹었습니다."),
          ("{name} sees {n} {animals}.", "{name} saw {n} {animals}.",
           "{name:은/는} {animal} {n}마리를 봅니다.", "{name:은/는} {animal} {n}마리를 보았습니다."),
          ("The {animal} says {sound}.", "The {animal} said {sound}.",
           "그 {animal:은/는} {sound} 소리를 냅니다.", "그 {animal:은/는} {sound} 소리를 냈습니다."),
          ("The {animal} has {legs} legs.", "The {animal} had {legs} legs.",
           "그 {animal:은/는} 다리가 {legs}개입니다.", "그 {animal:은/는} 다리가 {legs}개였습니다."),
          ("{name} reads a book with {friend}.", "{name} read a book with {friend}.",
           "{name:은/는} {friend:과/와} 함께 책을 읽습니다.", "{name:은/는} {friend:과/와} 함께 책을 읽었습니다."),
          ("{name} buys {n} {things} at the market.", "{name} bought {n} {things} at the market.",
           "{name:은/는} 시장에서 {thing} {n}{cnt:을/를} 삽니다.", "{name:은/는} 시장에서 {thing} {n}{cnt:을/를} 샀습니다."),
          ("{name} plays with {friend} at the {place}.", "{name} played with {friend} at the {place}.",
           "{name:은/는} {place}에서 {friend:과/와} 놉니다.", "{name:은/는} {place}에서 {friend:과/와} 놀았습니다."),
          ("{name} gives {food} to {friend}.", "{name} gave {food} to {friend}.",
           "{name:은/는} {friend}에게 {food:을/를} 줍니다.", "{name:은/는} {friend}에게 {food:을/를} 주었습니다."),
          ("{name} likes {animals}.", "{name} liked {animals}.",
           "{name:은/는} {animal:을/를} 좋아합니다.", "{name:은/는} {animal:을/를} 좋아했습니다."),
          ("{name} drinks milk in the {time}.", "{name} drank milk in the {time}.",
           "{name:은/는} {time}에 우유를 마십니다.", "{name:은/는} {time}에 우유를 마셨습니다."),
          ("{name} writes a letter to {friend}.", "{name} wrote a letter to {friend}.",
           "{name:은/는} {friend}에게 편지를 씁니다.", "{name:은/는} {friend}에게 편지를 썼습니다."),
          ("{name} helps {friend} at the {place}.", "{name} helped {friend} at the {place}.",
           "{name:은/는} {place}에서 {friend:을/를} 돕습니다.", "{name:은/는} {place}에서 {friend:을/를} 도왔습니다."),
          ("{name} sings a song with {friend}.", "{name} sang a song with {friend}.",
           "{name:은/는} {friend:과/와} 함께 노래를 부릅니다.", "{name:은/는} {friend:과/와} 함께 노래를 불렀습니다."),
          ("{name} lives in {city}.", "{name} lived in {city}.",
           "{name:은/는} {city}에 삽니다.", "{name:은/는} {city}에 살았습니다.")]
CLOSING = [("{name} feels {feel}.", "{name} felt {feel}.", "{name:은/는} {feel}.", "{name:은/는} {feel_past}."),
           ("{name} goes home in the evening.", "{name} went home in the evening.",
            "{name:은/는} 저녁에 집으로 돌아갑니다.", "{name:은/는} 저녁에 집으로 돌아갔습니다.")]
SENTENCES = OPENING + MIDDLE + CLOSING


def people(rng, lang, k=1) -> list[tuple[str, str]]:
    """k different people, from the list of the document's language three times in four."""
    own, other = (PEOPLE_EN, PEOPLE_KO) if lang == "en" else (PEOPLE_KO, PEOPLE_EN)
    return rng.sample(own if rng.random() < 0.75 else other, k)


def scene(rng, lang) -> dict:
    """Slot values for one story, per language."""
    (name, friend), place, time = people(rng, lang, 2), rng.choice(PLACES), rng.choice(TIMES)
    food, animal, thing = rng.choice(FOODS), rng.choice(SOUND_ANIMALS), rng.choice(THINGS)
    city, weather, feel, n = rng.choice(COUNTRIES)[2:], rng.choice(WEATHER), rng.choice(FEELINGS), rng.randint(2, 9)
    return {"en": {"name": name[0], "friend": friend[0], "place": place[0], "time": time[0], "food": food[0],
                   "animal": animal[0], "animals": animal[1], "sound": animal[3], "legs": animal[5], "n": n,
                   "things": thing[1], "city": city[0], "weather": weather[0], "feel": feel[0]},
            "ko": {"name": name[1], "friend": friend[1], "place": place[1], "time": time[1], "food": food[1],
                   "animal": animal[2], "sound": animal[4], "legs": animal[5], "n": n, "thing": thing[2],
                   "cnt": thing[3], "city": city[1], "weather": weather[1], "weather_past": weather[2],
                   "feel": feel[1], "feel_past": feel[2]}}


def sentence_pair(rng, past=None) -> tuple[str, str]:
    """One everyday sentence and its translation: (English, Korean)."""
    t, s = rng.choice(SENTENCES), scene(rng, rng.choice(("en", "ko")))
    past = rng.random() < 0.3 if past is None else past
    return fill(t[1 if past else 0], s["en"]), fill(t[3 if past else 2], s["ko"])


# ---------------------------------------------------------------- arithmetic

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty"}
APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y}
OP_WORDS = {"+": ("plus", "더하기"), "-": ("minus", "빼기"), "×": ("times", "곱하기")}


def number_word(n: int) -> str:
    return ONES[n] if n < 20 else TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")


def arithmetic_fact(rng, op=None) -> tuple[int, str, int, int]:
    """(a, op, b, c): a op b = c with addends 1-20, minuends up to 20, the 2-9 times tables."""
    op = op or rng.choice("+-×")
    if op == "+":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
    elif op == "-":
        a = rng.randint(1, 20)
        b = rng.randint(1, a)
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, op, b, APPLY[op](a, b)


def arithmetic_question(a, op, b, lang) -> str:
    return f"What is {a} {op} {b}?" if lang == "en" else f"{a} {op} {josa(b, '은/는')} 얼마입니까?"


def arithmetic_line(lang, fact, style) -> str:
    """"7 + 5 = 12.", "Seven plus five is twelve." / "7 더하기 5는 12입니다.", or a question and its answer."""
    a, op, b, c = fact
    if style == "digits":
        return f"{a} {op} {b} = {c}."
    if style == "words":
        return (f"{cap(number_word(a))} {OP_WORDS[op][0]} {number_word(b)} is {number_word(c)}." if lang == "en"
                else f"{a} {OP_WORDS[op][1]} {josa(b, '은/는')} {c}입니다.")
    return arithmetic_question(a, op, b, lang) + (f" The answer is {c}." if lang == "en" else f" 답은 {c}입니다.")


# ---------------------------------------------------------------- word problems

# kind -> [(operations, noun, question, solution)]; the solution's {e1}/{e2} are "x op y = z"
# lines computed from the numbers (so a flawed solution keeps the same words)
PROBLEMS = {"en": {
    "add": [("+", "thing", "{name} has {A}. {name} buys {b} more. How many {pl} does {name} have now?",
             "{name} has {A} and buys {b} more, so {name} has {e1} {u1}."),
            ("+", "thing", "{name} has {A} and {name2} has {B}. How many {pl} do they have together?",
             "Together they have {e1} {u1}."),
            ("+", "animal", "{name} sees {A} at the farm and then {b} more. How many {pl} does {name} see in all?",
             "{name} sees {A} and then {b} more, so {name} sees {e1} {u1}.")],
    "sub": [("-", "thing", "{name} has {A}. {name} gives {b} to {name2}. How many {pl} does {name} have left?",
             "{name} had {A} and gave {b} to {name2}, so {name} has {e1} {u1} left."),
            ("-", "thing", "{name} had {A} and lost {b} of them. How many {pl} does {name} have now?",
             "{name} had {A} and lost {b}, so {name} has {e1} {u1} now."),
            ("-", "animal", "There were {A} in the field. {b} of them ran away. How many {pl} are still in the field?",
             "{b} of the {a} ran away, so the field still has {e1} {u1}.")],
    "mul": [("×", "thing", "{name} has {a} boxes. Each box has {B}. How many {pl} does {name} have in all?",
             "{name} has {a} boxes with {b} {pl} each, so {name} has {e1} {u1}."),
            ("×", "thing", "{a} children each have {B}. How many {pl} do the children have altogether?",
             "Each of the {a} children has {b}, so they have {e1} {u1}."),
            ("×", "animal", "A farm has {a} pens. Each pen has {B}. How many {pl} are on the farm?",
             "There are {a} pens with {b} {pl} each, so the farm has {e1} {u1}.")],
    "two": [("+-", "thing", "{name} has {A}. {name2} gives {name} {b} more, and then {name} gives {c} to a friend. "
             "How many {pl} does {name} have now?",
             "After getting {b} more, {name} has {e1} {u1}. After giving away {c}, {name} has {e2} {u2}."),
            ("+-", "thing", "A shelf has {A}. {name} adds {b}, then {name2} takes {c}. "
             "How many {pl} are on the shelf now?",
             "After {name} adds {b}, the shelf has {e1} {u1}. After {name2} takes {c}, it has {e2} {u2}."),
            ("-+", "thing", "{name} had {A}, lost {b}, and then found {c}. How many {pl} does {name} have now?",
             "After losing {b}, {name} has {e1} {u1}. After finding {c}, {name} has {e2} {u2}.")]}, "ko": {
    "add": [("+", "thing", "{name:은/는} {obj} {A:을/를} 가지고 있습니다. {name:은/는} {obj} {B:을/를} 더 샀습니다. "
             "{name:이/가} 가진 {obj:은/는} 모두 몇 {cnt}입니까?",
             "{name:은/는} {A:을/를} 가지고 있었고 {B:을/를} 더 샀으므로 모두 {e1}{cnt}입니다."),
            ("+", "thing", "{name:은/는} {obj} {A:을/를}, {name2:은/는} {obj} {B:을/를} 가지고 있습니다. "
             "두 사람이 가진 {obj:은/는} 모두 몇 {cnt}입니까?", "두 사람이 가진 {obj:은/는} 모두 {e1}{cnt}입니다."),
            ("+", "animal", "{name:은/는} 농장에서 {obj} {A:을/를} 보았고, {B:을/를} 더 보았습니다. "
             "{name:이/가} 본 {obj:은/는} 모두 몇 {cnt}입니까?", "{A:을/를} 보고 {B:을/를} 더 보았으므로 모두 {e1}{cnt}입니다.")],
    "sub": [("-", "thing", "{name:은/는} {obj} {A:을/를} 가지고 있습니다. {name:은/는} {name2}에게 {B:을/를} 주었습니다. "
             "{name}에게 남은 {obj:은/는} 몇 {cnt}입니까?", "{A}에서 {B:을/를} 주었으므로 남은 {obj:은/는} {e1}{cnt}입니다."),
            ("-", "thing", "{name:은/는} {obj} {A:을/를} 가지고 있었는데 {B:을/를} 잃어버렸습니다. "
             "{name:은/는} 지금 {obj} 몇 {cnt:을/를} 가지고 있습니까?",
             "{A}에서 {B:을/를} 잃어버렸으므로 지금 {e1}{cnt:을/를} 가지고 있습니다."),
            ("-", "animal", "들판에 {obj} {A:이/가} 있었습니다. 그중 {B:이/가} 도망갔습니다. 들판에 남은 {obj:은/는} 몇 {cnt}입니까?",
             "{A}에서 {B:이/가} 도망갔으므로 들판에는 {e1}{cnt:이/가} 남았습니다.")],
    "mul": [("×", "thing", "{name:은/는} 상자 {a}개를 가지고 있습니다. 상자마다 {obj} {B:이/가} 들어 있습니다. "
             "{obj:은/는} 모두 몇 {cnt}입니까?", "상자 {a}개에 {B}씩 들어 있으므로 모두 {e1}{cnt}입니다."),
            ("×", "thing", "어린이 {a}명이 각각 {obj} {B:을/를} 가지고 있습니다. 어린이들이 가진 {obj:은/는} 모두 몇 {cnt}입니까?",
             "{a}명이 {B}씩 가지고 있으므로 모두 {e1}{cnt}입니다."),
            ("×", "animal", "농장에 우리가 {a}개 있습니다. 우리마다 {obj} {B:이/가} 있습니다. 농장에 있는 {obj:은/는} 모두 몇 {cnt}입니까?",
             "우리 {a}개에 {B}씩 있으므로 모두 {e1}{cnt}입니다.")],
    "two": [("+-", "thing", "{name:은/는} {obj} {A:을/를} 가지고 있습니다. {name2:이/가} {name}에게 {B:을/를} 더 주었고, "
             "{name:은/는} 친구에게 {C:을/를} 주었습니다. {name:은/는} 지금 {obj} 몇 {cnt:을/를} 가지고 있습니까?",
             "{B:을/를} 더 받으면 {e1}{cnt}입니다. 친구에게 {C:을/를} 주면 {e2}{cnt}입니다."),
            ("+-", "thing", "선반에 {obj} {A:이/가} 있습니다. {name:이/가} {B:을/를} 더 놓고, {name2:이/가} {C:을/를} 가져갔습니다. "
             "선반에 있는 {obj:은/는} 몇 {cnt}입니까?",
             "{name:이/가} {B:을/를} 더 놓으면 {e1}{cnt}입니다. {name2:이/가} {C:을/를} 가져가면 {e2}{cnt}입니다."),
            ("-+", "thing", "{name:은/는} {obj} {A:을/를} 가지고 있었습니다. {B:을/를} 잃어버렸다가 {C:을/를} 찾았습니다. "
             "{name:은/는} 지금 {obj} 몇 {cnt:을/를} 가지고 있습니까?",
             "{B:을/를} 잃어버리면 {e1}{cnt}입니다. {C:을/를} 찾으면 {e2}{cnt}입니다.")]}}
WRONG_OP = {"+": "-", "-": "+", "×": "+"}


@dataclass
class Problem:
    lang: str
    question: str
    ops: str                  # one operation per step: "+", "-", "×", "+-", "-+"
    nums: tuple               # the question's numbers: (a, b) or (a, b, c)
    solution_template: str
    slots: dict

    def work(self, flaw=None) -> list[tuple[int, str, int, int]]:
        """[(x, op, y, z)] step by step; flaw=(step, wrong op or error added to its result)."""
        steps, x = [], self.nums[0]
        for i, (op, y) in enumerate(zip(self.ops, self.nums[1:])):
            z = APPLY[op](x, y)
            if flaw and flaw[0] == i:
                op, z = (flaw[1], APPLY[flaw[1]](x, y)) if flaw[1] in APPLY else (op, z + flaw[1])
            steps.append((x, op, y, z))
            x = z
        return steps

    @property
    def answer(self) -> int:
        return self.work()[-1][3]

    def solution(self, flaw=None) -> str:
        """The worked solution, last line "#### N" (GSM8K's answer marker)."""
        steps, slots = self.work(flaw), dict(self.slots)
        for i, (x, op, y, z) in enumerate(steps, 1):
            slots[f"e{i}"], slots[f"u{i}"] = f"{x} {op} {y} = {z}", slots["sg"] if z == 1 else slots["pl"]
        return fill(self.solution_template, slots) + f"\n#### {steps[-1][3]}"

    def flaw(self, rng):
        """A flaw for `solution`: one step's result off by 1-3, or the wrong operation applied there."""
        while True:
            i = rng.randrange(len(self.ops))
            flaw = (i, WRONG_OP[self.ops[i]] if rng.random() < 0.5 else rng.choice((-3, -2, -1, 1, 2, 3)))
            steps = self.work(flaw)
            if all(z >= 0 for *_, z in steps) and steps[-1][3] != self.answer:
                return flaw


def _numbers(rng, ops) -> tuple:
    """Operands 1-20 (a minuend is at least its subtrahend), results 0-40, times tables 2-9."""
    if ops == "×":
        return rng.randint(2, 9), rng.randint(2, 9)
    a = rng.randint(2 if ops[0] == "-" else 1, 20)
    b = rng.randint(1, a) if ops[0] == "-" else rng.randint(1, 20)
    if len(ops) == 1:
        return a, b
    first = APPLY[ops[0]](a, b)
    return a, b, rng.randint(1, min(20, first)) if ops[1] == "-" else rng.randint(1, 20)


def make_problem(rng, lang) -> Problem:
    ops, noun, question, solution = rng.choice(PROBLEMS[lang][rng.choice(("add", "sub", "mul", "two"))])
    nums = _numbers(rng, ops)
    if noun == "thing":
        sg, pl, obj, cnt = rng.choice(THINGS)
    else:
        sg, pl, obj, *_ = rng.choice(FARM_ANIMALS)
        cnt = "마리"
    name, name2 = (p[lang == "ko"] for p in people(rng, lang, 2))
    slots = {"name": name, "name2": name2, "sg": sg, "pl": pl, "obj": obj, "cnt": cnt}
    for key, n in zip("abc", nums):
        slots[key] = n
        slots[key.upper()] = f"{n} {sg if n == 1 else pl}" if lang == "en" else f"{n}{cnt}"
    return Problem(lang, fill(question, slots), ops, nums, solution, slots)


def problem_prompt(rng, question: str) -> str:
    """Half the time in the GSM8K prompt format the evaluation uses."""
    return f"Question: {question}\nAnswer:" if rng.random() < 0.5 else question


def fresh_problem(rng, avoid: set, lang=None) -> Problem:
    """A problem whose question is not in `avoid`; English 60%, Korean 40% unless lang is given."""
    while True:
        p = make_problem(rng, lang or ("en" if rng.random() < 0.6 else "ko"))
        if p.question not in avoid:
            return p


# ---------------------------------------------------------------- pretraining documents

def _until(target, chunk, lo=30, hi=150) -> list[str]:
    """Chunks (lines or sentences) until the document has about `target` words (30-150)."""
    out, words = [], 0
    while words < max(lo, target):
        piece = chunk()
        if piece:
            if words + len(piece.split()) > hi:
                break
            out.append(piece)
            words += len(piece.split())
    return out


def story_doc(rng, lang, avoid) -> str:
    s, past = scene(rng, lang), rng.random() < 0.3
    col = (0 if lang == "en" else 2) + past
    middle = sorted(rng.sample(range(len(MIDDLE)), rng.randint(4, 9) if lang == "en" else rng.randint(7, 12)))
    chosen = rng.sample(OPENING[:2], rng.randint(1, 2)) + [OPENING[2]] + [MIDDLE[i] for i in middle] + CLOSING
    sentences = [fill(t[col], s[lang]) for t in chosen]
    return " ".join(x for x in sentences if x not in avoid)


def fact_doc(rng, lang, avoid) -> str:
    style = rng.choice(("topic", "mixed", "quiz"))
    category = rng.choice(list(FACT_TEMPLATES))
    pool = [f for f in FACTS if f.category == category] if style == "topic" else FACTS
    head = "질문: {q}\n답: {a}" if lang == "ko" else "Question: {q}\nAnswer: {a}"

    def chunk():     # one statement, or one quiz question with its answer (None: held out)
        f = rng.choice(pool)
        if style != "quiz":
            line = f.say(rng, lang)
            return None if line in avoid else line
        q = f.ask(rng, lang)
        return None if q in avoid else head.format(q=q, a=f.answer(lang) if rng.random() < 0.5 else f.short(lang))
    lines = _until(rng.randint(30, 80), chunk)
    if style == "quiz":
        return "\n".join(lines)
    if style == "topic":
        if category in EXTRA_FACTS:
            lines.insert(rng.randrange(len(lines) + 1), EXTRA_FACTS[category][lang == "ko"])
        return TOPICS[category][lang == "ko"] + "\n" + " ".join(lines)
    return " ".join(lines)


def arithmetic_doc(rng, lang, avoid) -> str:
    style = rng.choice(("mixed", "table", "family"))
    ko = lang == "ko"
    if style == "table":
        n = rng.randint(2, 9)
        lines = [arithmetic_line(lang, (n, "×", i, n * i), rng.choice(("digits", "digits", "words")))
                 for i in range(1, 10)]
        return (f"{n}단:" if ko else f"The {n} times table:") + "\n" + "\n".join(lines)
    if style == "family":
        def chunk():
            a = rng.randint(1, 19)
            b = rng.randint(1, 20 - a)
            c = a + b
            then = (f"{a} + {josa(b, '이/가')} {josa(c, '이/가')} 되므로 {c} - {b} = {a}입니다." if ko
                    else f"If {a} + {b} = {c}, then {c} - {b} = {a}.")
            return f"{a} + {b} = {c}. {b} + {a} = {c}. {c} - {a} = {b}. {c} - {b} = {a}. {then}"
        return ("덧셈과 뺄셈은 짝입니다." if ko else "Addition and subtraction go together.") + "\n" + "\n".join(
            _until(rng.randint(30, 70), chunk))
    lines = _until(rng.randint(30, 70), lambda: arithmetic_line(
        lang, arithmetic_fact(rng), rng.choice(("digits", "words", "words", "quiz"))))
    return ("수학을 연습해 봅시다." if ko else "Let us practice math.") + "\n" + "\n".join(lines)


def problem_doc(rng, lang, avoid) -> str:
    def chunk():
        p = fresh_problem(rng, avoid, lang)
        body = p.solution().rsplit("\n", 1)[0]
        return (f"문제: {p.question}\n풀이: {body} 답은 {p.answer}입니다." if lang == "ko"
                else f"Problem: {p.question}\nSolution: {body} The answer is {p.answer}.")
    return "\n".join(_until(rng.randint(30, 60), chunk))


def parallel_doc(rng, lang, avoid) -> str:
    def chunk():
        en, ko = sentence_pair(rng)
        return None if en in avoid or ko in avoid else f"English: {en}\nKorean: {ko}"
    return "\n".join(_until(rng.randint(30, 90), chunk))


DOC_KINDS = {"story": (story_doc, 0.10), "facts": (fact_doc, 0.35), "arithmetic": (arithmetic_doc, 0.20),
             "problems": (problem_doc, 0.27), "parallel": (parallel_doc, 0.08)}
EN_SHARE = 0.55     # of the monolingual documents


def documents(rng, n, avoid, exclude=frozenset(), lang=None) -> list[str]:
    """n documents of the mixture (lang given: that language only, no parallel documents)."""
    kinds = [k for k in DOC_KINDS if not (lang and k == "parallel")]
    weights = [DOC_KINDS[k][1] for k in kinds]
    out = []
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        doc = DOC_KINDS[kind][0](rng, lang or ("en" if rng.random() < EN_SHARE else "ko"), avoid)
        if doc not in exclude:
            out.append(doc)
    return out


# ---------------------------------------------------------------- chat records

SYSTEM = ["You are a helpful assistant.", "You are a small bilingual assistant. Answer briefly.",
          "당신은 친절한 도우미입니다. 짧게 답하세요."]
TO_KO = ["Translate into Korean: {s}", "Translate this sentence to Korean: {s}", "다음 문장을 한국어로 번역하세요: {s}"]
TO_EN = ["Translate into English: {s}", "다음 문장을 영어로 번역하세요: {s}", "이 문장을 영어로 옮겨 주세요: {s}"]
PAST = {"en": ["Rewrite this sentence in the past tense: {s}", "Change this sentence to the past tense: {s}"],
        "ko": ["다음 문장을 과거형으로 바꾸세요: {s}", "이 문장을 과거 시제로 고쳐 쓰세요: {s}"]}
ANIMAL_LIST = {"en": ("List the animals in this sentence: {name} sees {list} at the {place}.",
                      "The animals are {list}."),
               "ko": ("이 문장에 나오는 동물을 모두 쓰세요: {name:은/는} {place}에서 {list:을/를} 봅니다.",
                      "문장에 나오는 동물은 {list}입니다.")}
IDENTITY = [("Hello!", "Hello! How can I help you today?"),
            ("Who are you?", "I am a small model trained by the lmfoundry quickstart."),
            ("Who made you?", "I was trained by the lmfoundry quickstart. I am a small model."),
            ("What can you do?", "I can answer simple questions, translate short sentences between English and "
                                 "Korean, and solve small math problems."),
            ("Thank you!", "You are welcome!"),
            ("안녕하세요!", "안녕하세요! 무엇을 도와드릴까요?"),
            ("당신은 누구입니까?", "저는 lmfoundry quickstart로 학습된 작은 모델입니다."),
            ("무엇을 할 수 있나요?", "간단한 질문에 답하고, 영어와 한국어 문장을 번역하고, 쉬운 수학 문제를 풀 수 있습니다."),
            ("고맙습니다!", "천만에요!")]
GENERAL_KINDS = {"to_ko": 0.18, "to_en": 0.15, "fact_en": 0.2, "fact_ko": 0.15, "identity": 0.08, "past": 0.14,
                 "animals": 0.10}


def general_exchange(rng, kind) -> tuple[str, str, set]:
    """(user, assistant, strings a held-out copy must not share with training)."""
    if kind in ("to_ko", "to_en"):
        en, ko = sentence_pair(rng)
        src, dst = (en, ko) if kind == "to_ko" else (ko, en)
        user = fill(rng.choice(TO_KO if kind == "to_ko" else TO_EN), {"s": src})
        return user, dst, {user, en, ko}
    if kind.startswith("fact"):
        lang, fact = kind[-2:], rng.choice(FACTS)
        user = fact.ask(rng, lang)
        return user, fact.answer(lang), {user}
    if kind == "identity":
        user, reply = rng.choice(IDENTITY)
        return user, reply, {user}
    lang = rng.choice(("en", "ko"))
    if kind == "past":
        t, s = rng.choice(SENTENCES), scene(rng, lang)[lang]
        now, then = (fill(t[0], s), fill(t[1], s)) if lang == "en" else (fill(t[2], s), fill(t[3], s))
        user = fill(rng.choice(PAST[lang]), {"s": now})
        return user, then, {user, now}
    animals = rng.sample(ANIMALS, rng.randint(2, 3))
    names = [f"a {a[0]}" if a[0][0] not in "aeiou" else f"an {a[0]}" for a in animals]
    slots = {"name": people(rng, lang)[0][lang == "ko"], "place": rng.choice(PLACES)[lang == "ko"],
             "list": ", ".join(names[:-1]) + " and " + names[-1] if lang == "en" else ", ".join(a[2] for a in animals)}
    user = fill(ANIMAL_LIST[lang][0], slots)
    answer_list = ", ".join(f"the {a[0]}" for a in animals[:-1]) + f" and the {animals[-1][0]}"
    return user, fill(ANIMAL_LIST[lang][1], {"list": answer_list if lang == "en" else slots["list"]}), {user}


def general_record(rng, avoid, held_out=False) -> tuple[dict, set]:
    """A chat record (10% with a system message, 10% two exchanges) and its held-out keys."""
    kinds = [k for k in GENERAL_KINDS if not (held_out and k == "identity")]   # greetings repeat: never held out
    while True:
        messages, keys = [], set()
        if rng.random() < 0.1:
            messages.append({"role": "system", "content": rng.choice(SYSTEM)})
        for _ in range(2 if rng.random() < 0.1 else 1):
            user, reply, held = general_exchange(rng, rng.choices(kinds, [GENERAL_KINDS[k] for k in kinds])[0])
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            keys |= held
        if not keys & avoid:
            return {"messages": messages}, keys


def math_record(rng, p: Problem) -> dict:
    return {"messages": [{"role": "user", "content": problem_prompt(rng, p.question)},
                         {"role": "assistant", "content": p.solution()}]}


def dpo_record(rng, p: Problem) -> dict:
    return {"prompt": [{"role": "user", "content": problem_prompt(rng, p.question)}],
            "chosen": [{"role": "assistant", "content": p.solution()}],
            "rejected": [{"role": "assistant", "content": p.solution(p.flaw(rng))}]}


def online_record(rng, p: Problem) -> dict:
    """A prompt for online preference optimisation: the question, and the answer a verifier checks."""
    return {"prompt": [{"role": "user", "content": problem_prompt(rng, p.question)}], "answer": p.solution()}


def mc_record(rng, index: int, answer_at: int) -> dict:
    """An ARC-format question about a world fact (80%) or an arithmetic fact (20%)."""
    lang = "en" if rng.random() < EN_SHARE else "ko"
    if rng.random() < 0.2:
        a, op, b, c = arithmetic_fact(rng)
        question, answer = arithmetic_question(a, op, b, lang), str(c)
        pool = [str(x) for x in range(max(0, c - 5), c + 6) if x != c]
    else:
        fact = rng.choice(FACTS)
        question, answer = fact.ask(rng, lang), fact.short(lang)
        pool = sorted({f.short(lang) for f in FACTS if f.category == fact.category} - {answer})
        pool = [x for x in pool if x not in question]
    choices = rng.sample(pool, 3)
    choices.insert(answer_at, answer)
    return {"id": f"quickstart-mc-{index:04d}", "question": question,
            "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "ABCD"[answer_at]}


# ---------------------------------------------------------------- build

@dataclass
class Sizes:
    pretrain_docs: int = 16000   # pretrain.txt
    continue_docs: int = 8000    # continue.txt (continued pretraining; fresh documents, same distribution)
    heldout_docs: int = 400      # heldout.txt
    lang_docs: int = 300         # lang_en.txt and lang_ko.txt each
    sft_general: int = 2000      # sft_general.jsonl
    sft_math: int = 2000         # sft_math.jsonl
    sft_heldout: int = 100       # sft_general_heldout.jsonl and sft_math_heldout.jsonl each
    dpo_pairs: int = 1500        # dpo.jsonl
    dpo_heldout: int = 150       # dpo_heldout.jsonl
    online_prompts: int = 512    # online_prompts.jsonl
    math_test: int = 100         # eval/gsm8k.jsonl
    mc_test: int = 150           # eval/arc_easy.jsonl


DESCRIPTIONS = {
    "pretrain.txt": "pretraining documents: stories, world facts, arithmetic, word problems, EN/KO pairs",
    "continue.txt": "continued-pretraining documents (fresh draws, same mixture)",
    "heldout.txt": "held-out documents of the same mixture (validation loss)",
    "lang_en.txt": "held-out English-only documents (tokenizer compression)",
    "lang_ko.txt": "held-out Korean-only documents (tokenizer compression)",
    "sft_general.jsonl": "chat: translation, fact questions, greetings, rewriting",
    "sft_general_heldout.jsonl": "held-out chat records of the sft_general kinds",
    "sft_math.jsonl": "math word problems with worked solutions ending '#### N' (Synth. Math-Instruct style)",
    "sft_math_heldout.jsonl": "held-out math word problems",
    "dpo.jsonl": "preference pairs: correct vs one-arithmetic-error solution (Synth. Math-Alignment style)",
    "dpo_heldout.jsonl": "held-out preference pairs",
    "online_prompts.jsonl": "math questions with their answers for online DPO (the policy samples, a verifier scores)",
    "eval/gsm8k.jsonl": "math test set in GSM8K's schema",
    "eval/arc_easy.jsonl": "multiple-choice world and arithmetic facts in ARC's schema",
}


def _problems(rng, n, avoid) -> list[Problem]:
    """n problems with questions not in `avoid`, each added to it."""
    out = []
    for _ in range(n):
        out.append(fresh_problem(rng, avoid))
        avoid.add(out[-1].question)
    return out


def build(out_dir, sizes: Sizes = Sizes(), seed: int = 0) -> dict:
    """Write every file into out_dir (created if missing; files written directly, the caller handles
    atomicity). Returns the manifest dict (also written as out_dir/manifest.json):
    {"seed", "sizes", "files": {name: {"records": n, "description": str}}}."""
    def rng(name):
        return random.Random(f"{seed}:{name}")
    out: dict[str, list] = {}
    # held-out and test items first; `reserved` collects every string training must not repeat
    reserved: set[str] = set()
    r = rng("gsm8k")
    out["eval/gsm8k.jsonl"] = [{"question": p.question, "answer": p.solution()}
                               for p in _problems(r, sizes.math_test, reserved)]
    r = rng("sft_math_heldout")
    out["sft_math_heldout.jsonl"] = [math_record(r, p) for p in _problems(r, sizes.sft_heldout, reserved)]
    r = rng("dpo_heldout")
    out["dpo_heldout.jsonl"] = [dpo_record(r, p) for p in _problems(r, sizes.dpo_heldout, reserved)]
    r, out["sft_general_heldout.jsonl"] = rng("sft_general_heldout"), []
    for _ in range(sizes.sft_heldout):
        record, keys = general_record(r, reserved, held_out=True)
        out["sft_general_heldout.jsonl"].append(record)
        reserved |= keys
    r, slots = rng("arc_easy"), [i % 4 for i in range(sizes.mc_test)]
    rng("arc_positions").shuffle(slots)
    out["eval/arc_easy.jsonl"], asked = [], set()
    while len(out["eval/arc_easy.jsonl"]) < sizes.mc_test:
        record = mc_record(r, len(out["eval/arc_easy.jsonl"]), slots[len(out["eval/arc_easy.jsonl"])])
        if record["question"] not in asked:
            asked.add(record["question"])
            out["eval/arc_easy.jsonl"].append(record)
    out["heldout.txt"] = documents(rng("heldout"), sizes.heldout_docs, reserved)
    out["lang_en.txt"] = documents(rng("lang_en"), sizes.lang_docs, reserved, lang="en")
    out["lang_ko.txt"] = documents(rng("lang_ko"), sizes.lang_docs, reserved, lang="ko")
    held_docs = set(out["heldout.txt"]) | set(out["lang_en.txt"]) | set(out["lang_ko.txt"])

    # training sets
    r, seen = rng("sft_math"), set(reserved)
    out["sft_math.jsonl"] = [math_record(r, p) for p in _problems(r, sizes.sft_math, seen)]
    r = rng("dpo")   # fresh questions: none of sft_math's
    out["dpo.jsonl"] = [dpo_record(r, p) for p in _problems(r, sizes.dpo_pairs, seen)]
    r = rng("online")   # fresh questions again
    out["online_prompts.jsonl"] = [online_record(r, p) for p in _problems(r, sizes.online_prompts, seen)]
    r = rng("sft_general")
    out["sft_general.jsonl"] = [general_record(r, reserved)[0] for _ in range(sizes.sft_general)]
    out["pretrain.txt"] = documents(rng("pretrain"), sizes.pretrain_docs, reserved, held_docs)
    out["continue.txt"] = documents(rng("continue"), sizes.continue_docs, reserved, held_docs)

    out_dir = Path(out_dir)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    for name, items in out.items():
        text = ("\n\n".join(items) if name.endswith(".txt")
                else "\n".join(json.dumps(x, ensure_ascii=False) for x in items)) + "\n"
        (out_dir / name).write_text(text, encoding="utf-8")
    manifest = {"seed": seed, "sizes": asdict(sizes), "files": {
        name: {"records": len(out[name]), "description": DESCRIPTIONS[name]} for name in DESCRIPTIONS}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
