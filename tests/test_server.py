"""The OpenAI-compatible server: request parsing, the FIFO queue, and the HTTP API end to end.

One server per module runs in a background thread over a tiny random Llama; requests go
through the official `openai` client, or urllib / http.client / raw sockets where the test
needs the raw JSON, a bad request or a disconnect.
"""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from mlx_flash.generate import Response, stream
from mlx_flash.load import load
from mlx_flash.server import (
    CHAT, MAX_BODY_BYTES, MAX_JSON_DEPTH, TEXT, Engine, FifoLock, RequestError, StopFilter, chunk, flash_field,
    json_depth, make_server, parse_body, parse_request, response,
)

REPO = Path(__file__).resolve().parent.parent
MAX_PROMPT_TOKENS = 100  # small, so the too-long prompt test is cheap
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_flash):
    folder = tiny_flash("llama_silu_tied")
    model, tokenizer = load(str(folder))
    engine = Engine(model, tokenizer, folder.name, "dense", MAX_PROMPT_TOKENS)
    httpd = make_server(engine, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)


def post(server, path, body, timeout=30):
    """POST raw JSON; returns (status, decoded body)."""
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sse_events(raw: bytes):
    """The JSON events of a server-sent event stream, and whether it ended with [DONE]."""
    lines = [l[len(b"data: "):] for l in raw.split(b"\n\n") if l.startswith(b"data: ")]
    return [json.loads(l) for l in lines if l != b"[DONE]"], lines[-1] == b"[DONE]"


def reference(server, ids, max_tokens, **kw):
    """What generate.stream gives for these token ids: (text, number of tokens)."""
    eng = server.engine
    steps = list(stream(eng.model, eng.tokenizer, ids, max_tokens, **kw))
    return "".join(r.text for r in steps), len(steps)


# MARK: - Without HTTP


def test_parse_request_defaults_and_fields():
    req = parse_request({"messages": HI}, CHAT, ("m", "default"))
    # max_tokens None: DEFAULT_MAX_TOKENS, or what flash mode's reserved context leaves (Engine.encode)
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.stream) == (None, 1.0, 1.0, None, [],
                                                                                         False)
    req = parse_request({"model": "default", "prompt": "x", "max_completion_tokens": 7, "temperature": 0,
                         "top_p": 0.5, "seed": 3, "stop": "\n", "stream": True}, TEXT, ("m", "default"))
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.stream) == (
        "x", 7, 0.0, 0.5, 3, ["\n"], True)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert parse_request({"messages": parts}, CHAT).messages == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": HI, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": True}, "max_tokens"),
    ({"messages": HI, "temperature": -0.1}, "temperature"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "seed": 1.5}, "seed"),
    ({"messages": HI, "stop": ["a", 1]}, "stop"),
    ({"messages": HI, "stream": "yes"}, "stream"),
    ({"messages": HI, "n": 2}, "n"),
    ({"messages": HI, "model": 3}, "model"),
])
def test_parse_request_rejects(body, param):
    with pytest.raises(RequestError) as e:
        parse_request(body, CHAT, ("m", "default"))
    assert (e.value.status, e.value.param) == (400, param)


def test_parse_body_and_unknown_model():
    for bad in (b"{not json", b"[1, 2]", b"\xff"):
        with pytest.raises(RequestError) as e:
            parse_body(bad)
        assert e.value.status == 400
    with pytest.raises(RequestError) as e:
        parse_request({"model": "gpt-4", "prompt": "x"}, TEXT, ("m", "default"))
    assert (e.value.status, e.value.code) == (404, "model_not_found")


def nested(depth: int) -> bytes:
    """A chat request whose "stop" nests `depth` levels below the top object."""
    return b'{"messages": [], "stop": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_json_depth_limit():
    assert [json_depth(v, 64) for v in (1, [], {"a": [{"b": {}}]}, [[1], 2])] == [0, 1, 4, 2]
    assert parse_body(nested(MAX_JSON_DEPTH))["messages"] == []
    for depth in (MAX_JSON_DEPTH + 1, 100_000):  # the second is past Python's recursion limit
        with pytest.raises(RequestError) as e:
            parse_body(nested(depth))
        assert e.value.status == 400 and f"deeper than {MAX_JSON_DEPTH}" in e.value.message


def test_stop_filter_holds_back_a_possible_stop():
    f = StopFilter(["END"])
    assert f.feed("abc E") == ("abc ", False)  # "E" may start "END"
    assert f.feed("N") == ("", False)
    assert f.feed("Dxyz") == ("", True)
    f = StopFilter(["END", "\n\n"])
    assert f.feed("a\nb") == ("a\nb", False)
    assert f.feed("EN") == ("", False)
    assert f.feed("!") == ("EN!", False)
    assert f.feed("x\n") == ("x", False) and f.flush() == "\n"


def test_fifo_lock_serves_in_arrival_order():
    lock, order = FifoLock(), []
    first = lock.acquire()

    def worker(i):
        assert lock.acquire() == i
        order.append(i)
        lock.release()

    threads = []
    for i in range(1, 6):  # each waits in line before the next arrives
        threads.append(threading.Thread(target=worker, args=(i,)))
        threads[-1].start()
        while lock._next <= i:
            time.sleep(0.001)
    assert first == 0 and order == []
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [1, 2, 3, 4, 5]


def test_reply_shapes():
    c = chunk(CHAT, "id", 1, "m", role=True)
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk(CHAT, "id", 1, "m", "hi")["choices"][0]["delta"] == {"content": "hi"}
    assert chunk(CHAT, "id", 1, "m", finish="stop")["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunk(TEXT, "id", 1, "m", "hi")["choices"][0]["text"] == "hi"
    r = response(CHAT, "id", 1, "m", "hello", "length")
    assert r["object"] == "chat.completion" and r["choices"][0]["message"] == {"role": "assistant",
                                                                             "content": "hello"}
    assert response(TEXT, "id", 1, "m", "hello", "stop")["object"] == "text_completion"


def test_flash_field_merges_model_statistics():
    r = Response("x", 1, 5, 100.0, 3, 0.0, 0.5, None, flash={"bytes_read_per_token": 1e6, "hit_rate": 0.9})
    f = flash_field("flash", r, 7)
    assert f["mode"] == "flash" and f["bytes_read_per_token"] == 1e6 and f["hit_rate"] == 0.9
    assert f["ms_per_token"] is None and f["prompt_tokens_per_second"] == 100.0 and f["request"] == 7
    json.dumps(f, allow_nan=False)


# MARK: - Over HTTP


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.engine.model_id]
    assert server.engine.model_id.startswith("llama_silu_tied")  # the folder's name
    assert models.data[0].owned_by == "mlx-flash"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200


def test_chat_matches_generate(server, client):
    r = client.chat.completions.create(model=server.engine.model_id, messages=HI, max_tokens=8, temperature=0)
    ids = server.engine.tokenizer.apply_chat_template(HI, add_generation_prompt=True)
    text, n = reference(server, ids, 8, temp=0.0)
    msg = r.choices[0].message
    assert isinstance(msg.content, str) and msg.content == text and msg.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == n <= 8
    assert r.usage.total_tokens == len(ids) + n
    assert r.choices[0].finish_reason == ("length" if n == 8 else "stop")


def test_completion_matches_generate(server, client):
    r = client.completions.create(model="default", prompt="hello world", max_tokens=6, temperature=0)
    ids = server.engine.tokenizer.encode("hello world")
    text, n = reference(server, ids, 6, temp=0.0)
    assert isinstance(r.choices[0].text, str) and r.choices[0].text == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)


def test_chat_stream_equals_non_streaming(server, client):
    kw = dict(model="default", messages=HI, max_tokens=12, temperature=0, seed=1)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert len(chunks) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= 12
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_completion_stream_raw_events(server):
    status, raw = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 5, "temperature": 0,
                                                    "stream": True})
    events, done = sse_events(raw)
    assert status == 200 and done
    assert all(e["object"] == "text_completion" for e in events)
    last = events[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] <= 5 and last["flash"]["mode"] == "dense"
    _, whole = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 5, "temperature": 0})
    assert "".join(e["choices"][0]["text"] for e in events) == json.loads(whole)["choices"][0]["text"]


def test_flash_field_in_raw_response(server):
    status, raw = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, "temperature": 0})
    f = json.loads(raw)["flash"]
    assert status == 200
    assert f["mode"] == "dense" and f["bytes_read_per_token"] == 0
    assert f["tokens_per_second"] > 0 and f["ms_per_token"] == pytest.approx(1000 / f["tokens_per_second"])
    assert f["prompt_tokens_per_second"] > 0 and isinstance(f["request"], int)


def test_stop_strings(server, client):
    kw = dict(model="default", prompt="hello", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full.find(stop)
    r = client.completions.create(stop=stop, **kw)
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop, "\x00"], stream=True, **kw))
    assert streamed == full[:cut]


def test_seed_reproducible(server, client):
    kw = dict(model="default", messages=HI, max_tokens=10, temperature=1.0)
    a, b, c = (client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (7, 7, 8))
    assert a == b and a != c


def test_concurrent_clients_are_served_one_at_a_time_in_order(server):
    start, results = threading.Barrier(4), [None] * 4

    def ask(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        start.wait()
        results[i] = c.chat.completions.create(model="default", messages=HI, max_tokens=40, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    assert len({r.choices[0].message.content for r in results}) == 1
    assert all(r.usage.completion_tokens == results[0].usage.completion_tokens > 0 for r in results)
    tickets = sorted(r.flash["request"] for r in results)
    assert tickets == list(range(tickets[0], tickets[0] + 4))
    records = sorted((rec for rec in server.engine.history if rec.ticket in tickets), key=lambda rec: rec.ticket)
    assert [rec.ticket for rec in records] == tickets
    for a, b in zip(records, records[1:]):  # no overlap, in ticket (arrival) order
        assert a.ended <= b.started


def raw_request(server, path, body: dict) -> socket.socket:
    host, port = server.server_address[:2]
    s = socket.create_connection((host, port), timeout=10)
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def wait_for(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("streaming", [True, False])
def test_disconnect_stops_generation(server, client, streaming):
    eng, max_tokens = server.engine, 3000
    aborted = eng.aborted
    s = raw_request(server, "/v1/chat/completions", {"messages": HI, "max_tokens": max_tokens, "temperature": 0,
                                                     "stream": streaming})
    if streaming:
        got = b""
        while got.count(b"data: ") < 2:  # the role chunk and one token
            got += s.recv(4096)
    else:
        wait_for(lambda: eng.queue._serving < eng.queue._next)  # generation has started
    s.close()
    t0 = time.monotonic()
    r = client.chat.completions.create(model="default", messages=HI, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and time.monotonic() - t0 < 5
    assert wait_for(lambda: eng.aborted == aborted + 1)
    rec = next(rec for rec in reversed(eng.history) if rec.finish is None)
    assert rec.completion_tokens < max_tokens // 2


BAD = [  # (method, path, body, status, param)
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"[1]", 400, None),
    ("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": "ten"}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": HI, "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"text": "hi"}]}, 400, "messages[0]"),
    ("POST", "/v1/chat/completions", {"messages": HI, "model": "gpt-4"}, 404, "model"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "hello " * MAX_PROMPT_TOKENS}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("GET", "/v1/nothing", None, 404, None),
    ("POST", "/v1/embeddings", {"input": "x"}, 404, None),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("DELETE", "/v1/models", None, 405, None),
    ("POST", "/v1/chat/completions", nested(MAX_JSON_DEPTH + 1), 400, None),
    ("POST", "/v1/chat/completions", nested(100_000), 400, None),  # was a 500 (RecursionError)
]


@pytest.mark.parametrize("method, path, body, status, param", BAD)
def test_bad_requests(server, client, method, path, body, status, param):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    conn.close()
    assert r.status == status
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]
    assert client.models.list().data  # still serving


@pytest.mark.parametrize("headers, status", [
    ({"Content-Length": str(2 << 20)}, 413),  # refused before the body is read
    ({}, 411),
    ({"Content-Length": "lots"}, 400),
])
def test_bad_bodies(server, client, headers, status):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/v1/completions")
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == status and json.loads(r.read())["error"]["type"] == "invalid_request_error"
    conn.close()
    assert client.models.list().data


def send_raw(server, head: bytes, body: bytes = b"") -> tuple:
    """Send raw bytes (another thread sends the body, as a client that does not wait would);
    returns (status, JSON reply) read after the server's reply."""
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    sock.sendall(head)
    sender = threading.Thread(target=lambda: sock.sendall(body), daemon=True) if body else None
    if sender:
        sender.start()
    r = http.client.HTTPResponse(sock)
    r.begin()
    reply = json.loads(r.read())
    if sender:
        sender.join(30)
    sock.close()
    return r.status, reply


def test_large_body_gets_413_not_a_reset(server, client):
    """10 MB sent in full by a client that reads the reply only afterwards (http.client): the
    server refuses it from Content-Length and reads the rest away, so the 413 arrives."""
    host, port = server.server_address[:2]
    body = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    conn.close()
    assert r.status == 413 and err["code"] == "request_too_large" and f"{MAX_BODY_BYTES} bytes" in err["message"]
    assert client.models.list().data


def test_expect_100_continue_refused_before_the_body(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {10 << 20}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()
    status, reply = send_raw(server, head)  # the body is never sent
    assert status == 413 and reply["error"]["code"] == "request_too_large"


def chunked(body: bytes, size: int = 1000) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def test_chunked_bodies(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, reply = send_raw(server, head, chunked(json.dumps({"prompt": "hello", "max_tokens": 2}).encode()))
    assert status == 200 and reply["usage"]["completion_tokens"] <= 2
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    status, reply = send_raw(server, head, chunked(big, 64 << 10))
    assert status == 413 and reply["error"]["code"] == "request_too_large"


def test_max_body_is_configurable(server):
    small = make_server(server.engine, "127.0.0.1", 0, max_body=100, quiet=True)
    threading.Thread(target=small.serve_forever, daemon=True).start()
    try:
        assert post(small, "/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200
        status, raw = post(small, "/v1/completions", {"prompt": "x" * 100, "max_tokens": 1})
        assert status == 413 and "limit of 100 bytes" in json.loads(raw)["error"]["message"]
    finally:
        small.shutdown()
        small.server_close()


def test_prompt_too_long_code(server):
    status, raw = post(server, "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hi " * MAX_PROMPT_TOKENS}]})
    assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"


# MARK: - Command line


def test_cli_serves_and_reports_startup_errors(tiny_flash):
    folder = tiny_flash("llama_silu_tied")
    cmd = [sys.executable, "-m", "mlx_flash.server", "--model", str(folder), "--port", "0", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith(f"serving {folder.name} on http://127.0.0.1:")
        url = line.split(" on ")[1]
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert c.models.list().data[0].id == folder.name
        r = c.completions.create(model=str(folder), prompt="hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(10)
    for args in (["--model", str(folder / "missing")], ["--model", str(folder), "--dram-budget", "1G"],
                 ["--model", str(folder), "--max-body", "lots"]):
        bad = subprocess.run([sys.executable, "-m", "mlx_flash.server", "--port", "0", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
        assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: ")


def test_flash_mode_reports_bytes_read(trained_flash):
    """The server in flash mode: the `flash` field carries what was read from disk per token."""
    folder = trained_flash("opt_pre_ln")
    model, tokenizer = load(str(folder), mode="flash", max_kv_size=64)
    httpd = make_server(Engine(model, tokenizer, folder.name, "flash", MAX_PROMPT_TOKENS), "127.0.0.1", 0,
                        quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        c = openai.OpenAI(base_url=httpd.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=folder.name, messages=HI, max_tokens=6, temperature=0)
        flash = r.model_extra["flash"]
        assert flash["mode"] == "flash" and flash["bytes_read_per_token"] > 0
        assert r.usage.completion_tokens == 6 or r.choices[0].finish_reason == "stop"
        # the context reserved in the budget: 64 tokens; without max_tokens the reply fills what is left
        r = c.completions.create(model=folder.name, prompt="hi " * 30, temperature=0)
        assert r.usage.prompt_tokens + r.usage.completion_tokens <= 64
        status, raw = post(httpd, "/v1/completions", {"prompt": "hi " * 30, "max_tokens": 40})
        err = json.loads(raw)["error"]
        assert status == 400 and err["code"] == "context_length_exceeded" and "64-token context" in err["message"]
    finally:
        httpd.shutdown()
        httpd.server_close()
