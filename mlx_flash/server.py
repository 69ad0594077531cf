"""An OpenAI-compatible HTTP server for one model, dense or flash.

    python -m mlx_flash.server --model models/smollm2-135m --mode flash --dram-budget 0.6
    curl localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions, POST /v1/completions
(streaming as server-sent events, or one JSON reply). Each reply, and the last chunk of a
stream, carries an extra "flash" object with the decode statistics (tokens/s, ms/token,
bytes read per token, ...) that OpenAI clients ignore.

One model generates one request at a time: requests wait in arrival order (FIFO), and a
client that disconnects stops its generation. Errors a client causes get an OpenAI-style
error object and a 4xx status; the server stays up. Bodies larger than --max-body get 413
as soon as that is known (from Content-Length, before reading; or while reading a chunked
body); JSON nested deeper than MAX_JSON_DEPTH gets 400.

Request handling is a chain of small functions, testable without HTTP:
parse_body -> parse_request -> Engine.encode -> Engine.generate -> chunk / response.
"""

import argparse
import json
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, List, Optional
from urllib.parse import urlsplit

import mlx.core as mx

from . import pipeline
from .conversation import Conversation
from .errors import FlashError, cli
from .generate import (Response, StopFilter, add_model_arguments, check_context, flash_options, flash_snapshot,
                       stream)
from .load import load
from .prepare import model_for
from .sizes import parse_size

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512  # when a request gives no max_tokens
DEFAULT_MAX_PROMPT_TOKENS = 8192
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 (--max-body)
MAX_JSON_DEPTH = 64  # deeper bodies get 400: a chat request nests 4-5 levels, a tool's JSON schema a dozen
LINGER_S = 5.0  # after refusing a body, how long its remaining bytes are read away (see Handler.finish)
SOCKET_TIMEOUT_S = 120  # a client that sends nothing (or reads nothing) for this long is dropped
HISTORY = 1000  # finished requests kept in Engine.history
ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT, TEXT = "chat", "text"  # the two kinds of completion


# MARK: - Requests


class RequestError(FlashError):
    """A bad request: an OpenAI-style error object with an HTTP status."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, param=None, code=None, type="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class GenRequest:
    """A validated completion request."""

    kind: str  # CHAT or TEXT
    messages: Optional[List[dict]] = None  # CHAT: [{"role", "content"}]
    prompt: Optional[str] = None  # TEXT
    max_tokens: Optional[int] = None  # None: DEFAULT_MAX_TOKENS, or what the reserved context leaves
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False


def json_depth(obj, limit: int) -> int:
    """Nesting depth of decoded JSON (a scalar: 0, `[]`: 1, `[[1]]`: 2), level by level without
    recursion; counting stops past `limit`."""
    depth, level = 0, [obj]
    while depth <= limit:
        level = [o for o in level if isinstance(o, (dict, list))]
        if not level:
            break
        depth += 1
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o)]
    return depth


def parse_body(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    too_deep = RequestError(f"the request body nests JSON deeper than {max_depth} levels", code="invalid_json")
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json")
    except RecursionError:  # json's decoder recurses: far too deep
        raise too_deep
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    if json_depth(obj, max_depth) > max_depth:
        raise too_deep
    return obj


def _invalid(name: str, what: str, value) -> RequestError:
    return RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name, code="invalid_value")


def _int(obj: dict, name: str, default, minimum: int):
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _invalid(name, f"an integer of at least {minimum}", v)
    return v


def _number(obj: dict, name: str, default: float, ok: Callable[[float], bool], what: str) -> float:
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
        raise _invalid(name, what, v)
    return float(v)


def _content(v, i: int) -> str:
    """A message's content: a string, or a list of text parts (as newer clients send)."""
    if v is None or isinstance(v, str):
        return v or ""
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in v):
        return "".join(p["text"] for p in v)
    raise _invalid(f"messages[{i}].content", "a string or a list of text parts", v)


def _messages(v) -> List[dict]:
    if not isinstance(v, list) or not v:
        raise _invalid("messages", "a non-empty list of {role, content} objects", v)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _invalid(f"messages[{i}]", "a {role, content} object", m)
        if m["role"] not in ROLES:
            raise _invalid(f"messages[{i}].role", f"one of {', '.join(ROLES)}", m["role"])
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def parse_request(obj: dict, kind: str, model_names=()) -> GenRequest:
    """Validate a decoded chat (CHAT) or completion (TEXT) request body.

    model_names: what "model" may say, the served id first (empty: anything).
    """
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model", "a string", model)
    if model is not None and model_names and model not in model_names:
        raise RequestError(f"the model '{model}' does not exist; this server has '{model_names[0]}'",
                           param="model", code="model_not_found", status=404)
    req = GenRequest(kind)
    if kind == CHAT:
        if "messages" not in obj:
            raise RequestError("'messages' is required", param="messages", code="missing_required_parameter")
        req.messages = _messages(obj["messages"])
    else:
        prompt = obj.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _invalid("prompt", "a string", prompt)
        req.prompt = prompt
    name = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    req.max_tokens = _int(obj, name, None, 1)
    req.temperature = _number(obj, "temperature", req.temperature, lambda t: t >= 0, "a number of at least 0")
    req.top_p = _number(obj, "top_p", req.top_p, lambda p: 0 < p <= 1, "a number in (0, 1]")
    req.seed = _int(obj, "seed", None, -(2**63))
    if req.seed is not None:
        req.seed %= 2**64  # MLX seeds are unsigned
    stop = obj.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _invalid("stop", "a string or a list of strings", stop)
    req.stop = [s for s in stop or [] if s]
    if not isinstance(obj.get("stream", False), bool):
        raise _invalid("stream", "true or false", obj["stream"])
    req.stream = obj.get("stream", False)
    if obj.get("n", 1) != 1:
        raise _invalid("n", "1 (one choice per request)", obj["n"])
    return req


# MARK: - Generation


class FifoLock:
    """A lock granted in the order it was asked for (threading.Lock makes no such promise)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0  # next ticket to hand out
        self._serving = 0  # ticket that holds the lock

    def acquire(self) -> int:
        """Wait for this caller's turn; returns its ticket (0, 1, 2, ... in arrival order)."""
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)
            return ticket

    def release(self):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


@dataclass
class Step:
    """One generated token as the client sees it: text may be empty; finish is set on the last."""

    text: str
    finish: Optional[str]  # None, "stop" or "length"
    response: Response  # mlx-flash's statistics so far
    ticket: int


@dataclass
class Record:
    """What the server did for one request (Engine.history)."""

    ticket: int
    kind: str
    prompt_tokens: int
    completion_tokens: int = 0
    finish: Optional[str] = None  # None: aborted (client gone) or failed
    started: float = 0.0  # time.monotonic()
    ended: float = 0.0
    tokens_per_second: float = 0.0
    cached_tokens: int = 0  # prompt tokens the kept conversation cache held
    ttft: float = 0.0  # seconds to the first token


class Engine:
    """One model and tokenizer; generates one request at a time, in arrival order."""

    def __init__(self, model, tokenizer, model_id: str, mode: str = "dense",
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, aliases=(), log=None, keep_cache: bool = True,
                 streamer=stream):
        self.model, self.tokenizer = model, tokenizer
        self.stream = streamer  # generate.stream, or rank 0's of a pipeline (pipeline.Leader.stream)
        # the last conversation's KV cache, reused by the next request's common prefix (conversation.py)
        self.conversation = Conversation(model) if keep_cache else None
        self.model_id, self.mode = model_id, mode
        self.names = (model_id, "default", *aliases)  # what a request's "model" may say
        self.max_prompt_tokens = max_prompt_tokens
        self.created = int(time.time())
        self.queue = FifoLock()
        self.served = 0  # requests that ran to a finish reason
        self.aborted = 0  # requests stopped early (client gone) or failed
        self.history = deque(maxlen=HISTORY)
        self.log = log  # callable(str) or None

    def encode(self, req: GenRequest) -> List[int]:
        """The prompt's token ids (chat template applied for CHAT), checked against the limit."""
        tok = self.tokenizer
        if req.kind == CHAT:
            if not getattr(tok, "chat_template", None):
                raise RequestError("this model has no chat template; use /v1/completions", param="messages")
            try:
                ids = list(tok.apply_chat_template(req.messages, add_generation_prompt=True))
            except Exception as e:  # the template itself may reject a conversation (e.g. roles out of order)
                raise RequestError(f"the chat template rejected these messages: {e}", param="messages")
        else:
            bos = getattr(tok, "bos_token", None)
            ids = tok.encode(req.prompt, add_special_tokens=bos is None or not req.prompt.startswith(bos))
        param = "messages" if req.kind == CHAT else "prompt"
        if not ids:
            raise RequestError("the prompt is empty", param=param)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens, more than this server's limit of "
                               f"{self.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if req.max_tokens is None:  # as many as asked by default, within what flash mode's context leaves
            plan = getattr(self.model, "flash_plan", None)
            room = plan.max_kv_size - len(ids) if plan is not None else DEFAULT_MAX_TOKENS
            req.max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
        try:
            check_context(self.model, len(ids), req.max_tokens)
        except FlashError as e:
            raise RequestError(str(e), param=param, code="context_length_exceeded")
        return ids

    def generate(self, req: GenRequest, ids: List[int], cancelled: Callable[[], bool] = lambda: False
                 ) -> Iterator[Step]:
        """Wait for the model, then yield one Step per token; the last has a finish reason.

        The model is held until the generator finishes or is closed (use contextlib.closing),
        so closing it early, or `cancelled()` turning true, stops generation.
        """
        ticket = self.queue.acquire()
        rec = Record(ticket, req.kind, len(ids), started=time.monotonic())
        try:
            if cancelled():
                return
            stop = StopFilter(req.stop)
            # closed here, before the model is released: closing records what the kept cache holds
            with closing(self.stream(self.model, self.tokenizer, ids, req.max_tokens, req.temperature, req.top_p,
                                     req.seed, conversation=self.conversation)) as responses:
                for r in responses:
                    rec.completion_tokens, rec.tokens_per_second = r.generation_tokens, r.generation_tps
                    rec.cached_tokens, rec.ttft = r.cached_tokens, r.ttft
                    text, hit = stop.feed(r.text)
                    finish = "stop" if hit else r.finish_reason
                    if finish and not hit:
                        text += stop.flush()
                    rec.finish = finish
                    yield Step(text, finish, r, ticket)
                    if finish or cancelled():
                        return
        finally:
            rec.ended = time.monotonic()
            if rec.finish:
                self.served += 1
            else:
                self.aborted += 1
            self.history.append(rec)
            if self.log:
                self.log(f"#{ticket} {req.kind}: {rec.prompt_tokens} prompt tokens ({rec.cached_tokens} cached, first "
                         f"token after {rec.ttft:.2f} s), {rec.completion_tokens} "
                         f"generated, {rec.tokens_per_second:.1f} tokens/s, {rec.finish or 'aborted'}")
            self.queue.release()


# MARK: - A pipeline's rank 0


class Leader:
    """Rank 0 of a pipelined server (mlx_flash.pipeline): `stream` stands in for generate.stream in Engine,
    telling the other ranks each request (its token ids and sampling) and, before each token, whether to
    go on."""

    def __init__(self, model, cfg, link: "pipeline.Link"):
        self.model, self.layers, self.link = model, tuple(cfg.pipeline["layers"]), link

    def stream(self, model, tokenizer, prompt, max_tokens, temp=0.0, top_p=1.0, seed=None, stop=None,
               conversation=None) -> Iterator:
        assert conversation is None, "a pipeline keeps no conversation cache"
        ids = list(prompt)
        pipeline.tell(self.link, ids, max_tokens, temp, top_p, seed)
        t0, detok, eos = time.perf_counter(), tokenizer.detokenizer, set(tokenizer.eos_token_ids)
        stats = getattr(model, "flash_stats", None)
        if stats is not None:
            stats.reset()
        tokens = pipeline.generate_tokens(model, ids, max_tokens, None, pipeline.prefill_chunk(model), self.link,
                                          self.layers, eos, steered=True)
        n, ttft, done = 0, None, False
        try:
            for token, _ in tokens:
                n += 1
                ttft = ttft or time.perf_counter() - t0
                done = token in eos or n == max_tokens
                if token not in eos:
                    detok.add_token(token)
                if done:
                    detok.finalize()
                rate = (n - 1) / (time.perf_counter() - t0 - ttft) if n > 1 else 0.0
                yield Response(detok.last_segment, token, len(ids), len(ids) / ttft, n, rate,
                               mx.get_peak_memory() / 1e9, ("stop" if token in eos else "length") if done else None,
                               flash_snapshot(model), 0, ttft)
                if done:
                    return
        finally:
            if not done:  # the server stopped early: the other ranks wait at the next token's word
                tokens.close()
                self.link.control(0)

    def quit(self):
        pipeline.tell(self.link, [], 0, 0.0, 1.0, None)


# MARK: - Replies


def completion_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: the prompt's tokens the kept KV cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def flash_field(mode: str, r: Response, ticket: int) -> dict:
    """The extra "flash" object: decode speed, bytes read per token, the model's flash statistics."""
    stats = dict(r.flash)
    return {
        **stats,
        "mode": mode,
        "tokens_per_second": r.generation_tps,
        "ms_per_token": 1000.0 / r.generation_tps if r.generation_tps > 0 else None,
        "prompt_tokens_per_second": r.prompt_tps,
        "time_to_first_token_s": r.ttft,
        "bytes_read_per_token": stats.get("bytes_read_per_token", 0),
        "peak_memory_gb": r.peak_memory,
        "request": ticket,  # the request's place in the server's queue (0, 1, 2, ...)
    }


def _header(kind: str, rid: str, created: int, model_id: str, chunk: bool) -> dict:
    obj = {CHAT: "chat.completion", TEXT: "text_completion"}[kind]
    return {"id": rid, "object": obj + (".chunk" if chunk and kind == CHAT else ""), "created": created,
            "model": model_id}


def chunk(kind: str, rid: str, created: int, model_id: str, text: Optional[str] = None,
          finish: Optional[str] = None, role: bool = False) -> dict:
    """One streamed event. Chat: delta with the role (first), the content, or nothing (last)."""
    if kind == CHAT:
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**_header(kind, rid, created, model_id, chunk=True), "choices": [choice]}


def response(kind: str, rid: str, created: int, model_id: str, text: str, finish: str) -> dict:
    """The whole reply of a non-streaming request (usage and flash are added by the caller)."""
    if kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**_header(kind, rid, created, model_id, chunk=False), "choices": [choice]}


def models_list(engine: Engine) -> dict:
    return {"object": "list",
            "data": [{"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "mlx-flash"}]}


def to_json(obj) -> bytes:
    # numpy scalars (from flash statistics) become plain numbers
    return json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)).encode()


# MARK: - HTTP


class FlashServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries the Engine its handlers use."""

    daemon_threads = True

    def __init__(self, address, engine: Engine, max_body: int = MAX_BODY_BYTES, quiet: bool = False):
        super().__init__(address, Handler)
        self.engine, self.max_body, self.quiet = engine, max_body, quiet

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON replies; streams close when done
    server_version = "mlx-flash"
    timeout = SOCKET_TIMEOUT_S
    server: FlashServer

    ROUTES = {
        "/v1/models": {"GET": "models"},
        "/health": {"GET": "health"},
        "/v1/chat/completions": {"POST": "chat_completions"},
        "/v1/completions": {"POST": "completions"},
    }

    def dispatch(self):
        """Route by path and method; turn a RequestError into an OpenAI error reply."""
        path = urlsplit(self.path).path.rstrip("/") or "/"
        methods = self.ROUTES.get(path, {})
        try:
            if not methods:
                raise RequestError(f"Invalid URL ({self.command} {path})", code="unknown_url", status=404)
            if self.command not in methods:
                raise RequestError(f"{self.command} is not allowed on {path} (use {', '.join(methods)})",
                                   code="method_not_allowed", status=405)
            getattr(self, methods[self.command])()
        except RequestError as e:
            allow = {"Allow": ", ".join(methods)} if e.status == 405 else {}
            self.send_json(e.status, error_body(e.message, e.param, e.code), close=True, headers=allow)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away
        except Exception as e:  # a bug: report it, keep serving
            traceback.print_exc()
            self.close_connection = True
            if not getattr(self, "_streaming", False):
                self.send_json(500, error_body(f"internal error: {e}", type="server_error"), close=True)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    # MARK: endpoints

    def models(self):
        self.send_json(200, models_list(self.server.engine))

    def health(self):
        self.send_json(200, {"status": "ok"})

    def chat_completions(self):
        self.complete(CHAT)

    def completions(self):
        self.complete(TEXT)

    def complete(self, kind: str):
        engine = self.server.engine
        req = parse_request(self.read_body(), kind, engine.names)
        ids = engine.encode(req)
        rid, created, model_id = completion_id(kind), int(time.time()), engine.model_id
        with closing(engine.generate(req, ids, cancelled=self.client_gone)) as steps:
            if req.stream:
                self.start_stream()
                if kind == CHAT:
                    self.send_event(chunk(kind, rid, created, model_id, role=True))
            text = []
            for step in steps:
                if req.stream and step.text:
                    self.send_event(chunk(kind, rid, created, model_id, step.text))
                text.append(step.text)
                if step.finish:
                    break
            else:
                return  # stopped early: the client is gone
        r = step.response
        extra = {"usage": usage(len(ids), r.generation_tokens, r.cached_tokens),
                 "flash": flash_field(engine.mode, r, step.ticket)}
        if req.stream:
            self.send_event({**chunk(kind, rid, created, model_id, finish=step.finish), **extra})
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            self.send_json(200, {**response(kind, rid, created, model_id, "".join(text), step.finish), **extra})

    # MARK: plumbing

    def parse_request(self) -> bool:
        self.body_read = False  # per request: whether its body was read to the end
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` (curl sends it for large bodies): refuse a body that is too large
        before the client sends it."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.max_body:
            self.send_json(413, error_body(**too_large(int(length), self.server.max_body)), close=True)
            return False
        return super().handle_expect_100()

    def read_body(self) -> dict:
        """The JSON body: its length from Content-Length (refused before reading when too large) or
        from chunked transfer encoding (refused as soon as the chunks pass the limit)."""
        limit = self.server.max_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self.read_chunked(limit)
        else:
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError("a JSON body with a Content-Length header (or chunked transfer encoding) is "
                                   "required", code="length_required", status=411)
            if not length.strip().isdigit():
                raise RequestError(f"bad Content-Length '{length}'", code="invalid_header")
            n = int(length)
            if n > limit:
                raise RequestError(**too_large(n, limit), status=413)
            body = self.rfile.read(n)
            if len(body) < n:
                raise ConnectionAbortedError("the client closed the connection while sending")
        self.body_read = True
        return parse_body(body)

    def read_chunked(self, limit: int) -> bytes:
        """A chunked body (RFC 9112, section 7.1): size lines in hex, data, CRLF; a 0 size ends it."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionAbortedError("the client closed the connection while sending")
            try:
                size = int(line.split(b";")[0].strip(), 16)  # ";..." are chunk extensions
                assert line.endswith(b"\n") and size >= 0
            except (ValueError, AssertionError):
                raise RequestError(f"bad chunk size line {line[:40]!r}", code="invalid_header")
            if size == 0:
                break
            total += size
            if total > limit:
                raise RequestError(**too_large(total, limit, chunked=True), status=413)
            data = self.rfile.read(size + 2)  # the chunk and its CRLF
            if len(data) < size + 2:
                raise ConnectionAbortedError("the client closed the connection while sending")
            parts.append(data[:size])
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailer fields, then a blank line
            pass
        return b"".join(parts)

    def finish(self):
        super().finish()
        # a request refused before its body was read: read the rest away before closing (nginx's
        # lingering close), or the unread bytes make the kernel reset the connection and the
        # client loses the reply it has not read yet
        headers = getattr(self, "headers", None)
        declared = headers is not None and (headers.get("Content-Length", "0") not in ("0", "")
                                            or "chunked" in headers.get("Transfer-Encoding", "").lower())
        if declared and not getattr(self, "body_read", True):
            linger(self.connection)

    def send_json(self, status: int, obj: dict, close: bool = False, headers=None):
        data = to_json(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:  # after an error the rest of the request may still be unread
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self):
        self._streaming = True
        self.close_connection = True  # the end of the stream is the end of the connection
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def send_event(self, obj: dict):
        self.wfile.write(b"data: " + to_json(obj) + b"\n\n")

    def client_gone(self) -> bool:
        """True when the client has closed its end (readable, but nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def too_large(n: int, limit: int, chunked: bool = False) -> dict:
    """The 413 error's fields."""
    size = f"passes {limit} bytes" if chunked else f"has {n} bytes"
    return {"message": f"the request body {size}, more than this server's limit of {limit} bytes (--max-body)",
            "code": "request_too_large"}


def linger(sock: socket.socket, seconds: float = LINGER_S):
    """Half-close, then read and drop what the client still sends, until it closes or `seconds` pass."""
    try:
        sock.shutdown(socket.SHUT_WR)  # the reply is complete: the client reads it, then EOF
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(min(left, 1.0))
            if not sock.recv(1 << 16):
                return
    except OSError:  # timed out, or reset: give up
        pass


def make_server(engine: Engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options) -> FlashServer:
    """Bind (port 0: any free port); call serve_forever() to serve."""
    try:
        return FlashServer((host, port), engine, **options)
    except OSError as e:
        raise FlashError(f"cannot listen on {host}:{port}: {e.strerror or e}")


def model_id(model: str) -> str:
    """The id clients see: a path's folder (or file) name, otherwise the name as given."""
    return Path(model).name if Path(model).exists() else model


# MARK: - Command line


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Serve an mlx-flash model over an OpenAI-compatible HTTP API.")
    add_model_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port; default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="longer prompts are refused (default: %(default)s)")
    p.add_argument("--max-body", type=lambda s: parse_size(s, "--max-body"), default=MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413, e.g. 512K, 4M (default: 1M)")
    p.add_argument("--keep-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the last conversation's KV cache and compute only what a request adds to it "
                        "(default: on; its memory is the context the budget plans)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--pipeline", action="store_true",
                   help="a model split over several machines (mlx_flash.split): rank 0 serves, the other ranks follow "
                        "its requests; start every rank with python -m mlx_flash.launch --ranks N -- server ... "
                        "--pipeline (no kept conversation cache)")
    p.add_argument("--pipeline-timeout", type=float, default=None,
                   help="--pipeline: seconds to wait for another rank within a request (default: 300)")
    return p


def log(line: str):
    print(line, file=sys.stderr, flush=True)


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.mode != "flash" and flash_options(args):
        raise FlashError("--dram-budget, --window, --threads, --recall, --max-kv-size, --prefill-step, --prefetch, "
                         "--prompt-mode and --profile apply to --mode flash only")
    if args.max_prompt_tokens < 1:
        raise FlashError("--max-prompt-tokens must be at least 1")
    if args.max_body < 1:
        raise FlashError("--max-body must be at least 1 byte")
    if not 0 <= args.port <= 65535:
        raise FlashError(f"--port must be in 0..65535, got {args.port}")
    leader = None
    if args.pipeline:  # one rank of several (mlx_flash.pipeline): rank 0 serves, the others follow it
        args.pipeline_timeout = args.pipeline_timeout or pipeline.DEFAULT_TIMEOUT
        link, model, cfg, tokenizer = pipeline.join(args, flash_options(args))
        if link.rank != 0:
            return pipeline.follow(model, cfg, link, tokenizer)
        leader = Leader(model, cfg, link)
    elif args.pipeline_timeout is not None:
        raise FlashError("--pipeline-timeout applies to --pipeline only")
    else:
        model, tokenizer = load(model_for(args.model, args.mode), mode=args.mode, **flash_options(args))
    engine = Engine(model, tokenizer, model_id(args.model), args.mode, args.max_prompt_tokens,
                    aliases=[args.model], log=log, keep_cache=args.keep_cache and leader is None,
                    streamer=leader.stream if leader else stream)
    httpd = make_server(engine, args.host, args.port, max_body=args.max_body, quiet=args.quiet)
    print(f"serving {engine.model_id} on {httpd.url}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        if leader is not None:
            leader.quit()  # the other ranks stop following


if __name__ == "__main__":
    main()
