"""The OpenAI-compatible server, end to end: a real uvicorn server on a free localhost port
with the demo checkpoint, driven by the official `openai` client. Answers are checked against
lmfoundry.generate / lmfoundry.score run in-process on the same checkpoint."""
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from lmfoundry.checkpoint import load_model  # noqa: E402
from lmfoundry.generate import generate  # noqa: E402
from lmfoundry.score import loglikelihood, token_logprobs  # noqa: E402
from lmfoundry.serve.api import create_app  # noqa: E402
from lmfoundry.serve.engine import Engine  # noqa: E402
from lmfoundry.tokenizer import load_tokenizer  # noqa: E402

KEY = "sk-test"
QUESTIONS = ["How many apples does Tom have?", "What is depth up-scaling?", "Tell me about merging.",
             "언어 모델은 무엇입니까?", "How far does the train go?", "Explain instruction tuning.",
             "What is preference alignment?", "Why stack layers?", "3 + 4 = ?", "Who buys apples?",
             "깊이 확장은?", "A train travels", "Say hello.", "What is a base model?", "Count to five.",
             "What does pretraining do?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn in a background thread (it leaves signal handling to the main thread then)."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)


def start(demo_dir, api_key=KEY, **engine_kw):
    model, tok = load_model(demo_dir), load_tokenizer(demo_dir)
    engine = Engine(model, tok, **engine_kw)
    srv = ThreadServer(create_app(engine, tok, "demo", api_key=api_key))
    url = f"http://127.0.0.1:{srv.port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=30)
    return SimpleNamespace(srv=srv, engine=engine, url=url, port=srv.port, client=client)


@pytest.fixture(scope="module")
def ref(demo_dir):
    """The same checkpoint loaded separately, for in-process reference answers."""
    return SimpleNamespace(model=load_model(demo_dir), tok=load_tokenizer(demo_dir))


@pytest.fixture(scope="module")
def server(demo_dir):
    s = start(demo_dir, max_batch=8, max_queue=32)
    yield s
    s.srv.stop()


def raw(s, method, path, body=None, headers=None, timeout=10):
    """(status, parsed JSON or text) for a hand-made request."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=timeout)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                                   **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def chat_reference(ref, question, max_tokens):
    ids = ref.tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      tokenize=True)
    c = generate(ref.model, [ids], max_new_tokens=max_tokens, temperature=0)[0]
    return ref.tok.decode(c.tokens), c.finish_reason, len(ids), len(c.tokens)


def ask(client, question, **kw):
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}], **kw)


def test_models_health_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert server.client.models.retrieve("demo").id == "demo"
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})
    ask(server.client, "Hi", max_tokens=3, temperature=0)
    status, text = raw(server, "GET", "/metrics")
    assert status == 200
    for name in ("lmfoundry_http_requests_total", "lmfoundry_generation_tokens_total", "lmfoundry_queue_depth",
                 "lmfoundry_batch_occupancy_ratio", "lmfoundry_request_duration_seconds_bucket"):
        assert f"\n{name}{{" in text
    assert 'lmfoundry_http_requests_total{model="demo",endpoint="chat",status="200"}' in text


def test_chat_plain_and_streamed_equal_generate(server, ref):
    q = QUESTIONS[0]
    want_text, want_finish, n_prompt, n_out = chat_reference(ref, q, 40)
    r = ask(server.client, q, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == want_text
    assert r.choices[0].finish_reason == want_finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_out)
    chunks = list(ask(server.client, q, max_tokens=40, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want_finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_out
    # the wire format ends with [DONE]
    body = json.dumps({"messages": [{"role": "user", "content": q}], "max_tokens": 5, "stream": True})
    status, text = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and text.rstrip().endswith("data: [DONE]")


def test_chat_logprobs_are_the_model_distribution(server, ref):
    q = QUESTIONS[1]
    r = ask(server.client, q, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    ids = ref.tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
    out = generate(ref.model, [ids], max_new_tokens=6, temperature=0)[0].tokens
    want = token_logprobs(ref.model, [ids + out], top_k=3)[0]
    got = r.choices[0].logprobs.content
    assert len(got) == len(out)
    n = len(ids) - 1
    torch.testing.assert_close(torch.tensor([e.logprob for e in got]), want["logprobs"][n:], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([[t.logprob for t in e.top_logprobs] for e in got]), want["top"][1][n:],
                               atol=1e-4, rtol=0)
    assert all(e.top_logprobs[0].logprob == e.logprob for e in got)   # greedy picks the top token


def test_completions_echo_logprobs_equal_score(server, ref):
    text = "Tom has 3 apples and buys 4 more."
    ids = ref.tok.encode(text)
    r = server.client.completions.create(model="demo", prompt=text, echo=True, logprobs=3, max_tokens=0,
                                         extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and lp.tokens == [f"token_id:{t}" for t in ids]
    want = token_logprobs(ref.model, [ids], top_k=3)[0]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want["logprobs"].tolist(), abs=1e-6)
    top_ids, top_lps = want["top"]
    for t, top in enumerate(lp.top_logprobs[1:]):   # the top 3 plus the chosen token
        expected = {f"token_id:{i}": v for i, v in zip(top_ids[t].tolist(), top_lps[t].tolist())}
        expected[f"token_id:{ids[t + 1]}"] = want["logprobs"][t].item()
        assert top == pytest.approx(expected, abs=1e-6)
    # token texts by default: colliding texts keep their best logprob, so lm-eval's greedy check holds
    r = server.client.completions.create(model="demo", prompt=text, echo=True, logprobs=2, max_tokens=0)
    greedy = [max(top.values()) == lp for lp, top in zip(r.choices[0].logprobs.token_logprobs[1:],
                                                         r.choices[0].logprobs.top_logprobs[1:])]
    assert greedy == want["greedy"].tolist()
    # lm-eval's local-completions: token-id prompts, max_tokens=1, sum over the continuation
    ctx, cont = ref.tok.encode("Tom has 3 apples and buys"), ref.tok.encode(" 4 more.", add_special_tokens=False)
    r = server.client.completions.create(model="demo", prompt=[ctx + cont, ctx], echo=True, logprobs=1,
                                         max_tokens=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    got = sum(r.choices[0].logprobs.token_logprobs[len(ctx):len(ctx) + len(cont)])
    (ll, _), = loglikelihood(ref.model, [(ctx, cont)])
    assert got == pytest.approx(ll, abs=1e-4)
    assert len(r.choices[0].logprobs.token_logprobs) == len(ctx + cont) + 1


def test_n_seed_and_stop_strings(server, ref):
    r = ask(server.client, QUESTIONS[2], max_tokens=12, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    a = ask(server.client, QUESTIONS[2], max_tokens=12, temperature=1.0, n=2, seed=5)
    b = ask(server.client, QUESTIONS[2], max_tokens=12, temperature=1.0, n=2, seed=5)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    ids = ref.tok.apply_chat_template([{"role": "user", "content": QUESTIONS[2]}], add_generation_prompt=True,
                                      tokenize=True)
    for j, choice in enumerate(a.choices):   # choice j samples with seed + j, as generate() would
        c = generate(ref.model, [ids], max_new_tokens=12, temperature=1.0, seed=5 + j)[0]
        assert choice.message.content == ref.tok.decode(c.tokens)
    # stop strings: the text ends right before the first stop string, streamed or not
    full, _, _, _ = chat_reference(ref, QUESTIONS[3], 40)
    stop = next(full[i:i + 2] for i in range(len(full) // 3, len(full)) if "\ufffd" not in full[i:i + 2]
                and full[i:i + 2].strip())
    want = full[:full.index(stop)]
    r = ask(server.client, QUESTIONS[3], max_tokens=40, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = ask(server.client, QUESTIONS[3], max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_16_concurrent_clients_each_get_their_greedy_answer(server, ref):
    def one(i):
        r = ask(server.client, QUESTIONS[i], max_tokens=24 + i, temperature=0, stream=i % 2 == 1)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    assert got == [chat_reference(ref, QUESTIONS[i], 24 + i)[0] for i in range(16)]


def test_errors_have_openai_shape_and_the_server_keeps_serving(server):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        ask(bad_key, "hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    status, body = raw(server, "POST", "/v1/chat/completions", "{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:
        ask(server.client, "hi", max_tokens=10_000)
    assert "maximum context length is 256" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.param == "messages[0].role" and "wizard" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="demo", prompt=[[1, 2, 99999]], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        ask(server.client, "hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        ask(server.client, "hi", logit_bias={"5": 10})
    assert raw(server, "GET", "/nowhere")[0] == 404
    assert ask(server.client, "hi", max_tokens=3, temperature=0).choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_frees_its_row(server):
    engine = server.engine
    aborted = engine.stats.finished["abort"]
    # streamed: read a few events, hang up
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True, "ignore_eos": True}),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(3):
        resp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # not streamed: the engine is held, the client gives up while its request waits
    release = threading.Event()
    engine.call(release.wait, 10)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "ignore_eos": True}),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(socket.timeout):
        conn.getresponse()
    conn.close()
    time.sleep(0.2)
    release.set()
    deadline = time.time() + 10
    while engine.stats.finished["abort"] < aborted + 2 or engine.snapshot()["running"]:
        assert time.time() < deadline, (engine.stats, engine.snapshot())
        time.sleep(0.02)


def test_queue_full_gets_429_then_serving_resumes(demo_dir):
    s = start(demo_dir, api_key=None, max_batch=1, max_queue=1)
    try:
        release = threading.Event()
        s.engine.call(release.wait, 10)            # hold the engine so nothing leaves the queue
        streams = [ask(s.client, "hi", max_tokens=4, temperature=0, stream=True) for _ in range(2)]
        firsts = [next(iter(st)) for st in streams]   # both accepted (role chunk sent)
        with pytest.raises(openai.RateLimitError) as e:
            ask(s.client, "hi", max_tokens=4)
        assert e.value.status_code == 429 and e.value.code == "queue_full"
        release.set()
        for first, st in zip(firsts, streams):
            assert first.choices[0].delta.role == "assistant"
            assert [c.choices[0].finish_reason for c in st][-1] in ("stop", "length")
        assert ask(s.client, "hi", max_tokens=4, temperature=0).choices[0].message.content is not None
        assert s.engine.stats.rejected_queue_full == 1
    finally:
        s.srv.stop()


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(demo_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmfoundry", "serve", str(demo_dir), "--port", str(port),
                             "--max-batch", "2", "--served-model-name", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 40
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, "server did not come up"
                time.sleep(0.1)
        stream = ask(client, "go", max_tokens=150, temperature=0, stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert rest[-1].choices[0].finish_reason == "length"   # the in-flight request was finished
        assert proc.wait(30) == 0
        log = proc.stdout.read()
        assert "context 256 tokens (model: 256); batch 2 rows" in log
        assert "chat status=200 prompt_tokens=" in log and "stopping the engine" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
