"""Task prompts, byte for byte as lm-evaluation-harness renders them (expected strings written
by hand from the harness formats: tasks/arc, hellaswag/utils.py, mmlu/default, truthfulqa_mc1,
winogrande/preprocess_winogrande.py, gsm8k.yaml), few-shot selection, and bad input."""
import json
import random

import pytest

from lmfoundry.eval import EvalDataError, render_requests
from lmfoundry.eval.samples import write_sample_data
from lmfoundry.eval.tasks import TASKS, hellaswag_preprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("data"))


def reqs(data, task, k=0, **kw):
    return render_requests([task], data, num_fewshot=k, **kw)[task]


def test_arc_prompt_and_choices(data):
    doc0 = reqs(data, "arc_challenge")[0][1]
    ctx = "Question: Which gas do green plants take in from the air to make food?\nAnswer:"
    assert doc0 == [(ctx, " oxygen"), (ctx, " carbon dioxide"), (ctx, " helium"), (ctx, " nitrogen")]
    # numeric labels: gold is the index of answerKey in choices.label
    assert TASKS["arc_challenge"].make_doc(1, {"question": "q", "choices": {"text": ["a", "b", "c"],
                                                                            "label": ["1", "2", "3"]},
                                               "answerKey": "3"}).gold == 2


def test_hellaswag_preprocess_and_prompt(data):
    assert hellaswag_preprocess(" A [title] B [step] C  D ") == "A. B C D"
    doc1 = reqs(data, "hellaswag")[1][1]
    ctx = "Home and Garden: How to grow tomatoes. Choose a sunny spot. Tomatoes need at least six hours of sun."
    assert [c for c, _ in doc1] == [ctx] * 4
    # a leading "[title]" has no space before it: only the bracket goes, its space stays
    assert [x for _, x in doc1] == ["  Water the plants deeply. Water at the base in the morning.",
                                    "  Paint the pots blue.", "  Keep them in a dark cupboard Forever.",
                                    "  Sell the seeds."]
    doc0 = reqs(data, "hellaswag")[0][1]
    assert doc0[1] == ("Removing ice from car: A man stands beside a snowy car holding a scraper. Then",
                       " , the man scrapes the ice off the windshield.")


def test_mmlu_header_body_and_first_n_shots(data):
    (doc,) = [r for i, r in reqs(data, "mmlu_anatomy", k=2)]
    want = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
            "Which bone is in the upper arm?\nA. femur\nB. humerus\nC. tibia\nD. ulna\nAnswer: B\n\n"
            "How many chambers does the human heart have?\nA. two\nB. three\nC. four\nD. five\nAnswer: C\n\n"
            "Which organ pumps blood through the body?\nA. lung\nB. liver\nC. heart\nD. kidney\nAnswer:")
    assert doc == [(want, " A"), (want, " B"), (want, " C"), (want, " D")]
    maths = reqs(data, "mmlu_elementary_mathematics", k=0)
    assert maths[0][1][0][0].startswith("The following are multiple choice questions (with answers) about "
                                        "elementary mathematics.\n\nWhat is 7 * 8?\nA. 54\n")


def test_truthfulqa_six_qa_pairs(data):
    ctx = reqs(data, "truthfulqa_mc2", k=5)[0][1][0][0]   # fixed 0-shot: --fewshot does not apply
    assert ctx.startswith("Q: What is human life expectancy in the United States?\n"
                          "A: Human life expectancy in the United States is 78 years.\n\n")
    assert ctx.endswith("Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
                        "\n\nQ: What happens if you crack your knuckles a lot?\nA:")
    assert ctx.count("\n\nQ: ") == 6
    mc1 = reqs(data, "truthfulqa_mc1")[0][1]
    assert [x for _, x in mc1] == [" Nothing in particular happens if you crack your knuckles a lot.",
                                   " If you crack your knuckles a lot, you will develop arthritis."]


def test_winogrande_partial_scoring_requests(data):
    doc = reqs(data, "winogrande")[0][1]
    assert doc == [("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
                   ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")]
    # a shot shows the gold option filled in, then the rest of the sentence
    shot = reqs(data, "winogrande", k=1)[0][1][0][0]
    first = shot.split("\n\n")[0]
    assert first in ("The cat chased the mouse until the cat was tired.",
                     "Ian helped Dan move because Ian had a big truck.",
                     "The ice melted on the road because the road was warm.")


def test_gsm8k_prompt_shots_and_stop_strings(data):
    (ctx, kw), = reqs(data, "gsm8k", k=1)[0][1]
    assert kw == {"until": ["Question:", "</s>", "<|im_end|>"], "max_gen_toks": 256}
    shot, query = ctx.split("\n\n")[0] + "\n\n", ctx[ctx.index("Question: Tom"):]
    assert query == "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
    assert shot.startswith("Question: ") and "\nAnswer: " in shot and "\n#### " in shot


def test_fewshot_uses_seeded_random_sampling_in_document_order(data):
    """lm-eval: one random.Random(1234) per task, drawn in document order; ARC draws k."""
    train = [json.loads(x) for x in (data / "arc_challenge.train.jsonl").read_text().splitlines()]
    rnd = random.Random(1234)
    for _, doc in reqs(data, "arc_challenge", k=2):
        picks = rnd.sample(train, 2)
        want = "".join(f"Question: {p['question']}\nAnswer: {p['choices']['text'][p['choices']['label'].index(p['answerKey'])]}"
                       "\n\n" for p in picks)
        assert doc[0][0].startswith(want)
    # HellaSwag and Winogrande (no test split in lm-eval) draw k + 1 and drop the evaluated doc
    hs_train = [json.loads(x) for x in (data / "hellaswag.train.jsonl").read_text().splitlines()]
    rnd = random.Random(1234)
    for _, doc in reqs(data, "hellaswag", k=1):
        pick = rnd.sample(hs_train, 2)[0]
        assert doc[0][0].startswith(hellaswag_preprocess(pick["activity_label"] + ": " + pick["ctx_a"] + " "
                                                         + pick["ctx_b"].capitalize()) + " ")


def test_leaderboard_protocol_shuffles_with_seed_42_and_shares_the_generator(tmp_path):
    d = write_sample_data(tmp_path)
    train = [{"question": f"train question {i}?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
              "answerKey": "A"} for i in range(30)]
    (d / "arc_challenge.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    evald = [json.loads(x) for x in (d / "arc_challenge.jsonl").read_text().splitlines()]
    got = render_requests(["arc_challenge"], d, leaderboard=True)["arc_challenge"]
    rnd = random.Random(42)
    order = list(range(len(evald)))
    rnd.shuffle(order)
    assert [i for i, _ in got] == order
    for i, doc in got:
        picks = rnd.sample(train, 25)
        assert doc[0][0] == "".join(f"Question: {p['question']}\nAnswer: x\n\n" for p in picks) + \
            f"Question: {evald[i]['question']}\nAnswer:"
    # --limit keeps the first N of the shuffle
    lim = render_requests(["arc_challenge"], d, leaderboard=True, limit=2)["arc_challenge"]
    assert [i for i, _ in lim] == order[:2]


def test_leaderboard_gsm8k_uses_the_old_stop_strings(tmp_path):
    d = write_sample_data(tmp_path)
    train = [{"question": f"q{i}", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(8)]
    (d / "gsm8k.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    got = render_requests(["gsm8k"], d, leaderboard=True)["gsm8k"]
    assert got[0][1][0][1]["until"] == [":", "Question:", "Question"]
    assert got[0][1][0][0].count("Question: ") == 6      # 5 shots + the question


def test_no_training_file_draws_shots_from_the_eval_file_never_the_doc_itself(tmp_path):
    d = write_sample_data(tmp_path)
    (d / "arc_challenge.train.jsonl").unlink()
    for _, doc in render_requests(["arc_challenge"], d, num_fewshot=2)["arc_challenge"]:
        ctx = doc[0][0]
        own = ctx.split("\n\n")[-1]
        assert own not in ctx.split("\n\n")[:-1]


def test_parquet_files_are_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from lmfoundry.eval.samples import ARC
    pq.write_table(pa.Table.from_pylist(ARC), tmp_path / "arc_easy.parquet")
    assert len(render_requests(["arc_easy"], tmp_path)["arc_easy"]) == 3


@pytest.mark.parametrize("content,match", [
    ('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}\n', "missing field 'answerKey'"),
    ('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "Z"}\n', "answerKey 'Z'"),
    ('{"question": \n', "malformed JSON line"),
])
def test_bad_records_give_one_clear_error_naming_the_file(tmp_path, content, match):
    (tmp_path / "arc_easy.jsonl").write_text(content)
    with pytest.raises(EvalDataError, match=match) as e:
        render_requests(["arc_easy"], tmp_path)
    assert "arc_easy.jsonl" in str(e.value)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(EvalDataError, match="no data file for task hellaswag"):
        render_requests(["hellaswag"], tmp_path)
    with pytest.raises(EvalDataError, match="unknown task"):
        render_requests(["piqa"], tmp_path)


def test_too_few_shots_is_an_error(data):
    with pytest.raises(EvalDataError, match="needs"):
        render_requests(["gsm8k"], data, num_fewshot=5)
