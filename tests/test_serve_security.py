"""What a web page cannot make the user's browser do to `lmfoundry serve` (reference H: CSRF and DNS
rebinding against local model servers). Each refusal is shown on a live server with raw HTTP, so
the headers are exactly what a browser would send."""
import base64
import http.client
import json
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmfoundry.cli import build_parser  # noqa: E402
from lmfoundry.serve.api import BrowserGuard, create_app  # noqa: E402

from test_serve import KEY, ThreadServer  # noqa: E402

CHAT = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
BEARER = {"Authorization": f"Bearer {KEY}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(demo_dir):
    from lmfoundry.checkpoint import load_model
    from lmfoundry.serve.engine import Engine
    from lmfoundry.tokenizer import load_tokenizer
    model, tok = load_model(demo_dir), load_tokenizer(demo_dir)
    srv = ThreadServer(create_app(Engine(model, tok, max_batch=2), tok, "demo", api_key=KEY,
                                  allowed_hosts=["chat.internal"], cors_origins=["http://localhost:3000"]))
    yield srv
    srv.stop()


def call(srv, method, path, body=None, headers=None):
    """(status, headers, body text) of one request; a 'Host' in headers replaces the real one."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    conn.close()
    return out


def code(text):
    return json.loads(text)["error"]["code"]


def test_dns_rebinding_host_is_refused_on_page_api_and_health(server):
    rebinding = {"Host": f"attacker.example:{server.port}"}
    for method, path, body, extra in (("GET", "/", None, BASIC), ("GET", "/v1/models", None, BEARER),
                                      ("GET", "/health", None, {}), ("POST", "/v1/chat/completions", CHAT,
                                                                     {**BEARER, **JSON})):
        status, _, text = call(server, method, path, body, {**extra, **rebinding})
        assert (status, code(text)) == (403, "host_not_allowed"), path
        assert "--allowed-host attacker.example" in json.loads(text)["error"]["message"]
    for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}",
                 f"chat.internal:{server.port}", "CHAT.internal"):
        assert call(server, "GET", "/v1/models", headers={**BEARER, "Host": host})[0] == 200, host


def test_foreign_origin_is_refused_and_same_origin_passes(server):
    for origin in ("http://attacker.example", "null", f"http://localhost:{server.port + 1}"):
        status, headers, text = call(server, "POST", "/v1/chat/completions", CHAT,
                                     {**BEARER, **JSON, "Origin": origin})
        assert (status, code(text)) == (403, "origin_not_allowed"), origin
        assert "access-control-allow-origin" not in headers
    own = {"Origin": f"http://127.0.0.1:{server.port}"}
    status, headers, _ = call(server, "POST", "/v1/chat/completions", CHAT, {**BEARER, **JSON, **own})
    assert status == 200 and "access-control-allow-origin" not in headers   # same origin needs no CORS


@pytest.mark.parametrize("ctype", [None, "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_bodies_a_form_or_simple_fetch_can_send_are_refused(server, ctype):
    headers = {**BEARER, **({"Content-Type": ctype} if ctype else {})}
    status, _, text = call(server, "POST", "/v1/chat/completions", CHAT, headers)
    assert (status, code(text)) == (415, "unsupported_media_type")
    assert call(server, "POST", "/v1/chat/completions", CHAT, {**BEARER, "Content-Type": "application/json; "
                                                                "charset=utf-8"})[0] == 200


def test_cors_headers_only_for_named_origins(server):
    status, headers, _ = call(server, "GET", "/v1/models", headers=BEARER)
    assert status == 200 and not any(k.startswith("access-control") for k in headers)
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = call(server, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 204 and headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "Authorization" in headers["access-control-allow-headers"]
    status, headers, _ = call(server, "POST", "/v1/chat/completions", CHAT,
                              {**BEARER, **JSON, "Origin": "http://localhost:3000"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, headers, _ = call(server, "OPTIONS", "/v1/chat/completions",
                              headers={**preflight, "Origin": "http://localhost:3001"})
    assert status == 403 and "access-control-allow-origin" not in headers


def test_api_key_guards_page_api_and_metrics(server):
    status, headers, _ = call(server, "GET", "/")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    status, headers, text = call(server, "GET", "/", headers=BASIC)
    assert status == 200 and "<title>lmfoundry chat</title>" in text
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", text)   # nothing external
    wrong = {"Authorization": "Basic " + base64.b64encode(b"anyone:nope").decode()}
    for headers in ({}, wrong, {"Authorization": "Bearer nope"}):
        assert call(server, "GET", "/", headers=headers)[0] == 401
        assert call(server, "GET", "/metrics", headers=headers)[0] == 401
        status, _, text = call(server, "POST", "/v1/chat/completions", CHAT, {**headers, **JSON})
        assert (status, code(text)) == (401, "invalid_api_key")
    assert call(server, "GET", "/v1/models", headers=BASIC)[0] == 200     # the page's login works on the API
    assert call(server, "GET", "/metrics", headers=BEARER)[0] == 200


def test_binds_localhost_unless_told_and_host_names_parse():
    assert build_parser().parse_args(["serve", "m"]).host == "127.0.0.1"
    guard = BrowserGuard(None, host="0.0.0.0", allowed_hosts=["Box.LAN:8000"])
    assert [guard.host_allowed(h) for h in ("192.168.1.5", "::1", "box.lan", "app.localhost", "evil.com", "")] == \
        [True, True, True, True, False, False]
