"""A loopback Anthropic Messages API server for tests: a real HTTP socket, standard library only.

The official ``anthropic`` SDK (2.x) talks through its own HTTP stack (``httpx2``),
so mocking a transport would miss it; this server listens on ``127.0.0.1`` on a
free port instead, and the real SDK talks to it::

    with AnthropicServer(faults=[Fault.status(429, retry_after=0.05)]) as server:
        client = anthropic.AsyncAnthropic(base_url=server.base_url, api_key="sk-ant-test-x",
                                          max_retries=0)
        ...
        assert server.count("fault:429") == 1

What it speaks
--------------
``POST /v1/messages`` (non-streaming), tool use included. A request without a
fault is checked like the real API would, roughly: unknown path → 404
``not_found_error``; no ``x-api-key`` / ``authorization`` header → 401
``authentication_error``; no ``anthropic-version`` header, a body that is not a
JSON object, no ``model`` / ``max_tokens`` / non-empty ``messages``, or
``"stream": true`` → 400 ``invalid_request_error``. Otherwise the *responder*
is called with the parsed request body and returns the message object (a dict).
A responder that raises (or returns something that is not JSON) yields 500
``api_error`` (outcome ``"error:responder"``, the exception text in
``Recorded.error``). Each connection has its own thread, but the responder is
called under a lock, one request at a time, so it may keep state.

``latency`` (seconds, default 0): every request waits that long, in its
connection's own thread and outside the responder lock, before anything is
sent back: the normal reply, an error (checks or faults), a malformed body,
or the closed connection of a drop; a slow fault waits its own seconds on top.
Concurrent requests therefore overlap, like on the real API (N concurrent
requests take about ``latency``, not N times it). The wait happens after the
request is recorded; stopping the server cuts it short (no reply).

``usage``: when the responder's message has no ``usage`` (what :func:`message`
produces unless given one), the server fills it in, estimating about 4
characters per token of the JSON of each tool definition, system block and
message content block (``output_tokens`` likewise from the reply content). It
emulates prompt caching: the prompt is the sequence tools → system → messages
(the real API's order); a block carrying ``cache_control`` is a breakpoint. The
prefix ending at a breakpoint (hashed, with the model) is written to the cache
the first time it is seen and its uncached tokens count as
``cache_creation_input_tokens`` (also split into ``cache_creation``
``ephemeral_5m/1h_input_tokens`` by the breakpoint's ``ttl``); a later request
whose prefix ends at a cached one, at the breakpoint or up to 20 blocks before
it (the API's lookback), counts those tokens as ``cache_read_input_tokens``.
Everything else is ``input_tokens``; without any ``cache_control`` all of the
prompt is ``input_tokens`` and both cache counts are 0. Not emulated: the
minimum cacheable length (1024+ tokens on the real API), cache expiry.

``context_window`` (tokens, default None: no limit): a request that passes the
checks but whose prompt, counted as for ``usage`` (about 4 characters per
token), has more tokens than this gets the real API's answer to an over-long
prompt: 400 ``invalid_request_error`` ``"prompt is too long: 41234 tokens >
40000 maximum"``, outcome ``"error:too-long"``; the responder is not called.

Faults
------
A :class:`Fault` replaces (or delays) the normal reply of one request:

- ``Fault.status(code, error_type=None, retry_after=None, message=...)``: the
  API's JSON error body ``{"type": "error", "error": {"type", "message"}}``
  with a ``request-id`` header and, when given, ``retry-after`` (seconds, as
  text). Outcome ``"fault:<code>"``.
- ``Fault.drop()``: read the request, then close the connection without any
  response. Outcome ``"fault:drop"``.
- ``Fault.slow(seconds)``: wait, then send the normal reply (for client read
  timeouts). Each connection has its own thread, so other requests go on;
  stopping the server cuts the wait short. Outcome ``"fault:slow"``.
- ``Fault.malformed(variant="json")``: status 200 with a broken body. Variants:
  ``"json"`` (``application/json`` that is not valid JSON), ``"html"`` (a
  ``text/html`` page, as from a proxy), ``"shape"`` (valid JSON, not a
  message). Outcome ``"fault:malformed"``, ``"fault:malformed-html"``,
  ``"fault:malformed-shape"``.

What anthropic 2.12.0 makes of them (``max_retries=0``; pinned by
``tests/test_anthropic_server.py``): 400 ``BadRequestError``, 401
``AuthenticationError``, 403 ``PermissionDeniedError``, 404 ``NotFoundError``,
413 ``ContentTooLargeError`` (alias ``RequestTooLargeError``), 422
``UnprocessableEntityError``, 429 ``RateLimitError``, 500
``InternalServerError``, 529 ``OverloadedError`` (a subclass of
``InternalServerError``); drop → ``APIConnectionError``; slow beyond the client
timeout → ``APITimeoutError``. Malformed bodies do NOT become SDK errors:
``"json"`` raises a bare ``json.JSONDecodeError`` (not an ``AnthropicError``);
``"html"`` *returns* the page as a ``str`` instead of a ``Message``; ``"shape"``
returns a ``Message`` built without validation (the SDK validates only with
``_strict_response_validation=True``, then ``APIResponseValidationError``):
missing fields read as None, ``content`` is whatever the JSON held (here a
string), unknown keys land in ``model_extra``.

Which request gets which fault: queued faults (``faults=`` at construction,
then :meth:`AnthropicServer.enqueue_faults`) go to the next requests, one each,
in order. A request with no queued fault draws from ``random.Random(seed)``:
``rng.random() < fault_rate``, and if so ``rng.choice(fault_mix)`` (default mix:
429 with ``retry_after=0.05``, 529, 500, drop). No draw is made when
``fault_rate`` is 0. Faults apply to any path, before the request checks
(a slow fault: after its wait, the checks and reply as usual).

Recording and secrets
---------------------
``server.requests`` lists every HTTP request received, in order, as
:class:`Recorded` (monotonic ``time``, ``method``, ``path``, ``headers`` with
lower-case keys, ``body`` parsed JSON or None, ``outcome``) — recorded before
the reply, so dropped requests are there too. Outcomes: ``"ok"``,
``"fault:..."`` as above, ``"error:<status>"`` for failed checks,
``"error:responder"``. ``server.count(prefix)`` counts outcomes starting with
*prefix*; ``server.requests_for(predicate)`` filters.

The server writes nothing to stdout, stderr or logs, and echoes no header: the
API key lives only in ``requests[i].headers`` (and ``repr(Recorded)`` masks it).
Note that anthropic 2.12.0 sends ``api_key`` as ``authorization: Bearer <key>``,
not ``x-api-key``.
``server.leaks(secret)`` lists every other place in the recorded requests where
*secret* occurs (body, path, other headers), for key-hygiene tests.

Responders
----------
:func:`scripted_responder` (the default) turns a script ``request -> content
blocks | message`` into a responder; with no script it plays a minimal agent
(see its docstring). Build replies with :func:`message`, :func:`text_block`,
:func:`tool_use_block`.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "AnthropicServer",
    "DEFAULT_FAULT_MIX",
    "Fault",
    "Recorded",
    "SUBMITTED",
    "message",
    "scripted_responder",
    "text_block",
    "tool_use_block",
]

STANDARD_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_REASONS = {529: "Overloaded"}
_SECRET_HEADERS = ("x-api-key", "authorization")
_LOOKBACK = 20  # blocks before a breakpoint the API checks for an earlier cache entry

SUBMITTED: dict[str, Any] = {
    "status": "completed",
    "summary": "done by the loopback model",
    "deliverables": [],
    "files_changed": [],
    "metrics": {},
    "follow_ups": [],
}
"""The ``submit_result`` input of the default script."""

MalformedVariant = Literal["json", "html", "shape"]


# -- replies -------------------------------------------------------------------


def text_block(text: str) -> dict[str, Any]:
    """A ``text`` content block."""
    return {"type": "text", "text": text}


def tool_use_block(name: str, input: dict[str, Any], id: str | None = None) -> dict[str, Any]:
    """A ``tool_use`` content block (id ``toolu_...`` unless given)."""
    return {"type": "tool_use", "id": id or f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": input}


def message(
    *content: dict[str, Any],
    stop_reason: str = "end_turn",
    usage: dict[str, Any] | None = None,
    model: str = "claude-test",
) -> dict[str, Any]:
    """A complete Messages API message object (id ``msg_...``).

    Without *usage* the key is left out and the server fills it in from the
    request (token estimate and prompt-cache emulation, see the module docs).
    """
    out: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": list(content),
        "stop_reason": stop_reason,
        "stop_sequence": None,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def _default_script(request: dict[str, Any]) -> list[dict[str, Any]]:
    if (request.get("tool_choice") or {}).get("type") == "none":  # as the API: text only
        return [text_block("summary: the work so far, by the loopback model")]
    tools = {t.get("name") for t in request.get("tools") or [] if isinstance(t, dict)}
    users = [m for m in request.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    after_tool = isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )
    if "submit_result" in tools:
        if not after_tool and "list_dir" in tools:
            return [tool_use_block("list_dir", {"path": "."})]
        return [tool_use_block("submit_result", dict(SUBMITTED))]
    return [text_block("done by the loopback model")]


def scripted_responder(
    script: Callable[[dict[str, Any]], list[dict[str, Any]] | dict[str, Any]] | None = None,
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A responder from a script ``request body -> reply``.

    The script returns a full message (a dict with ``"type": "message"``, sent
    as is), one content block (a dict of another type) or a list of content
    blocks; blocks are wrapped with :func:`message`, echoing the request's
    ``model``, with ``stop_reason`` ``"tool_use"`` when a ``tool_use`` block is
    among them, else ``"end_turn"``.

    Without a script, a minimal agent: when the request offers a tool named
    ``submit_result`` and the last user message holds no ``tool_result``, it
    calls ``list_dir`` ``{"path": "."}`` if that tool is offered, else
    ``submit_result``; after a ``tool_result`` it calls ``submit_result`` with
    :data:`SUBMITTED` (status completed, summary "done by the loopback model").
    Without a ``submit_result`` tool it answers with text.
    """
    play = script or _default_script

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        reply = play(request)
        if isinstance(reply, dict) and reply.get("type") == "message":
            return reply
        blocks = [reply] if isinstance(reply, dict) else list(reply)
        stop = "tool_use" if any(b.get("type") == "tool_use" for b in blocks) else "end_turn"
        return message(*blocks, stop_reason=stop, model=str(request.get("model") or "claude-test"))

    return respond


# -- faults and records ----------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What to do instead of (or before) the normal reply, for one request. Use the constructors."""

    kind: Literal["status", "drop", "slow", "malformed"]
    code: int = 0
    error_type: str | None = None
    retry_after: float | None = None
    message: str = ""
    seconds: float = 0.0
    variant: MalformedVariant = "json"

    @staticmethod
    def status(
        code: int,
        *,
        error_type: str | None = None,
        retry_after: float | None = None,
        message: str = "injected by the loopback server",
    ) -> Fault:
        """An error response: JSON error body, ``request-id`` and (when given) ``retry-after`` headers."""
        return Fault("status", code=code, error_type=error_type, retry_after=retry_after, message=message)

    @staticmethod
    def drop() -> Fault:
        """Read the request, then close the connection without any response."""
        return Fault("drop")

    @staticmethod
    def slow(seconds: float) -> Fault:
        """Wait *seconds*, then send the normal reply."""
        return Fault("slow", seconds=seconds)

    @staticmethod
    def malformed(variant: MalformedVariant = "json") -> Fault:
        """Status 200 with a broken body: ``"json"`` (invalid JSON), ``"html"``, ``"shape"`` (not a message)."""
        if variant not in ("json", "html", "shape"):
            raise ValueError(f"unknown malformed variant {variant!r}")
        return Fault("malformed", variant=variant)

    @property
    def outcome(self) -> str:
        if self.kind == "status":
            return f"fault:{self.code}"
        if self.kind == "malformed" and self.variant != "json":
            return f"fault:malformed-{self.variant}"
        return f"fault:{self.kind}"


DEFAULT_FAULT_MIX: tuple[Fault, ...] = (
    Fault.status(429, retry_after=0.05),
    Fault.status(529),
    Fault.status(500),
    Fault.drop(),
)


@dataclass
class Recorded:
    """One HTTP request the server received."""

    time: float
    """``time.monotonic()`` when the request had been read."""
    method: str
    path: str
    headers: dict[str, str]
    """Lower-case keys."""
    body: Any
    """The parsed JSON body, or None when it was empty or not JSON."""
    outcome: str
    error: str | None = None
    """What went wrong in the responder, for outcome ``"error:responder"``."""

    def __repr__(self) -> str:
        shown = {k: ("***" if k in _SECRET_HEADERS else v) for k, v in self.headers.items()}
        return (f"Recorded(time={self.time!r}, method={self.method!r}, path={self.path!r}, "
                f"headers={shown!r}, body={self.body!r}, outcome={self.outcome!r}, error={self.error!r})")


# -- the server -------------------------------------------------------------------


class _HTTPServer(http.server.ThreadingHTTPServer):
    owner: AnthropicServer

    def process_request(self, request: Any, client_address: Any) -> None:
        # One daemon thread per connection, tracked by the owner so stop() can join it
        # (socketserver itself does not track daemon threads).
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="anthropic-loopback-connection", daemon=True)
        self.owner._track(thread)
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:  # never print tracebacks
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API
    server_version = "anthropic-loopback/1"
    sys_version = ""
    timeout = 30  # an idle keep-alive connection gives up after this (stop() cuts it short)
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK cost ~40 ms a reply
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._unregister(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - never write anything
        pass

    def _dispatch(self) -> None:
        try:
            self.server.owner._handle(self)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True  # the client gave up (e.g. its read timeout)

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _dispatch


class AnthropicServer:
    """A loopback Messages API server; use as a context manager (see the module docs).

    Args:
        responder: ``request body -> message dict`` (default: ``scripted_responder()``).
        faults: Faults for the first requests, one each, in order.
        fault_rate: Probability that a request without a queued fault gets a random one.
        fault_mix: The faults to draw from (default :data:`DEFAULT_FAULT_MIX`).
        seed: Seed of the ``random.Random`` that draws the random faults.
        latency: Seconds every request waits before its reply (or fault); concurrent
            requests wait in parallel (see the module docs).
        context_window: Most prompt tokens a request may have (the server's own estimate);
            a longer one is refused as by the real API (see the module docs). None: no limit.
    """

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        faults: Sequence[Fault] = (),
        fault_rate: float = 0.0,
        fault_mix: Sequence[Fault] | None = None,
        seed: int = 0,
        latency: float = 0.0,
        context_window: int | None = None,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError("fault_rate must be between 0 and 1")
        if not latency >= 0.0:
            raise ValueError("latency must be at least 0 seconds")
        if context_window is not None and context_window < 1:
            raise ValueError("context_window must be at least 1 token")
        mix = tuple(DEFAULT_FAULT_MIX if fault_mix is None else fault_mix)
        if fault_rate > 0 and not mix:
            raise ValueError("fault_rate > 0 needs a non-empty fault_mix")
        self.responder = responder or scripted_responder()
        self.fault_rate = fault_rate
        self.fault_mix = mix
        self.latency = float(latency)
        self.context_window = context_window
        self.requests: list[Recorded] = []
        self.base_url = ""
        self._queue: list[Fault] = list(faults)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._respond_lock = threading.Lock()
        self._cache: set[str] = set()
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0

    # -- lifecycle

    def start(self) -> AnthropicServer:
        if self._httpd is not None:
            raise RuntimeError("the server is already running")
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self.base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="anthropic-loopback", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut open connections and pending waits, join every thread."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()  # the accept loop ends: no new connection threads after this
        with self._lock:
            self._stopping.set()
            open_connections = list(self._connections)
        for conn in open_connections:
            _cut(conn)
        httpd.server_close()
        with self._lock:
            threads, self._threads = self._threads, []
        for t in threads:
            t.join(timeout=10)
        if thread is not None:
            thread.join()
        self._httpd = self._thread = None
        stuck = [t for t in threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"{len(stuck)} loopback connection thread(s) did not stop")

    def __enter__(self) -> AnthropicServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the test-facing API

    def enqueue_faults(self, *faults: Fault) -> None:
        """Apply *faults* to the next requests, one each, in order (before random faults)."""
        with self._lock:
            self._queue.extend(faults)

    def count(self, outcome_prefix: str = "") -> int:
        """How many requests have an outcome starting with *outcome_prefix* (all with ``""``)."""
        return sum(1 for r in list(self.requests) if r.outcome.startswith(outcome_prefix))

    def requests_for(self, predicate: Callable[[Recorded], bool]) -> list[Recorded]:
        return [r for r in list(self.requests) if predicate(r)]

    def leaks(self, secret: str) -> list[str]:
        """Where *secret* occurs in the recorded requests, except the ``x-api-key``/``authorization`` headers."""
        found = []
        for i, r in enumerate(list(self.requests)):
            if secret in r.path:
                found.append(f"request {i}: path")
            found += [f"request {i}: header {k}" for k, v in r.headers.items()
                      if k not in _SECRET_HEADERS and secret in v]
            if r.body is not None and secret in json.dumps(r.body, ensure_ascii=False):
                found.append(f"request {i}: body")
        return found

    # -- internals (called from connection threads)

    def _register(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            stopping = self._stopping.is_set()
        if stopping:
            _cut(conn)

    def _track(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _unregister(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _next_fault(self) -> Fault | None:
        # called with self._lock held
        if self._queue:
            return self._queue.pop(0)
        if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.fault_mix)
        return None

    def _handle(self, h: _Handler) -> None:
        try:
            length = int(h.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        raw = h.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in h.headers.items()}
        path = h.path.split("?", 1)[0]
        with self._lock:
            fault = self._next_fault()
            slow = fault is not None and fault.kind == "slow"
            problem = _check(h.command, path, headers, body) if fault is None or slow else None
            outcome = fault.outcome if fault else (f"error:{problem[0]}" if problem else "ok")
            if (problem is None and (fault is None or slow) and self.context_window is not None
                    and (tokens := sum(_tokens(js) for js, _ in _prompt_blocks(body))) > self.context_window):
                problem = (400, f"prompt is too long: {tokens} tokens > {self.context_window} maximum")
                outcome = "error:too-long" if fault is None else outcome
            record = Recorded(time.monotonic(), h.command, h.path, headers, body, outcome)
            self.requests.append(record)
            self._ids += 1
            request_id = f"req_loopback_{self._ids:06d}"

        # The per-request latency: in this connection's thread, no lock held, so requests overlap.
        if self.latency > 0 and self._stopping.wait(self.latency):
            _cut(h.connection)  # stopping: no reply
            h.close_connection = True
            return
        if fault is not None and not slow:
            self._send_fault(h, fault, request_id)
            return
        if slow and self._stopping.wait(fault.seconds):  # type: ignore[union-attr]
            _cut(h.connection)  # stopping: no reply
            h.close_connection = True
            return
        if problem is not None:
            self._send_error(h, problem[0], problem[1], request_id)
            return
        try:
            with self._respond_lock:  # responders need not be thread-safe
                reply = dict(self.responder(body))
            if reply.get("usage") is None:
                reply["usage"] = self._usage(body, reply)
            data = json.dumps(reply).encode()
        except Exception as e:  # a broken responder is a 500, like the real API's bugs
            record.outcome = "error:responder"
            record.error = f"{type(e).__name__}: {e}"
            self._send_error(h, 500, "the loopback responder failed", request_id)
            return
        _send_raw(h, 200, data, "application/json", request_id)

    def _send_error(self, h: _Handler, code: int, text: str, request_id: str,
                    error_type: str | None = None, retry_after: float | None = None) -> None:
        payload = {"type": "error", "error": {"type": error_type or STANDARD_ERROR_TYPES.get(code, "api_error"),
                                              "message": text}}
        extra = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        _send_json(h, code, payload, request_id, extra)

    def _send_fault(self, h: _Handler, fault: Fault, request_id: str) -> None:
        if fault.kind == "status":
            self._send_error(h, fault.code, fault.message, request_id, fault.error_type, fault.retry_after)
        elif fault.kind == "drop":
            _cut(h.connection)
            h.close_connection = True
        elif fault.variant == "json":
            _send_raw(h, 200, b'{"id": "msg_broken", "type": "message", "content": [{"type": "te',
                      "application/json", request_id)
        elif fault.variant == "html":
            _send_raw(h, 200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html", request_id)
        else:
            _send_json(h, 200, {"unexpected": "shape", "content": "not a list of blocks"}, request_id)

    def _usage(self, request: Any, reply: dict[str, Any]) -> dict[str, Any]:
        blocks = _prompt_blocks(request if isinstance(request, dict) else {})
        tokens = [_tokens(js) for js, _ in blocks]
        total = sum(tokens)
        created = read = 0
        created_by_ttl = {"5m": 0, "1h": 0}
        breakpoints = [i for i, (_, ttl) in enumerate(blocks) if ttl]
        if breakpoints:
            h = hashlib.sha256(str(request.get("model", "")).encode())
            prefixes = []
            for js, _ in blocks:
                h = hashlib.sha256(h.digest() + js.encode())
                prefixes.append(h.hexdigest())
            with self._lock:
                read_end = 0
                for bp in breakpoints:
                    for j in range(bp, max(-1, bp - _LOOKBACK - 1), -1):
                        if prefixes[j] in self._cache:
                            read_end = max(read_end, j + 1)
                            break
                self._cache.update(prefixes[bp] for bp in breakpoints)
            start = read_end
            for bp in breakpoints:
                if bp >= start:
                    created_by_ttl[blocks[bp][1]] += sum(tokens[start:bp + 1])
                    start = bp + 1
            read = sum(tokens[:read_end])
            created = sum(created_by_ttl.values())
        return {
            "input_tokens": total - created - read,
            "output_tokens": max(1, _tokens(json.dumps(reply.get("content") or []))),
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": created_by_ttl["5m"],
                               "ephemeral_1h_input_tokens": created_by_ttl["1h"]},
            "service_tier": "standard",
        }


# -- helpers ----------------------------------------------------------------------


def _cut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _send_raw(h: _Handler, status: int, data: bytes, content_type: str, request_id: str,
              extra: dict[str, str] | None = None) -> None:
    h.send_response(status, _REASONS.get(status))
    h.send_header("content-type", content_type)
    h.send_header("content-length", str(len(data)))
    h.send_header("request-id", request_id)
    for k, v in (extra or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)
    h.wfile.flush()


def _send_json(h: _Handler, status: int, obj: Any, request_id: str, extra: dict[str, str] | None = None) -> None:
    _send_raw(h, status, json.dumps(obj).encode(), "application/json", request_id, extra)


def _check(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, str] | None:
    """The real API's first checks, roughly: (status, message) of the error, or None."""
    if method != "POST" or path.rstrip("/") != "/v1/messages":
        return 404, f"{method} {path} is not served by the loopback server"
    if not (headers.get("x-api-key") or headers.get("authorization")):
        return 401, "x-api-key header is required"
    if not headers.get("anthropic-version"):
        return 400, "anthropic-version: header is required"
    if not isinstance(body, dict):
        return 400, "the request body must be a JSON object"
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return 400, f"{name}: Field required"
    if not isinstance(body["messages"], list) or not body["messages"]:
        return 400, "messages: at least one message is required"
    if body.get("stream"):
        return 400, "stream: streaming is not supported by the loopback server"
    return None


def _canonical(where: str, block: Any) -> str:
    if isinstance(block, dict):
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return json.dumps({where: block}, sort_keys=True, ensure_ascii=False)


def _ttl(block: Any) -> str:
    cc = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(cc, dict):
        return ""
    return "1h" if cc.get("ttl") == "1h" else "5m"


def _as_blocks(content: Any) -> Iterable[Any]:
    if isinstance(content, str):
        return [text_block(content)]
    return content if isinstance(content, list) else []


def _prompt_blocks(request: dict[str, Any]) -> list[tuple[str, str]]:
    """The prompt as (canonical JSON, breakpoint ttl or "") blocks: tools, system, messages."""
    out = [(_canonical("tool", t), _ttl(t)) for t in request.get("tools") or []]
    out += [(_canonical("system", b), _ttl(b)) for b in _as_blocks(request.get("system"))]
    for m in request.get("messages") or []:
        if isinstance(m, dict):
            role = m.get("role")
            out += [(_canonical(f"message:{role}", b), _ttl(b)) for b in _as_blocks(m.get("content"))]
    return out


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def conversation_key(body: dict[str, Any]) -> str:
    """A request's conversation as text, without the prompt-cache markers that move from turn to
    turn: equal keys mean the same question was asked again (a request re-sent)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "cache_control"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(body.get("messages")), sort_keys=True)
