"""ComSem against a loopback judge: answers, timeouts, malformed replies, HTTP errors, the cache."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from analyze_helpers import D, tiny_contexts, tiny_subject

from fastattn.analyze.judge import Judge, JudgeError, parse_yes_no

MARK = re.compile(r"«([^»]*)»")


class Server:
    """A local OpenAI-compatible endpoint. ``mode``: "ok" (explains the first marked token and
    says Yes exactly when an excerpt's marked token equals it), "slow" (sleeps ``delay`` s first
    for the next ``bad`` requests), "garbage" (non-JSON), "maybe" (answers "Maybe"), "status"
    (HTTP ``code`` for the next ``bad`` requests)."""

    def __init__(self):
        self.mode, self.bad, self.delay, self.code, self.requests = "ok", 0, 0.0, 500, []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                srv.requests.append((self.path, self.headers.get("Authorization"), body))
                text = srv.answer(body["messages"][-1]["content"])
                if srv.bad > 0 and srv.mode in ("slow", "status"):
                    srv.bad -= 1
                    if srv.mode == "slow":
                        time.sleep(srv.delay)
                    else:
                        self.send_response(srv.code)
                        self.end_headers()
                        return
                if srv.mode == "garbage":
                    payload = b"<html>not json</html>"
                else:
                    payload = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": text}}]}
                    ).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, prompt: str) -> str:
        if self.mode == "maybe":
            return "Maybe, hard to say."
        if "have in common" in prompt:
            return f"the token {MARK.search(prompt.split(chr(10) * 2, 1)[-1]).group(1)}"
        target = re.search(r"responds to: the token (\S+)", prompt).group(1)
        return "Yes." if MARK.search(prompt.split("Excerpt:")[1]).group(1) == target else "No"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_ask_sends_openai_request_and_caches(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    j = Judge(server.url, "judge-1", "secret", cache=cache, backoff=0.01)
    msgs = [{"role": "user", "content": "What do these have in common?\n\n1. «cat»"}]
    assert j.ask(msgs) == "the token cat"
    path, auth, body = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert body["model"] == "judge-1" and body["messages"] == msgs and body["temperature"] == 0
    assert j.ask(msgs) == "the token cat" and j.calls == 1  # in-memory cache
    j2 = Judge(server.url, "judge-1", "secret", cache=cache)
    assert j2.ask(msgs) == "the token cat" and j2.calls == 0  # file cache
    assert (
        Judge(server.url, "judge-2", cache=cache).ask(msgs) and len(server.requests) == 2
    )  # model in the key


def test_timeouts_are_retried_then_reported(server):
    server.mode, server.bad, server.delay = "slow", 1, 1.0
    j = Judge(server.url, "m", timeout=0.3, retries=2, backoff=0.01)
    assert j.ask([{"role": "user", "content": "have in common «x»"}]) == "the token x"
    assert j.calls == 2
    server.bad = 5
    j = Judge(server.url, "m", timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match="timeout"):
        j.ask([{"role": "user", "content": "have in common «y»"}])
    assert j.calls == 2


def test_malformed_and_http_errors(server):
    server.mode = "garbage"
    j = Judge(server.url, "m", retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match="malformed"):
        j.ask([{"role": "user", "content": "have in common «x»"}])
    assert j.calls == 3
    server.mode, server.bad, server.code = "status", 1, 503  # retried
    j = Judge(server.url, "m", retries=2, backoff=0.01)
    assert j.ask([{"role": "user", "content": "have in common «z»"}]) == "the token z" and j.calls == 2
    server.bad, server.code = 1, 401  # not retried
    j = Judge(server.url, "m", retries=3, backoff=0.01)
    with pytest.raises(JudgeError, match="HTTP 401"):
        j.ask([{"role": "user", "content": "have in common «w»"}])
    assert j.calls == 1
    with pytest.raises(JudgeError, match="connection error"):
        Judge("http://127.0.0.1:9", "m", retries=0, timeout=2).ask([{"role": "user", "content": "x"}])


def test_parse_yes_no_and_config_errors(monkeypatch):
    assert parse_yes_no("Yes.") is True and parse_yes_no("**No**, because") is False
    assert parse_yes_no("Maybe") is None and parse_yes_no("") is None and parse_yes_no("yesterday") is None
    monkeypatch.delenv("FASTATTN_JUDGE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="FASTATTN_JUDGE_BASE_URL"):
        Judge.from_env()
    with pytest.raises(ValueError, match="http"):
        Judge("localhost:8000", "m")
    monkeypatch.setenv("FASTATTN_JUDGE_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("FASTATTN_JUDGE_MODEL", "m")
    assert Judge.from_env().model == "m"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    pytest.importorskip("transformers")
    from fastattn.analyze.collect import Collection, collect

    root = tmp_path_factory.mktemp("coll")
    collect(tiny_subject(), tiny_contexts(600, 16), root, [1], "all", progress=False)
    return Collection(root)


def test_comsem_scores(server, collection, tmp_path):
    from fastattn.analyze.comsem import comsem, render, top_examples
    from fastattn.sae.modules import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(D, 16, 2)
    ex = top_examples(collection, 1, sae, [0, 3], per_feature=6, negatives=4)
    assert all(len(ex[f]["top"]) == 6 for f in (0, 3))
    assert all(a[0] >= b[0] for f in (0, 3) for a, b in zip(ex[f]["top"], ex[f]["top"][1:]))
    vocab, tokens = collection.vocab(), collection.contexts()["tokens"]
    s = render(vocab, tokens, 0, 5, before=2, after=1)
    assert s.count("«") == 1 and f"«{vocab[int(tokens[0, 5])]}»" in s
    judge = Judge(server.url, "m", backoff=0.01, cache=tmp_path / "c.jsonl")
    res = comsem(collection, 1, sae, [0, 3], judge, examples=3, negatives=4, progress=False)
    assert res["features"] == 2 and res["errors"] == 0 and res["scored"] == 2
    for r in res["results"]:
        # The loopback judge says Yes exactly when the held-out token equals the first shown one.
        first = MARK.search(r["shown"][0]).group(1)
        expect = [MARK.search(h).group(1) == first for h in r["heldout"]]
        assert r["answers_heldout"] == expect
        assert r["score"] == sum(expect) / len(expect)
    calls = judge.calls
    comsem(collection, 1, sae, [0, 3], judge, examples=3, negatives=4, progress=False)
    assert judge.calls == calls  # everything cached
    server.mode = "maybe"
    res = comsem(collection, 1, sae, [5], Judge(server.url, "m2"), examples=2, negatives=2, progress=False)
    assert res["results"][0]["invalid"] == 4 and res["results"][0]["score"] is None and res["scored"] == 0
    server.mode = "garbage"
    res = comsem(collection, 1, sae, [5, 6], Judge(server.url, "m3", retries=0), examples=2, progress=False)
    assert res["errors"] == 2 and all("malformed" in r["error"] for r in res["results"])
