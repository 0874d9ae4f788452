"""LLM-as-judge benchmarks: MT-Bench, KoMT-Bench and LogicKor with any OpenAI-compatible judge.

    from lmfoundry.eval.judge import JudgeClient, run_judge_benchmark
    judge = JudgeClient("http://localhost:8000/v1", api_key="...", model="gpt-4-0613", cache="judge_cache.jsonl")
    summary = run_judge_benchmark(lm, "question.jsonl", "mt-bench", judge, out_dir="runs/mtbench")

Question files are read in their own formats:
- MT-Bench / KoMT-Bench (FastChat llm_judge): {"question_id", "category", "turns": [t1, t2],
  optional "reference": [r1, r2]}; reference answers may also come from FastChat's
  reference_answer/<judge>.jsonl ({"question_id", "choices": [{"turns": [...]}]}).
- LogicKor: {"id", "category", "questions": [q1, q2], optional "references": [r1|null, r2|null]}.

Answers are generated with the model's own chat template (turn 2 sees the model's turn-1 answer),
MT-Bench with FastChat's per-category temperatures, LogicKor greedily under one prompt strategy
("default" = 0-shot, "1-shot", "cot-1-shot"). Outputs are written in the native formats
(model_answer/<model>.jsonl + model_judgment/<judge>_single.jsonl; generated/<strategy>.jsonl +
evaluated/<strategy>.jsonl) so the upstream show_result / score scripts still read them.

Grades are parsed as upstream does (MT-Bench "[[r]]" then "[r]"; LogicKor "점수: r"). A
judgment that does not parse is kept with score null and counted under "unparseable" (it is
never silently dropped or set to 0; "mean_unparseable_as_zero" shows the other convention).
Every judge call is cached on disk by (model, messages, temperature, max_tokens): re-running
costs no calls. Means come with 95% intervals (normal approximation and a seeded bootstrap).
KoMT-Bench applies its language penalty (score -> sqrt(score) for a non-Korean answer,
questions 138 and 140 exempt) with a Hangul-share detector instead of MediaPipe's.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JudgeError
from ..generate import SamplingParams, generate_text
from .data import read_records
from .lm import Progress


# ---------------------------------------------------------------- judge prompts (data)
# FastChat fastchat/llm_judge/data/judge_prompts.jsonl: the four single-answer prompts.
_FC_INSTR = ("[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an "
             "AI assistant to the user question displayed below. ")
_FC_RATE = ("After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
            "this format: \"[[rating]]\", for example: \"Rating: [[5]]\".")
MT_BENCH_PROMPTS = {
    "single-v1": {
        "name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
        "prompt_template": _FC_INSTR + "Your evaluation should consider factors such as the helpfulness, relevance, "
        "accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a short "
        "explanation. Be as objective as possible. " + _FC_RATE + "\n\n[Question]\n{question}\n\n[The Start of "
        "Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
        "output_format": "[[rating]]"},
    "single-math-v1": {
        "name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
        "prompt_template": _FC_INSTR + "Your evaluation should consider correctness and helpfulness. You will be given "
        "a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's answer with "
        "the reference answer. Identify and correct any mistakes. Be as objective as possible. " + _FC_RATE +
        "\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference "
        "Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
        "output_format": "[[rating]]"},
    "single-v1-multi-turn": {
        "name": "single-v1-multi-turn", "type": "single",
        "system_prompt": "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
        "assistant to the user question displayed below. Your evaluation should consider factors such as the "
        "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation "
        "should focus on the assistant's answer to the second user question. Begin your evaluation by providing a "
        "short explanation. Be as objective as possible. " + _FC_RATE + "\n\n",
        "prompt_template": "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### "
        "Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of "
        "Assistant A's Conversation with User|>",
        "output_format": "[[rating]]"},
    "single-math-v1-multi-turn": {
        "name": "single-math-v1-multi-turn", "type": "single",
        "system_prompt": "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
        "assistant to the user question. Your evaluation should consider correctness and helpfulness. You will be "
        "given a reference answer and the assistant's answer. You evaluation should focus on the assistant's answer "
        "to the second question. Begin your evaluation by comparing the assistant's answer with the reference "
        "answer. Identify and correct any mistakes. Be as objective as possible. " + _FC_RATE + "\n\n",
        "prompt_template": "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
        "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of "
        "Reference Answer|>\n\n\n<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}"
        "\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End "
        "of Assistant A's Conversation with User|>",
        "output_format": "[[rating]]"},
}
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
KOMT_EXEMPT = (138, 140)

# LogicKor (instructkr/LogicKor templates.py / evaluator.py).
_LK_RULES = """# 기본 규칙
1. 질문의 요구사항을 충분히 반영하였는지 상세히 분석할 것.
2. 답변 과정에서 누락되었거나 포함되지 못하여 아쉬운 부분에 대하여 상세히 분석할 것.
3. 답변의 길이가 평가 결과에 영향을 미치지 않도록 할 것.
4. Additional Reference가 제공된다면 평가 시 해당 정보를 참고할 것.
{extra}
# 언어 요구사항
- 모델은 반드시 한국어로 답변해야 하며, 다른 언어로의 답변은 절대 허용되지 않는다.
- 예외적으로 질문이 영어로 답변할 것을 요구할 때에만 영어 답변이 허용된다.
- 한국어로 답변하지 않을 경우, 점수는 0점 처리된다.
- 언어 요구사항을 충족하는 것은 필수적이나, 이 요구사항의 충족이 답변의 질적 평가에 추가 점수로 이어지지는 않는다.

# 평가 출력 방식
**주어진 Question에 집중하여** Model's Response에 대한 평가와 1~10의 점수를 부여한다. 답변에 대한 평가는 4~5 문장으로 규칙을 참고하여 상세히 작성한다.

# 출력 형식
평가: 평가 내용
점수: 숫자"""
LOGICKOR_JUDGE = {
    "single_turn": "너는 질문에 대한 한국어 언어 모델의 답변을 매우 꼼꼼히 평가할 것이다. 공정한 평가를 위해 아래의 규칙을 준수한다.\n\n"
                   + _LK_RULES.format(extra=""),
    "multi_turn": "너는 대화 후 이어지는 후속 질문에 대한 한국어 언어 모델의 답변을 매우 꼼꼼히 평가할 것이다. 공정한 평가를 위해 아래의 규칙을 준수한다.\n\n"
                  + _LK_RULES.format(extra="5. 후속 질문에 대한 답변이 이전 대화 맥락과 일치하는지 확인할 것.\n"),
}
LOGICKOR_STOP = ("<|endoftext|>", "[INST]", "[/INST]", "<|im_end|>", "<|end|>", "<|eot_id|>", "<end_of_turn>", "<eos>")
_LK_1SHOT_Q = "Git의 rebase와 merge의 차이점을 설명하고, 각각 어떤 상황에서 사용하는 것이 좋은지 예를 들어 설명해주세요."
_LK_1SHOT_A = """Git에서 `rebase`와 `merge`는 두 개의 브랜치를 통합하는 데 사용되는 두 가지 주요 명령어입니다. 이들의 차이점과 사용 상황을 설명하겠습니다.

### Rebase

#### 개념
- `rebase`는 하나의 브랜치의 커밋을 다른 브랜치의 끝에 다시 적용하는 것입니다. 즉, 커밋 히스토리를 새로 만든다고 할 수 있습니다.
- 결과적으로 커밋 히스토리가 깔끔하게 정리됩니다.

#### 사용 상황
- **깔끔한 히스토리가 필요할 때**: 브랜치 히스토리가 병합 없이 일직선으로 이어지도록 하고 싶을 때 유용합니다.
- **작업 중인 브랜치를 최신 상태로 유지하고 싶을 때**: 예를 들어, `feature` 브랜치에서 작업 중인데 `main` 브랜치에서 업데이트가 있을 경우, `feature` 브랜치를 `rebase`하여 최신 상태로 유지할 수 있습니다.

#### 예제
1. `feature` 브랜치에서 작업 중입니다.
2. `main` 브랜치에 새로운 커밋이 추가되었습니다.
3. `feature` 브랜치에서 `git rebase main`을 실행합니다.
4. `feature` 브랜치의 커밋들이 `main` 브랜치의 최신 커밋들 뒤에 재배치됩니다.

```bash
git checkout feature
git rebase main
```

### Merge

#### 개념
- `merge`는 두 개의 브랜치를 합치는 방법으로, 두 브랜치의 히스토리를 유지하며 새로운 병합 커밋을 생성합니다.
- `merge`는 기존의 히스토리를 그대로 보존합니다.

#### 사용 상황
- **히스토리를 유지하고 싶을 때**: 각 브랜치의 작업 기록을 그대로 보존하면서 병합할 때 사용합니다.
- **협업 중 충돌을 명확히 해결하고 기록을 남기고 싶을 때**: 여러 사람이 같은 저장소에서 작업할 때, `merge`는 충돌 해결 과정과 그 기록을 명확히 남길 수 있습니다.

#### 예제
1. `feature` 브랜치에서 작업을 완료했습니다.
2. `main` 브랜치에 병합하고 싶습니다.
3. `main` 브랜치로 체크아웃한 후 `feature` 브랜치를 병합합니다.

```bash
git checkout main
git merge feature
```

### 요약

- **Rebase**는 히스토리를 깔끔하게 정리하는 데 유리하며, 주로 개인 작업이나 `feature` 브랜치를 최신 상태로 유지할 때 사용됩니다.
- **Merge**는 두 브랜치의 작업 히스토리를 보존하면서 병합하며, 협업 과정에서 충돌 해결과 기록을 명확히 남기는 데 유리합니다.

각 방법의 장단점과 사용 상황을 고려하여 적절히 선택하는 것이 중요합니다."""
_LK_COT_Q = ("한 도시에서 매년 나무를 심고 있습니다. 첫해에 100그루를 심었고, 매년 전년도에 심은 나무의 수보다 20%씩 더 많은 나무를 심고 있습니다. "
             "2년 후에는 총 몇 그루의 나무를 심게 될까요?")
_LK_COT_A = """이 문제를 해결하기 위해 단계별로 접근해 보겠습니다.

1단계: 주어진 정보 정리
- 첫해에 100그루를 심음
- 매년 전년도보다 20% 더 많은 나무를 심음
- 2년 후의 총 나무 수를 구해야 함

2단계: 두 번째 해에 심은 나무 수 계산
- 첫해보다 20% 증가
- 100 + (100의 20%) = 100 + 20 = 120그루

3단계: 세 번째 해에 심은 나무 수 계산
- 두 번째 해보다 20% 증가
- 120 + (120의 20%) = 120 + 24 = 144그루

4단계: 3년 동안 심은 총 나무 수 계산
- 첫해: 100그루
- 둘째 해: 120그루
- 셋째 해: 144그루
- 총합: 100 + 120 + 144 = 364그루

따라서, 2년 후(즉, 3년째)에는 총 364그루의 나무를 심게 됩니다."""
LOGICKOR_STRATEGIES = {
    "default": [],
    "1-shot": [{"role": "user", "content": _LK_1SHOT_Q}, {"role": "assistant", "content": _LK_1SHOT_A}],
    "cot-1-shot": [{"role": "system", "content": "문제를 해결하는 과정을 단계별로 명확하게 설명한 다음, 최종 답변을 제시해 주세요."},
                   {"role": "user", "content": _LK_COT_Q}, {"role": "assistant", "content": _LK_COT_A}],
}

ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
LOGICKOR_SCORE = re.compile(r"점수:\s*(\d+(\.\d+)?)")


def parse_mt_bench_score(judgment: str) -> float | None:
    m = ONE_SCORE.search(judgment or "") or ONE_SCORE_BACKUP.search(judgment or "")
    return float(m.group(1)) if m else None


def parse_logickor_score(judgment: str) -> float | None:
    m = LOGICKOR_SCORE.search((judgment or "").replace("*", ""))
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------- questions
@dataclass
class Question:
    id: int | str
    category: str
    turns: list[str]
    references: list = field(default_factory=list)
    record: dict = field(default_factory=dict)


def read_questions(path) -> tuple[str, list[Question]]:
    """("mt-bench" | "logickor", questions) from a question file in either native format."""
    records = read_records(path)
    if not records:
        raise JudgeError(f"{path}: no questions")
    out, fmt = [], None
    for i, r in enumerate(records):
        if "turns" in r:
            f, qid, turns, refs = "mt-bench", r.get("question_id"), r["turns"], r.get("reference") or []
        elif "questions" in r:
            f, qid, turns, refs = "logickor", r.get("id"), r["questions"][:2], (r.get("references") or [])[:2]
        else:
            raise JudgeError(f"{path}: record {i} has neither 'turns' (MT-Bench) nor 'questions' (LogicKor)")
        if fmt is not None and f != fmt:
            raise JudgeError(f"{path}: record {i} is {f} but earlier records are {fmt}")
        fmt = f
        if qid is None or not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise JudgeError(f"{path}: record {i} needs an id and a non-empty list of turns")
        out.append(Question(qid, str(r.get("category", "")), list(turns), list(refs), r))
    return fmt, out


def read_reference_answers(path) -> dict:
    """FastChat reference_answer/<model>.jsonl -> {question_id: [turn answers]}."""
    refs = {}
    for r in read_records(path):
        try:
            refs[r["question_id"]] = list(r["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{path}: expected {{question_id, choices: [{{turns: [...]}}]}} records") from None
    return refs


def read_judge_prompts(path) -> dict:
    """A FastChat judge_prompts(.jsonl) file (e.g. KoMT-Bench's judge_prompts_ko.jsonl) by name."""
    prompts = {r.get("name"): r for r in read_records(path)}
    missing = [n for n in MT_BENCH_PROMPTS if n not in prompts]
    if missing:
        raise JudgeError(f"{path}: missing judge prompt(s) {', '.join(missing)}")
    return prompts


# ---------------------------------------------------------------- judge client
class JudgeClient:
    """POST {base_url}/chat/completions on any OpenAI-compatible server, with an on-disk cache."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str = "gpt-4", cache=None,
                 temperature: float = 0.0, max_tokens: int = 2048, retries: int = 3, timeout: float = 300.0,
                 retry_sleep: float = 2.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key, self.model = api_key, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.retries, self.timeout, self.retry_sleep = retries, timeout, retry_sleep
        self.cache_path = Path(cache) if cache else None
        self.cache: dict = {}
        self.calls = self.cache_hits = 0
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.cache[rec["key"]] = rec["content"]
                except (json.JSONDecodeError, KeyError):
                    continue   # a torn last line from an interrupted run

    def key(self, messages) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def complete(self, messages: list[dict]) -> str:
        k = self.key(messages)
        if k in self.cache:
            self.cache_hits += 1
            return self.cache[k]
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens, "n": 1}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = content = None
        for attempt in range(self.retries + 1):
            try:
                self.calls += 1
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                content = data["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise ValueError("message content is not a string")
                break
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = e
                if isinstance(e, urllib.error.HTTPError) and e.code in (400, 401, 403, 404):
                    break   # will not get better by retrying
                if attempt < self.retries:
                    time.sleep(self.retry_sleep * (2 ** attempt))
        else:
            content = None
        if content is None:
            raise JudgeError(f"judge endpoint {self.url} failed: {type(last).__name__}: {last}")
        self.cache[k] = content
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": k, "model": self.model, "content": content}, ensure_ascii=False) + "\n")
        return content


# ---------------------------------------------------------------- answer generation
def generate_answers(lm, questions: list[Question], bench: str, strategy: str = "default",
                     max_new_tokens: int = 1024, seed: int = 0, progress: bool = True) -> list[list[str]]:
    """Two-turn answers with the model's chat template; turn 2 is conditioned on turn 1's answer.
    A conversation longer than the context keeps its last tokens, leaving at least a quarter of
    the context (up to max_new_tokens) for the answer."""
    limit = lm.model.config.max_seq_len
    prefix = LOGICKOR_STRATEGIES[strategy] if bench == "logickor" else []
    stops = LOGICKOR_STOP if bench == "logickor" else ()
    answers = [[] for _ in questions]
    with Progress(sum(len(q.turns) for q in questions), f"{bench} answers", progress) as bar:
        for t in range(max(len(q.turns) for q in questions)):
            todo = [i for i, q in enumerate(questions) if len(q.turns) > t]
            chats, params = [], []
            for i in todo:
                q = questions[i]
                msgs = list(prefix)
                for k in range(t):
                    msgs += [{"role": "user", "content": q.turns[k]}, {"role": "assistant", "content": answers[i][k]}]
                chats.append(msgs + [{"role": "user", "content": q.turns[t]}])
                temp = MT_BENCH_TEMPERATURE.get(q.category, 0.7) if bench != "logickor" else 0.0
                params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=temp,
                                             seed=seed if temp > 0 else None, stop_strings=stops))
            texts = generate_text(lm.model, lm.tokenizer, chats, params, min_room=limit // 4,
                                  batch_size=lm.batch_size, on_done=bar.update)
            for i, text in zip(todo, texts):
                answers[i].append(text.strip())
    return answers


# ---------------------------------------------------------------- grading
def is_korean(text: str) -> bool:
    """Hangul outweighs Latin outside code blocks, a syllable counting as two letters (a stand-in for
    KoMT-Bench's MediaPipe language detector)."""
    text = re.sub(r"```.*?```", "", text or "", flags=re.S)
    hangul = sum(1 for ch in text if "\uac00" <= ch <= "\ud7a3" or "\u3131" <= ch <= "\u318e")
    latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return hangul > 0 and 2 * hangul >= latin


def judge_mt_bench(judge: JudgeClient, questions, answers, prompts=None, references=None, korean=False,
                   model_id="model", progress=True) -> list[dict]:
    """FastChat single-answer grading of both turns; returns its model_judgment records."""
    prompts = prompts or MT_BENCH_PROMPTS
    references = references or {}
    out = []
    with Progress(sum(min(len(q.turns), 2) for q in questions), "judging", progress) as bar:
        for q, ans in zip(questions, answers):
            ref = references.get(q.id) or q.references or []
            use_ref = q.category in NEED_REF_CATS and bool(ref)
            for turn in (1, 2)[:min(len(q.turns), 2)]:
                multi = turn == 2
                name = ("single-math-v1" if use_ref else "single-v1") + ("-multi-turn" if multi else "")
                p = prompts[name]
                kw = {}
                if use_ref:
                    kw["ref_answer_1"] = ref[0]
                    if multi:
                        kw["ref_answer_2"] = ref[1] if len(ref) > 1 else ""
                if multi:
                    user = p["prompt_template"].format(question_1=q.turns[0], question_2=q.turns[1],
                                                       answer_1=ans[0], answer_2=ans[1], **kw)
                else:
                    user = p["prompt_template"].format(question=q.turns[0], answer=ans[0], **kw)
                msgs = [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]
                judgment = judge.complete(msgs)
                score = parse_mt_bench_score(judgment)
                rec = {"question_id": q.id, "model": model_id, "judge": [judge.model, name], "user_prompt": user,
                       "judgment": judgment, "score": score if score is not None else -1, "turn": turn,
                       "tstamp": time.time(), "parsed": score is not None, "category": q.category}
                if korean and score is not None and q.id not in KOMT_EXEMPT and not is_korean(ans[turn - 1]):
                    rec["raw_score"], rec["score"], rec["language_penalty"] = score, math.sqrt(score), True
                out.append(rec)
                bar.update(1)
    return out


def judge_logickor(judge: JudgeClient, questions, answers, progress=True) -> list[dict]:
    """LogicKor grading: a single-turn and a multi-turn judgment per question (its evaluated/ records)."""
    out = []
    with Progress(2 * len(questions), "judging", progress) as bar:
        for q, ans in zip(questions, answers):
            row = {"id": q.id, "category": q.category, "questions": q.turns, "outputs": ans,
                   "references": q.references or [None, None]}
            for multi in (False, True):
                if multi and len(q.turns) < 2:
                    continue
                refs = q.references or []
                user = ("아래의 내용을 주어진 평가 기준들을 충실히 반영하여 평가해라. 특히 모델 답변이 언어 요구사항을 준수하는지 반드시 확인해야 한다.\n\n"
                        f"**Question**\n{q.turns[0]}")
                if refs and refs[0]:
                    user += f"\n\n**Additional Reference**\n{refs[0]}"
                user += f"\n\n**Model's Response**\n{ans[0]}"
                if multi:
                    user += f"\n\n**Follow-up Question.**\n{q.turns[1]}"
                    if len(refs) > 1 and refs[1]:
                        user += f"\n\n**Additional Reference**\n{refs[1]}"
                    user += f"\n\n**Model's Response**\n{ans[1]}"
                user += "\n\n[[대화 종료. 평가 시작.]]"
                msgs = [{"role": "system", "content": LOGICKOR_JUDGE["multi_turn" if multi else "single_turn"]},
                        {"role": "user", "content": user}]
                judgment = judge.complete(msgs)
                score = parse_logickor_score(judgment)
                m = re.search(r"평가:(.*?)점수:", judgment.replace("*", ""), re.DOTALL)
                row["query_multi" if multi else "query_single"] = {
                    "judge_message": m.group(1).strip() if m else judgment, "judge_score": score,
                    "parsed": score is not None}
                bar.update(1)
            out.append(row)
    return out


# ---------------------------------------------------------------- aggregation
def mean_ci(xs: list[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean with 95% intervals: normal approximation and a seeded percentile bootstrap."""
    n = len(xs)
    if n == 0:
        return {"mean": None, "n": 0, "ci95_normal": None, "ci95_bootstrap": None}
    mu = sum(xs) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    rnd = random.Random(seed)
    boots = sorted(sum(rnd.choice(xs) for _ in range(n)) / n for _ in range(n_boot))
    lo, hi = boots[int(0.025 * n_boot)], boots[min(int(0.975 * n_boot), n_boot - 1)]
    return {"mean": mu, "n": n, "ci95_normal": [mu - half, mu + half], "ci95_bootstrap": [lo, hi]}


def summarize_mt_bench(records: list[dict]) -> dict:
    parsed = [r for r in records if r.get("parsed")]
    unparsed = [r for r in records if not r.get("parsed")]
    out = {"overall": mean_ci([r["score"] for r in parsed]), "unparseable": len(unparsed),
           "unparseable_ids": [[r["question_id"], r["turn"]] for r in unparsed], "judged": len(records),
           "mean_unparseable_as_zero": (sum(r["score"] for r in parsed) / len(records)) if records else None,
           "per_turn": {}, "per_category": {},
           "language_penalties": sum(1 for r in records if r.get("language_penalty"))}
    for t in sorted({r["turn"] for r in records}):
        out["per_turn"][str(t)] = mean_ci([r["score"] for r in parsed if r["turn"] == t])
    for c in sorted({r.get("category", "") for r in records}):
        out["per_category"][c] = mean_ci([r["score"] for r in parsed if r.get("category", "") == c])
    return out


def summarize_logickor(rows: list[dict]) -> dict:
    def scores(key, cat=None):
        return [r[key]["judge_score"] for r in rows if key in r and r[key]["parsed"]
                and (cat is None or r["category"] == cat)]
    unparsed = [[r["id"], k] for r in rows for k in ("query_single", "query_multi") if k in r and not r[k]["parsed"]]
    single, multi = mean_ci(scores("query_single")), mean_ci(scores("query_multi"))
    per_cat = {}
    for c in sorted({r["category"] for r in rows}):
        s, m = mean_ci(scores("query_single", c)), mean_ci(scores("query_multi", c))
        per_cat[c] = {"single_turn": s["mean"], "multi_turn": m["mean"]}
    overall = None if single["mean"] is None or multi["mean"] is None else (single["mean"] + multi["mean"]) / 2
    return {"overall": overall, "single_turn": single, "multi_turn": multi, "per_category": per_cat,
            "unparseable": len(unparsed), "unparseable_ids": unparsed,
            "judged": sum(1 for r in rows for k in ("query_single", "query_multi") if k in r)}


def write_jsonl(path: Path, rows):
    """Write rows as JSON lines through a temporary file, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def run_judge_benchmark(lm, questions_path, bench: str, judge: JudgeClient, out_dir, strategy: str = "default",
                        answers_path=None, judge_prompts_path=None, references_path=None,
                        max_new_tokens: int = 1024, limit: int | None = None, model_id: str | None = None,
                        progress: bool = True) -> dict:
    """Generate (or read) answers, grade them, write native files and summary.json; returns the summary."""
    bench = bench.lower()
    if bench not in ("mt-bench", "komt-bench", "logickor"):
        raise JudgeError(f"unknown judge benchmark {bench!r} (mt-bench, komt-bench, logickor)")
    if bench == "logickor" and strategy not in LOGICKOR_STRATEGIES:
        raise JudgeError(f"unknown LogicKor strategy {strategy!r} ({', '.join(LOGICKOR_STRATEGIES)})")
    fmt, questions = read_questions(questions_path)
    if (fmt == "logickor") != (bench == "logickor"):
        raise JudgeError(f"{questions_path}: a {fmt} question file, but the benchmark is {bench}")
    questions = questions[:limit] if limit else questions
    out_dir = Path(out_dir)
    model_id = model_id or (Path(str(lm.name)).name if lm is not None else "model")
    if answers_path:
        answers = _read_answers(answers_path, questions, fmt)
    else:
        if lm is None:
            raise JudgeError("need a model to generate answers, or --answers with existing ones")
        answers = generate_answers(lm, questions, bench, strategy, max_new_tokens, progress=progress)
    t0 = time.time()
    calls0, hits0 = judge.calls, judge.cache_hits
    if fmt == "logickor":
        write_jsonl(out_dir / "generated" / model_id / f"{strategy}.jsonl",
                     [{"id": q.id, "category": q.category, "questions": q.turns, "outputs": a,
                       "references": q.references or [None, None]} for q, a in zip(questions, answers)])
        rows = judge_logickor(judge, questions, answers, progress=progress)
        write_jsonl(out_dir / "evaluated" / model_id / f"{strategy}.jsonl", rows)
        summary = summarize_logickor(rows)
        summary["strategy"] = strategy
    else:
        write_jsonl(out_dir / "model_answer" / f"{model_id}.jsonl",
                     [{"question_id": q.id, "answer_id": hashlib.sha256(f"{model_id}{q.id}".encode()).hexdigest()[:22],
                       "model_id": model_id, "choices": [{"index": 0, "turns": a}], "tstamp": time.time()}
                      for q, a in zip(questions, answers)])
        prompts = read_judge_prompts(judge_prompts_path) if judge_prompts_path else MT_BENCH_PROMPTS
        refs = read_reference_answers(references_path) if references_path else {}
        recs = judge_mt_bench(judge, questions, answers, prompts, refs, korean=bench == "komt-bench",
                              model_id=model_id, progress=progress)
        write_jsonl(out_dir / "model_judgment" / f"{judge.model.replace('/', '_')}_single.jsonl", recs)
        summary = summarize_mt_bench(recs)
        summary["judge_prompts"] = str(judge_prompts_path) if judge_prompts_path else "FastChat single-v1 (built in)"
    summary.update({"benchmark": bench, "model": model_id, "judge_model": judge.model, "judge_url": judge.url,
                    "questions": len(questions), "judge_calls": judge.calls - calls0,
                    "judge_cache_hits": judge.cache_hits - hits0, "seconds": round(time.time() - t0, 3),
                    "chat_template_sha256": hashlib.sha256(lm.tokenizer.chat_template.encode()).hexdigest()
                    if lm is not None and lm.tokenizer.chat_template else None})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _read_answers(path, questions, fmt) -> list[list[str]]:
    by_id = {}
    for r in read_records(path):
        if "choices" in r:
            by_id[r.get("question_id")] = list(r["choices"][0]["turns"])
        elif "outputs" in r:
            by_id[r.get("id")] = list(r["outputs"])
    missing = [q.id for q in questions if q.id not in by_id]
    if missing:
        raise JudgeError(f"{path}: no answers for question(s) {missing[:5]}")
    return [by_id[q.id] for q in questions]


def format_summary(s: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.2f}"
    lines = [f"{s['benchmark']}  model={s['model']}  judge={s['judge_model']}  "
             f"calls={s['judge_calls']} cached={s['judge_cache_hits']}"]
    if s["benchmark"] == "logickor":
        lines.append(f"{'category':<24} {'single':>7} {'multi':>7}")
        for c, v in s["per_category"].items():
            lines.append(f"{c:<24} {f(v['single_turn']):>7} {f(v['multi_turn']):>7}")
        st, mt = s["single_turn"], s["multi_turn"]
        lines.append(f"{'single-turn':<24} {f(st['mean']):>7}  95% CI {st['ci95_bootstrap']}")
        lines.append(f"{'multi-turn':<24} {f(mt['mean']):>7}  95% CI {mt['ci95_bootstrap']}")
        lines.append(f"{'overall':<24} {f(s['overall']):>7}   strategy={s['strategy']}")
    else:
        lines.append(f"{'category':<24} {'mean':>7} {'n':>4}")
        for c, v in s["per_category"].items():
            lines.append(f"{c:<24} {f(v['mean']):>7} {v['n']:>4}")
        for t, v in s["per_turn"].items():
            lines.append(f"{'turn ' + t:<24} {f(v['mean']):>7} {v['n']:>4}")
        o = s["overall"]
        ci = o["ci95_bootstrap"]
        lines.append(f"{'overall':<24} {f(o['mean']):>7} {o['n']:>4}  95% CI "
                     + ("n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"))
    lines.append(f"unparseable judgments: {s['unparseable']} of {s['judged']}")
    return "\n".join(lines)
