"""quickstart/synth.py: deterministic, held-out sets disjoint from training, readable by lmfoundry's own
loaders, arithmetic that checks out, grammatical Korean particles, documents in the promised format."""
import json
import re
from collections import Counter

import pytest

from lmfoundry.quickstart.synth import DOC_KINDS, Sizes, build, josa

SMALL = Sizes(pretrain_docs=600, continue_docs=300, heldout_docs=80, lang_docs=40, sft_general=300, sft_math=300,
              sft_heldout=60, dpo_pairs=200, dpo_heldout=50, math_test=60, mc_test=80, online_prompts=50)
TINY = Sizes(pretrain_docs=60, continue_docs=30, heldout_docs=10, lang_docs=10, sft_general=30, sft_math=30,
             sft_heldout=10, dpo_pairs=20, dpo_heldout=10, math_test=10, mc_test=20, online_prompts=10)
HANGUL = re.compile("[가-힣]")
EQUATION = re.compile(r"(\d+) ([-+×]) (\d+) = (\d+)")
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, build(out, SMALL, seed=0)


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def documents(path):
    return path.read_text(encoding="utf-8").removesuffix("\n").split("\n\n")


def question_of(user: str) -> str:
    """The question inside the GSM8K prompt wrapper, or the content as it is."""
    m = re.fullmatch(r"Question: (.*)\nAnswer:", user, re.S)
    return m[1] if m else user


def user_questions(records) -> set[str]:
    return {question_of(m["content"]) for r in records for m in r.get("messages") or r["prompt"] if m["role"] == "user"}


def final_answer(solution: str) -> int:
    last = solution.splitlines()[-1]
    assert re.fullmatch(r"#### \d+", last), solution
    return int(last[5:])


def check_working(question: str, solution: str) -> list[tuple]:
    """Every "x op y = z" in the solution: the first x and every y come from the question, a later x
    is the previous z, and the final "#### N" is the last z. Returns [(x, op, y, z)]."""
    steps = [(int(x), op, int(y), int(z)) for x, op, y, z in EQUATION.findall(solution)]
    assert 1 <= len(steps) <= 2, solution
    given = [int(n) for n in re.findall(r"\d+", question)]
    for i, (x, _, y, _) in enumerate(steps):
        assert (x in given) if i == 0 else (x == steps[i - 1][3]), solution
        assert y in given, solution
    assert final_answer(solution) == steps[-1][3], solution
    return steps


def is_correct(steps) -> bool:
    return all(OPS[op](x, y) == z for x, op, y, z in steps)


# ---------------------------------------------------------------- determinism, manifest

def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a, b, c = build(tmp_path / "a", TINY, seed=0), build(tmp_path / "b", TINY, seed=0), build(tmp_path / "c", TINY, 1)
    assert a == b and a["files"] == c["files"] and a["seed"] == 0 and c["seed"] == 1
    names = list(a["files"]) + ["manifest.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    differ = [n for n in a["files"] if (tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes()]
    assert len(differ) == len(a["files"])


def test_manifest_counts_match_files(data):
    out, manifest = data
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["sizes"]["pretrain_docs"] == SMALL.pretrain_docs
    expected = {"pretrain.txt": SMALL.pretrain_docs, "continue.txt": SMALL.continue_docs,
                "heldout.txt": SMALL.heldout_docs, "lang_en.txt": SMALL.lang_docs, "lang_ko.txt": SMALL.lang_docs,
                "sft_general.jsonl": SMALL.sft_general, "sft_general_heldout.jsonl": SMALL.sft_heldout,
                "sft_math.jsonl": SMALL.sft_math, "sft_math_heldout.jsonl": SMALL.sft_heldout,
                "dpo.jsonl": SMALL.dpo_pairs, "dpo_heldout.jsonl": SMALL.dpo_heldout,
                "online_prompts.jsonl": SMALL.online_prompts, "eval/gsm8k.jsonl": SMALL.math_test, "eval/arc_easy.jsonl": SMALL.mc_test}
    assert {k: v["records"] for k, v in manifest["files"].items()} == expected
    for name, n in expected.items():
        found = len(documents(out / name)) if name.endswith(".txt") else len(jsonl(out / name))
        assert found == n, name
        assert manifest["files"][name]["description"]


# ---------------------------------------------------------------- held out means held out

def test_held_out_questions_never_appear_in_training(data):
    out, _ = data
    held = ({r["question"] for r in jsonl(out / "eval/gsm8k.jsonl")}
            | user_questions(jsonl(out / "dpo_heldout.jsonl")) | user_questions(jsonl(out / "sft_math_heldout.jsonl"))
            | user_questions(jsonl(out / "sft_general_heldout.jsonl")))
    assert len(held) >= SMALL.math_test + SMALL.dpo_heldout + 2 * SMALL.sft_heldout
    trained = (user_questions(jsonl(out / "sft_math.jsonl")) | user_questions(jsonl(out / "sft_general.jsonl"))
               | user_questions(jsonl(out / "dpo.jsonl")) | user_questions(jsonl(out / "online_prompts.jsonl")))
    assert not held & trained
    corpus = (out / "pretrain.txt").read_text(encoding="utf-8") + (out / "continue.txt").read_text(encoding="utf-8")
    assert [q for q in held if q in corpus] == []
    # the sentences of held-out translation requests are unseen too, not just the request wording
    sentences = [u.split(": ", 1)[1] for u in user_questions(jsonl(out / "sft_general_heldout.jsonl"))
                 if "Translate" in u or "번역" in u or "옮겨" in u]
    assert sentences and [s for s in sentences if s in corpus or any(s in t for t in trained)] == []


def test_dpo_questions_are_fresh_draws(data):
    out, _ = data
    dpo, sft = user_questions(jsonl(out / "dpo.jsonl")), user_questions(jsonl(out / "sft_math.jsonl"))
    assert len(dpo) == SMALL.dpo_pairs and len(sft) == SMALL.sft_math     # no repeats within a file either
    assert not dpo & sft


def test_held_out_documents_are_not_in_the_training_corpora(data):
    out, _ = data
    train = set(documents(out / "pretrain.txt")) | set(documents(out / "continue.txt"))
    for name in ("heldout.txt", "lang_en.txt", "lang_ko.txt"):
        assert not set(documents(out / name)) & train, name


# ---------------------------------------------------------------- lmfoundry reads every file

def test_chat_files_load_with_sft_and_dpo_batches(data, tmp_path):
    from lmfoundry.data import DPOBatches, SFTBatches
    from lmfoundry.tokenizer import load_tokenizer
    from lmfoundry.tokenizer_train import train_tokenizer
    out, _ = data
    tok = load_tokenizer(train_tokenizer([out / "pretrain.txt"], tmp_path / "tok", vocab_size=600))
    for name in ("sft_general.jsonl", "sft_general_heldout.jsonl", "sft_math.jsonl", "sft_math_heldout.jsonl"):
        batches = SFTBatches(out / name, tok, seq_len=256, batch_size=4, progress=False)
        assert batches.stats["records"] == batches.stats["examples"] == len(jsonl(out / name))
        assert batches.stats["truncated"] == 0 and batches.stats["target_tokens"] > 0
    for name in ("dpo.jsonl", "dpo_heldout.jsonl"):
        pairs = DPOBatches(out / name, tok, seq_len=256, batch_size=4, progress=False)
        assert pairs.stats["examples"] == len(jsonl(out / name)) and pairs.stats["truncated"] == 0


def test_eval_files_load_as_gsm8k_and_arc(data):
    from lmfoundry.eval.runner import load_docs
    from lmfoundry.eval.tasks import get_task
    out, _ = data
    gsm = load_docs(get_task("gsm8k")[0], out / "eval/gsm8k.jsonl")
    arc = load_docs(get_task("arc_easy")[0], out / "eval/arc_easy.jsonl")
    assert len(gsm) == SMALL.math_test and len(arc) == SMALL.mc_test
    assert gsm[0].query.startswith("Question: ") and gsm[0].query.endswith("\nAnswer:")
    assert all(len(d.choices) == 4 and d.gold in range(4) for d in arc)


# ---------------------------------------------------------------- math

def test_gsm8k_answers_are_the_arithmetic_of_their_problems(data):
    out, _ = data
    records = jsonl(out / "eval/gsm8k.jsonl")
    kinds = Counter()
    for r in records:
        steps = check_working(r["question"], r["answer"])
        assert is_correct(steps), r
        kinds[tuple(op for _, op, _, _ in steps)] += 1
        for x, op, y, z in steps:
            assert 0 <= z <= 40 or op == "×"
            assert (2 <= x <= 9 and 2 <= y <= 9) if op == "×" else (1 <= y <= 20)
    assert {("+",), ("-",), ("×",)} <= set(kinds) and any(len(k) == 2 for k in kinds)
    assert 0.4 < sum(not HANGUL.search(r["question"]) for r in records) / len(records) < 0.8


def test_sft_math_prompts_and_solutions(data):
    out, _ = data
    records = jsonl(out / "sft_math.jsonl") + jsonl(out / "sft_math_heldout.jsonl")
    wrapped = 0
    for r in records:
        (user, reply) = r["messages"]
        assert (user["role"], reply["role"]) == ("user", "assistant")
        wrapped += user["content"] != question_of(user["content"])
        assert is_correct(check_working(question_of(user["content"]), reply["content"]))
    assert 0.4 < wrapped / len(records) < 0.6


def test_dpo_chosen_is_correct_and_rejected_confidently_wrong(data):
    out, _ = data
    for r in jsonl(out / "dpo.jsonl") + jsonl(out / "dpo_heldout.jsonl"):
        question = question_of(r["prompt"][0]["content"])
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        good, bad = check_working(question, chosen), check_working(question, rejected)
        assert is_correct(good)
        assert final_answer(rejected) != final_answer(chosen)
        # one step went wrong (a wrong result or a wrong operation); the rest follows from it
        wrong = [i for i, (g, b) in enumerate(zip(good, bad)) if g[1] != b[1] or OPS[b[1]](b[0], b[2]) != b[3]]
        assert len(wrong) == 1 and len(good) == len(bad), r
        assert abs(len(chosen) - len(rejected)) <= 8      # the same words, other numbers


# ---------------------------------------------------------------- multiple choice

def test_arc_questions_have_four_distinct_choices_and_balanced_answers(data):
    out, _ = data
    records = jsonl(out / "eval/arc_easy.jsonl")
    assert len({r["id"] for r in records}) == len({r["question"] for r in records}) == len(records)
    for r in records:
        assert r["choices"]["label"] == ["A", "B", "C", "D"]
        assert len(set(r["choices"]["text"])) == 4
    keys = Counter(r["answerKey"] for r in records)
    assert set(keys) == set("ABCD") and max(keys.values()) - min(keys.values()) <= 1
    arithmetic = [r for r in records if re.search(r"\d+ [-+×] \d+", r["question"])]
    assert 0.05 < len(arithmetic) / len(records) < 0.4
    for r in arithmetic:
        a, op, b = re.search(r"(\d+) ([-+×]) (\d+)", r["question"]).groups()
        gold = r["choices"]["text"]["ABCD".index(r["answerKey"])]
        assert int(gold) == OPS[op](int(a), int(b))
    assert any(HANGUL.search(r["question"]) for r in records) and any(
        not HANGUL.search(r["question"]) for r in records)


def test_arc_fact_answers_are_stated_in_pretraining(data):
    out, _ = data
    sentences = re.split(r"(?<=[.?])\s", (out / "pretrain.txt").read_text(encoding="utf-8"))
    capitals = [r for r in jsonl(out / "eval/arc_easy.jsonl") if "capital of" in r["question"]]
    assert capitals
    for r in capitals:
        country = re.search(r"capital of (\w+)", r["question"])[1]
        gold = r["choices"]["text"]["ABCD".index(r["answerKey"])]
        stated = [s for s in sentences if country in s and gold in s and "capital" in s]
        assert stated, (country, gold)


# ---------------------------------------------------------------- Korean particles

@pytest.mark.parametrize("word, pair, expected", [
    ("사과", "을/를", "사과를"), ("책", "을/를", "책을"), ("민수", "은/는", "민수는"), ("지영", "은/는", "지영은"),
    ("고양이", "이/가", "고양이가"), ("말", "이/가", "말이"), ("톰", "과/와", "톰과"), ("안나", "과/와", "안나와"),
    ("학교", "으로/로", "학교로"), ("공원", "으로/로", "공원으로"), ("서울", "으로/로", "서울로"),  # ㄹ takes 로
    ("'작다'", "은/는", "'작다'는"), ("3월", "은/는", "3월은"), ("7개", "을/를", "7개를"), ("연필 5자루", "이/가", "연필 5자루가"),
    # numbers are read aloud: 일 이 삼 사 오 육 칠 팔 구, 십 and 영 end in a consonant
    (1, "은/는", "1은"), (2, "은/는", "2는"), (3, "이/가", "3이"), (4, "이/가", "4가"), (5, "을/를", "5를"),
    (6, "을/를", "6을"), (9, "과/와", "9와"), (10, "은/는", "10은"), (12, "은/는", "12는"), (17, "이/가", "17이"),
    (20, "이/가", "20이"), (0, "은/는", "0은"), (1, "으로/로", "1로"), (7, "으로/로", "7로"), (8, "으로/로", "8로"),
    (3, "으로/로", "3으로"), (6, "으로/로", "6으로"), (10, "으로/로", "10으로"), (2, "으로/로", "2로"),
])
def test_josa_follows_the_final_sound(word, pair, expected):
    assert josa(word, pair) == expected


def test_josa_refuses_what_it_cannot_read():
    with pytest.raises(ValueError):
        josa("Tom", "은/는")


# ---------------------------------------------------------------- documents

def test_documents_format_and_language_mix(data):
    out, _ = data
    for name in ("pretrain.txt", "continue.txt", "heldout.txt", "lang_en.txt", "lang_ko.txt"):
        text = (out / name).read_text(encoding="utf-8")
        assert text.endswith("\n") and not text.endswith("\n\n") and "\n\n\n" not in text
        for doc in documents(out / name):
            assert doc == doc.strip() and "\n\n" not in doc
            assert all(line.strip() == line and line for line in doc.split("\n")), doc
            assert 30 <= len(doc.split()) <= 150, doc
    docs = documents(out / "pretrain.txt")
    parallel = [d for d in docs if d.startswith("English: ")]
    assert all(HANGUL.search(d) for d in parallel) and 0.03 < len(parallel) / len(docs) < 0.15
    mono = [d for d in docs if not d.startswith("English: ")]
    assert abs(sum(bool(HANGUL.search(d)) for d in mono) / len(mono) - 0.45) < 0.10
    assert not any(HANGUL.search(d) for d in documents(out / "lang_en.txt"))
    assert all(HANGUL.search(d) for d in documents(out / "lang_ko.txt"))
    kinds = Counter("problem" if d.startswith(("Problem: ", "문제: ")) else
                    "arithmetic" if EQUATION.search(d) or "더하기" in d or " plus " in d else "other" for d in docs)
    assert abs(kinds["problem"] / len(docs) - DOC_KINDS["problems"][1]) < 0.07
    assert abs(kinds["arithmetic"] / len(docs) - DOC_KINDS["arithmetic"][1]) < 0.08


def test_chat_records_shape(data):
    out, _ = data
    records = jsonl(out / "sft_general.jsonl")
    system = sum(r["messages"][0]["role"] == "system" for r in records)
    two = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in records)
    assert 0.03 < system / len(records) < 0.2 and 0.03 < two / len(records) < 0.2
    for r in records:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(len(m["content"].split()) <= 40 for m in r["messages"] if m["role"] == "assistant")
    replies = " ".join(m["content"] for r in records for m in r["messages"])
    assert "lmfoundry quickstart" in replies and HANGUL.search(replies)
