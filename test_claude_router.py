"""Tests for claude_router, in the order of its sections (the same banners), after the
fixtures: a reader finds the tests of what they change under its section's name.

Run with: python3 -m unittest
Wire tests start the real router and a real fake upstream (a small http.server),
both on port 0 of 127.0.0.1. Streaming tests are gated with threading.Event, so a
router that buffers fails by timing out instead of passing by luck.
"""

import base64
import contextlib
import copy
import email.utils
import gc
import hashlib
import http.client
import http.server
import io
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
import urllib.request
import zlib

import claude_router as cr

################ Fixtures

TIMEOUT = 5     # seconds for every socket and wait in these tests
PNG_A = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"A" * 64).decode()
PNG_B = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"B" * 64).decode()
PNG_C = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"C" * 64).decode()


def llama_listing(vision=False, n_ctx=32768):
    """llama-server's /v1/models as it answers here (xllamacpp b11549), with or without an mmproj."""
    name = "qwen2.5-coder-0.5b"
    return {"models": [{"name": name, "model": name, "type": "model",
                        "capabilities": ["completion"] + (["multimodal"] if vision else [])}],
            "object": "list",
            "data": [{"id": name, "aliases": [name], "object": "model", "owned_by": "llamacpp",
                      "architecture": {"input_modalities": ["text"] + (["image"] if vision else []),
                                       "output_modalities": ["text"]},
                      "meta": {"n_ctx": n_ctx, "n_ctx_train": 32768}}]}


LLAMA_LISTING = llama_listing()


def image(data=PNG_A):
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}


def key(data):
    return hashlib.sha256(data.encode()).hexdigest()


def text(t):
    return {"type": "text", "text": t}


def user(*blocks):
    return {"role": "user", "content": list(blocks)}


def assistant(*blocks):
    return {"role": "assistant", "content": list(blocks)}


def system_message(content):
    return {"role": "system", "content": content}


def reminder(t):
    """A role "system" message's text as the router sends it: a user text block."""
    return text("<system-reminder>\n%s\n</system-reminder>" % t)


def tool_use(id_, name="Read"):
    return {"type": "tool_use", "id": id_, "name": name, "input": {"file_path": "/x.png"}}


def tool_result(id_, *content):
    return {"type": "tool_result", "tool_use_id": id_, "content": list(content)}


def request(*messages, **fields):
    return {"model": "claude-opus-5-5", "max_tokens": 32000, "messages": list(messages), **fields}


def sse(*events):
    """SSE bytes for (name, data) events."""
    return b"".join(b"event: %s\ndata: %s\n\n" % (n.encode(), json.dumps(d).encode())
                    for n, d in events)


def text_events(reply):
    """The Anthropic event sequence of a plain text reply, split into two deltas."""
    half = len(reply) // 2
    return [("message_start", {"type": "message_start", "message": {
                "id": "m1", "type": "message", "role": "assistant", "content": [],
                "model": "m", "usage": {"input_tokens": 5, "output_tokens": 0}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": reply[:half]}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": reply[half:]}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 3}}),
            ("message_stop", {"type": "message_stop"})]


def tool_call_events():
    """The event sequence of a reply that is only a tool call."""
    return [("message_start", {"type": "message_start", "message": {
                "id": "m2", "type": "message", "role": "assistant", "content": [],
                "model": "m", "usage": {"input_tokens": 5, "output_tokens": 0}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "t9", "name": "Read", "input": {}}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": "{\"file_path\": \"/a\"}"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
            ("message_stop", {"type": "message_stop"})]


def joined(data):
    """An encoded request's body as one bytes object (it is bytes, or an iterator of pieces)."""
    return data if isinstance(data, bytes) else b"".join(data)


def message_json(reply):
    return {"id": "m1", "type": "message", "role": "assistant", "model": "m",
            "content": [text(reply)] if reply else [], "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 3}}


LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (#\d+ )?")     # time, request id


def cr_line(line):
    """A log line without its time and request id, and without the seconds it gives."""
    return re.sub(r" \d+\.\d\d s", " s", LOG_PREFIX.sub("", line))


class WatchedLog(io.StringIO):
    """A StringIO whose writes set Events: a test can wait for a log line, not for time."""

    def __init__(self):
        super().__init__()
        self.watches = []

    def when(self, text):
        """An Event set once a line holding text is written."""
        event = threading.Event()
        self.watches.append((text, event))
        return event

    def lines(self):
        """The lines logged, each without its time and request id."""
        return [LOG_PREFIX.sub("", line) for line in self.getvalue().splitlines()]

    def write(self, data):
        written = super().write(data)
        for text, event in self.watches:
            if text in data:
                event.set()
        return written


def capture_log(test):
    """Send the router's log (stderr) to a WatchedLog until the test ends; return it."""
    log = WatchedLog()
    redirect = contextlib.redirect_stderr(log)
    redirect.__enter__()
    test.addCleanup(redirect.__exit__, None, None, None)
    return log


class NoLog:
    def log_message(self, *args):
        pass


class FakeServer(http.server.ThreadingHTTPServer):
    # Like the router's: with the default backlog of 5, the 64-stream test's connects
    # overflow it on a loaded machine and some come back reset.
    request_queue_size = 128
    daemon_threads = True


def refused_port(test, port=0):
    """A loopback port (port, else one the kernel picks) where connections are refused for
    the whole test.

    Bound and not listening: a port merely found free and let go can be taken meanwhile by
    any server on the machine (another suite's fake upstream answered a test's "down"
    vision server)."""
    sock = socket.socket()
    test.addCleanup(sock.close)
    sock.bind(("127.0.0.1", port))
    return sock.getsockname()[1]


def router_process(test, port=None, script=None, options=(), as_module=False):
    """Start the router (script: a copy of it) as a process of its own on port, else on one
    it picks, its upstream down; return (the process, its port) once it serves. The test
    kills it as it ends. as_module: run as -m claude_router, one Python start where a
    script is two (its re-start as a module) and a compile of the file, for tests that
    need a router process, not the start as a script.

    Not a port found free and let go for it: on a busy machine another program took such
    a port before the router could, and the router exited at start."""
    script = script or os.path.join(os.path.dirname(os.path.abspath(cr.__file__)),
                                    "claude_router.py")
    run = ["-m", "claude_router"] if as_module else [script]
    proc = subprocess.Popen([sys.executable, *options, *run, "--port", str(port or 0),
                             "--upstream", "http://127.0.0.1:9", "--cache-dir", test.cache_dir],
                            stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(script) if as_module else None)
    test.addCleanup(proc.stderr.close)
    test.addCleanup(proc.wait, TIMEOUT)
    test.addCleanup(proc.kill)
    watchdog = threading.Timer(TIMEOUT, proc.kill)      # a pipe read has no timeout
    watchdog.start()
    said = ""
    for line in proc.stderr:        # until the banner, or the router's end
        said += line
        if "claude-router on" in line:
            break
    watchdog.cancel()
    banner = re.search(r"claude-router on :(\d+)", said)
    test.assertTrue(banner, "the router did not start: %r" % said)
    return proc, int(banner[1])


def unused_port(count=1):
    """The first of count loopback ports in a row that nothing listens on now, for programs
    a test starts to take.

    Drawn below the ports the kernel hands out for port 0 and for outgoing connections
    (Linux from 32768, macOS and Windows from 49152). A port 0 found and let go is the next
    one the kernel may hand out: on a busy machine another suite's server took it before
    the router the test started could, and that router exited at start."""
    for port in random.sample(range(20000, 32768 - count), 50):
        with contextlib.ExitStack() as held:
            try:
                for each in range(port, port + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", each))
            except OSError:
                continue
        return port
    raise OSError("no %d unused ports in a row in 20000-32767" % count)


class FakeUpstream:
    """A real HTTP server playing the model server: scripted replies, recorded requests.

    A reply is a function taking the handler. Replies for POST /v1/messages are used in
    order, then the default text reply. Every request is recorded as (method, path,
    headers, body)."""

    def __init__(self, test, replies=(), listing=None, count_tokens=None, strict=False,
                 default=None):
        self.requests = []
        self.raw = []                       # (path, bytes) of each POST body, as received
        self.default = default or (lambda handler, body: json_reply(message_json("ok"))(handler))
        self.replies = list(replies)
        self.listing = listing
        self.count_tokens = count_tokens
        self.strict = strict
        self.closed = threading.Event()     # set when a client stopped reading a stream
        self.listing_gate = None            # an Event model listings wait on, when set
        self.props = None                   # llama-server's /props, when set
        self.key = None                     # when set, requests without it as Bearer get 401
        fake = self

        class Handler(NoLog, http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake.record(self, None)
                if fake.refuses(self):
                    return send_json(self, 401, {"error": "missing or wrong key"})
                if self.path == "/props" and fake.props:
                    return send_json(self, 200, fake.props)
                if fake.listing_gate and self.path.endswith("/models"):
                    fake.listing_gate.wait(TIMEOUT)
                # LM Studio's own listing has models[] and no data[] (llama-server has both).
                if self.path == "/api/v1/models" and fake.listing and "models" in fake.listing \
                        and "data" not in fake.listing:
                    return send_json(self, 200, fake.listing)
                if self.path == "/v1/models" and fake.listing and "data" in fake.listing:
                    return send_json(self, 200, fake.listing)
                send_json(self, 404, {"error": "not found"})

            def do_HEAD(self):
                fake.record(self, None)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream" if "stream" in self.path
                                 else "application/json")
                self.send_header("Content-Length", "1234")
                self.end_headers()

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["content-length"]))
                fake.raw.append((self.path, raw))
                body = json.loads(raw)
                fake.record(self, body)
                if fake.refuses(self):
                    return send_json(self, 401, {"error": "missing or wrong key"})
                if self.path.startswith("/v1/messages/count_tokens"):
                    status, reply = fake.count_tokens or (404, {"error": "Unexpected endpoint"})
                    return send_json(self, status, reply)
                if fake.strict:
                    problem = strict_problem(body)
                    if problem:
                        return send_json(self, 400, {"error": problem})
                if fake.replies:
                    return fake.replies.pop(0)(self)
                fake.default(self, body)

        self.server = FakeServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        test.addCleanup(thread.join, TIMEOUT)
        test.addCleanup(self.server.server_close)
        test.addCleanup(self.server.shutdown)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def refuses(self, handler):
        """True when a key is required and handler's request does not carry it."""
        return bool(self.key) and handler.headers.get("authorization") != "Bearer " + self.key

    def record(self, handler, body):
        self.requests.append((handler.command, handler.path, dict(handler.headers), body))

    def posts(self, path="/v1/messages"):
        return [r[3] for r in self.requests if r[0] == "POST" and r[1] == path]


def strict_problem(body):
    """What a strict server (llmster, Ollama, old vLLM) would reject in body, or None."""
    extra = set(body) - {"model", "messages", "system", "max_tokens", "stream", "tools",
                         "tool_choice", "temperature", "stop_sequences"}
    if extra:
        return "unknown fields %s" % sorted(extra)
    for m in body["messages"]:
        if m["role"] not in ("user", "assistant"):
            return "unknown variant '%s'" % m["role"]
        for b in m["content"] if isinstance(m["content"], list) else []:
            if "cache_control" in b or b["type"] in ("thinking", "tool_reference"):
                return "unsupported block"
            if b["type"] == "tool_result" and isinstance(b["content"], list) and any(
                    x["type"] != "text" for x in b["content"]):
                return "tool_result content must be text"
    roles = [m["role"] for m in body["messages"]]
    if any(a == b for a, b in zip(roles, roles[1:])):
        return "roles must alternate"
    return None


def send_json(handler, status, obj, headers=()):
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def json_reply(obj, status=200):
    return lambda handler: send_json(handler, status, obj)


def write_chunk(handler, data):
    handler.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))


def begin_stream(handler):
    """Send the status and headers of a 200 event stream, its body chunked."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def sees_close(sock):
    """True when the peer of sock closes the connection within TIMEOUT."""
    sock.settimeout(TIMEOUT)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def stream_reply(events, gate=None, gate_after=1, stall=None, cut_after=None, until_closed=None):
    """An SSE reply: events one chunk each; waits on gate after gate_after events.

    stall: an Event waited on after gate_after events instead of going on (a hung
    model). cut_after: close the socket after that many events. until_closed: a
    FakeUpstream whose closed event is set once writing fails (client gone)."""
    def reply(handler):
        begin_stream(handler)
        try:
            for i, event in enumerate(events):
                if i == gate_after and gate is not None:
                    gate.wait(TIMEOUT)
                if i == gate_after and stall is not None:
                    stall.wait(TIMEOUT)
                if i == cut_after:
                    handler.close_connection = True
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return
                write_chunk(handler, sse(event))
            if until_closed:
                for i in range(100_000):
                    write_chunk(handler, sse(("ping", {"type": "ping"})))
            handler.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, OSError):
            handler.close_connection = True
            if until_closed:
                until_closed.closed.set()
    return reply


def resident_bytes():
    """This process's resident memory, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_response(sock):
    """Read one HTTP response from sock; return (status, headers, body)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, resp.headers, resp.read()


def begin_body(sock, body, sent):
    """Send a POST /v1/messages with body on sock, only its first sent bytes, once the router
    has asked for it (Expect: 100-continue): the router is then in the middle of reading it."""
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                 b"Expect: 100-continue\r\n\r\n" % len(body))
    continued = b""
    while not continued.endswith(b"\r\n\r\n"):
        continued += sock.recv(1) or b"(closed)\r\n\r\n"
    assert continued == b"HTTP/1.1 100 Continue\r\n\r\n", continued
    sock.sendall(body[:sent])


def recv_until(sock, marker):
    """The bytes sock gives until they hold marker; raise EOFError if the peer closes first
    (a loop on recv alone would spin on its b"" until the suite is killed)."""
    got = b""
    while marker not in got:
        data = sock.recv(65536)
        if not data:
            raise EOFError("closed before %r came; got %r" % (marker, got[-300:]))
        got += data
    return got


class RouterTestCase(unittest.TestCase):
    """Starts the router on loopback against a FakeUpstream; checks no handler crashed."""

    router_settings = {}

    def setUp(self):
        self.cache_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.cache_dir, True)
        self.log = capture_log(self)

    def start(self, upstream=None, **settings):
        """Start a router (a new one each call, on the same cache dir) and return it.

        upstream is a FakeUpstream or a URL."""
        url = getattr(upstream, "url", upstream) or "http://127.0.0.1:9"
        router = cr.Server(("127.0.0.1", 0), url, cache_dir=self.cache_dir, **{
            "coder_model": "CODER", "vision_model": "VISION", **self.router_settings, **settings})
        router.vision.cache.load()
        router.warmer.load()
        router.refresh_models()     # as main() does before it serves
        thread = threading.Thread(target=router.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        self.addCleanup(lambda: self.assertEqual(router.errors, []))
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(router.server_close)
        self.addCleanup(router.shutdown)
        self.router = router
        return router

    def connect(self, router=None):
        conn = http.client.HTTPConnection("127.0.0.1", (router or self.router).server_port,
                                          timeout=TIMEOUT)
        self.addCleanup(conn.close)
        return conn

    def call(self, method, path, body=None, headers=None, conn=None):
        """Send one request; return (status, headers, parsed or raw body).

        A connection it opens itself it closes: the router serves max_connections at once."""
        own = conn is None
        conn = conn or self.connect()
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        if own:
            conn.close()
        try:
            return resp.status, resp.headers, json.loads(raw)
        except ValueError:
            return resp.status, resp.headers, raw

    def post(self, body, **kwargs):
        return self.call("POST", "/v1/messages?beta=true", body, **kwargs)

    def raw_socket(self):
        """A socket connected to the router, closed when the test ends."""
        sock = socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT)
        self.addCleanup(sock.close)
        return sock

    def post_raw(self, body):
        """Send body to /v1/messages on a raw socket, for a test that hangs up; return it."""
        data = json.dumps(body).encode()
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(data), data))
        return sock

    def assertEnvelope(self, status, reply, expected_status, error_type=None):
        self.assertEqual(status, expected_status, reply)
        self.assertEqual(reply["type"], "error")
        self.assertIsInstance(reply["error"]["message"], str)
        if error_type:
            self.assertEqual(reply["error"]["type"], error_type)


################ Fixtures (documents)

PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
HELVETICA = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"


def pdf_stream(entries, data):
    """An indirect object body: a stream with entries (bytes) and its /Length."""
    return b"<< %s /Length %d >>\nstream\n%s\nendstream" % (entries, len(data), data)


def build_pdf(objects, trailer=b"", objnum_start=1):
    """A PDF with objects numbered from 1, a cross-reference table and a trailer.

    Object 1 is the catalog; trailer adds entries (an /Encrypt, an /ID)."""
    out = [b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"]
    offsets = []
    for num, body in enumerate(objects, objnum_start):
        offsets.append(sum(map(len, out)))
        out.append(b"%d 0 obj\n%s\nendobj\n" % (num, body))
    xref = sum(map(len, out))
    out.append(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out += [b"%010d 00000 n \n" % offset for offset in offsets]
    out.append(b"trailer\n<< /Size %d /Root 1 0 R %s >>\nstartxref\n%d\n%%%%EOF\n"
               % (len(objects) + 1, trailer, xref))
    return b"".join(out)


def page_objects(content, fonts=b"/F1 4 0 R", extra=(), resources=b""):
    """Catalog, page tree, page and content objects (1-3, 5), then extra from object 4 on."""
    return [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 /Resources << /Font << %s >> %s >> >>"
            % (fonts, resources),
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 5 0 R >>",
            extra[0] if extra else HELVETICA,
            content if content.startswith(b"<<") else pdf_stream(b"", content)] + list(extra[1:])


def text_of(data, **options):
    """The text of every page of a PDF, pages joined by a form feed."""
    return "\f".join(page["text"] for page in cr.pdf_pages(data, **options))


def rc4(key, data):
    """RC4, written again here so the tests do not trust the module's."""
    state, j, out = list(range(256)), 0, bytearray()
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) % 256
        state[i], state[j] = state[j], state[i]
    i = j = 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + state[i]) % 256
        state[i], state[j] = state[j], state[i]
        out.append(byte ^ state[(state[i] + state[j]) % 256])
    return bytes(out)


def standard_security(revision, user=b"", owner=b"owner", aes=False):
    """Return (file key, encryption dictionary, trailer's /ID) of the standard security
    handler (ISO 32000-1 7.6.3)."""
    length, file_id, permissions = (5 if revision == 2 else 16), b"0123456789abcdef", -4
    owner_key = hashlib.md5((owner + PAD)[:32]).digest()
    for _ in range(50 if revision >= 3 else 0):
        owner_key = hashlib.md5(owner_key[:length]).digest()
    o = rc4(owner_key[:length], (user + PAD)[:32])
    for i in range(1, 20 if revision >= 3 else 1):
        o = rc4(bytes(k ^ i for k in owner_key[:length]), o)
    key = hashlib.md5((user + PAD)[:32] + o + (permissions & 0xFFFFFFFF).to_bytes(4, "little")
                      + file_id).digest()[:length]
    for _ in range(50 if revision >= 3 else 0):
        key = hashlib.md5(key).digest()[:length]
    if revision == 2:
        u = rc4(key, PAD)
    else:
        u = rc4(key, hashlib.md5(PAD + file_id).digest())
        for i in range(1, 20):
            u = rc4(bytes(k ^ i for k in key), u)
        u += bytes(16)
    filters = b"/V 4 /CF << /StdCF << /CFM /AESV2 /Length 16 >> >> /StmF /StdCF /StrF /StdCF" \
        if aes else b"/V %d /Length %d" % (1 if revision == 2 else 2, length * 8)
    encrypt = (b"<< /Filter /Standard %s /R %d /O <%s> /U <%s> /P %d >>"
               % (filters, revision, o.hex().encode(), u.hex().encode(), permissions))
    return key, encrypt, b"/ID [<%s> <%s>]" % ((file_id.hex().encode(),) * 2)


def object_key(key, num):
    """Return the RC4 key of object num, generation 0 (ISO 32000-1 7.6.2 algorithm 1)."""
    return hashlib.md5(key + num.to_bytes(3, "little") + bytes(2)).digest()[:len(key) + 5]


def encrypted_pdf(content, revision, user=b"", owner=b"owner", aes=False):
    """A one-page PDF encrypted by the standard security handler (ISO 32000-1 7.6.3)."""
    key, encrypt, file_id = standard_security(revision, user, owner, aes)
    objects = page_objects(pdf_stream(b"", rc4(object_key(key, 5), content))) + [encrypt]
    return build_pdf(objects, b"/Encrypt 6 0 R " + file_id)


def object_stream_pdf(content):
    """A PDF 1.5 whose objects 2-4 sit in an object stream, indexed by a cross-reference stream."""
    inner = page_objects(content)
    header = b""
    body = b""
    for num in (2, 3, 4):
        header += b"%d %d " % (num, len(body))
        body += inner[num - 1] + b"\n"
    objstm = pdf_stream(b"/Type /ObjStm /N 3 /First %d /Filter /FlateDecode" % len(header),
                        zlib.compress(header + body))
    out = [b"%PDF-1.5\n"]
    offsets = {}
    for num, obj in ((1, inner[0]), (5, inner[4]), (6, objstm)):
        offsets[num] = sum(map(len, out))
        out.append(b"%d 0 obj\n%s\nendobj\n" % (num, obj))
    # A stale copy of object 5 that no cross-reference entry points at: a reader that
    # scanned for objects instead of reading the xref stream would take it (the last one).
    out.append(b"5 0 obj\n%s\nendobj\n" % pdf_stream(b"", b"BT /F1 12 Tf (stale) Tj ET"))
    offsets[7] = sum(map(len, out))
    rows = [b"\x00\x00\x00\xff"]
    for num in range(1, 8):
        if num in (2, 3, 4):
            rows.append(b"\x02\x00\x06" + bytes([num - 2]))
        else:
            rows.append(b"\x01" + offsets[num].to_bytes(2, "big") + b"\x00")
    xref = pdf_stream(b"/Type /XRef /Size 8 /W [1 2 1] /Root 1 0 R /Filter /FlateDecode",
                      zlib.compress(b"".join(rows)))
    out.append(b"7 0 obj\n%s\nendobj\nstartxref\n%d\n%%%%EOF\n" % (xref, offsets[7]))
    return b"".join(out)


def catalog_stream_pdf(content, stale=False, encrypted=False):
    """A PDF 1.5 whose objects 1-4, the catalog first, sit in object stream 6.

    With stale, an older object stream 6 (its object 1 no catalog) stands first and the
    cross-reference stream points at it: a damaged file, read again by a scan. With
    encrypted, RC4 128-bit under an empty user password, its /Encrypt object 8."""
    key, encrypt, file_id = standard_security(3) if encrypted else (None, None, b"")

    def seal(num, data):
        """Encrypt the stream data of object num when the file is encrypted."""
        return rc4(object_key(key, num), data) if encrypted else data
    inner = page_objects(pdf_stream(b"", seal(5, content)))
    header = body = b""
    for num in (1, 2, 3, 4):
        header += b"%d %d " % (num, len(body))
        body += inner[num - 1] + b"\n"
    out, offsets = [b"%PDF-1.5\n"], {}
    if stale:
        offsets[6] = len(out[0])
        out.append(b"6 0 obj\n%s\nendobj\n" % pdf_stream(b"/Type /ObjStm /N 1 /First 4", b"1 0 42"))
    objstm = pdf_stream(b"/Type /ObjStm /N 4 /First %d" % len(header), seal(6, header + body))
    for num, obj in ((5, inner[4]), (6, objstm), (8, encrypt)):
        if obj:
            offsets.setdefault(num, sum(map(len, out)))
            out.append(b"%d 0 obj\n%s\nendobj\n" % (num, obj))
    offsets[7] = sum(map(len, out))
    rows = [b"\x00\x00\x00\xff"] + [b"\x02\x00\x06" + bytes([num - 1]) for num in (1, 2, 3, 4)]
    rows += [b"\x01" + offsets[num].to_bytes(2, "big") + b"\x00" for num in sorted(offsets)]
    xref = pdf_stream(b"/Type /XRef /Size %d /W [1 2 1] /Root 1 0 R %s %s" % (
        max(offsets) + 1, b"/Encrypt 8 0 R" if encrypted else b"", file_id), b"".join(rows))
    out.append(b"7 0 obj\n%s\nendobj\nstartxref\n%d\n%%%%EOF\n" % (xref, offsets[7]))
    return b"".join(out)


def image_pdf(image_object):
    """A one-page PDF whose page only draws the image XObject image_object."""
    objects = page_objects(b"q 200 0 0 100 0 0 cm /Im1 Do Q",
                           resources=b"/XObject << /Im1 6 0 R >>")
    return build_pdf(objects + [image_object])


def png_chunks(png):
    """Return {chunk type: its data joined} of a PNG, checking its CRCs."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pos, chunks = 8, {}
    while pos < len(png):
        size = int.from_bytes(png[pos:pos + 4], "big")
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + size]
        assert zlib.crc32(kind + body) == int.from_bytes(png[pos + 8 + size:pos + 12 + size], "big")
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + size
    return chunks


def png_rows(png):
    """Return (width, height, colour type, decompressed IDAT) of a PNG, checking its CRCs."""
    chunks = png_chunks(png)
    head = chunks[b"IHDR"]
    return (int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big"), head[9],
            zlib.decompress(chunks[b"IDAT"]))


################ Errors and logging

class LoggingTest(RouterTestCase):
    """What the log and the error answers say."""

    def test_logs_hold_no_bodies_images_or_keys_and_escape_client_strings(self):
        self.start(FakeUpstream(self, [json_reply(message_json("A chart."))]), verbose=True)
        self.post(request(user(text("my secret prompt"), image(PNG_B))),
                  headers={"x-api-key": "sk-ant-key-123"})
        with socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT) as sock:
            sock.sendall(b"GET /\x1b[31mred HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            read_response(sock)
        log = self.log.getvalue()
        for secret in ("my secret prompt", PNG_B[:20], "sk-ant-key-123", "A chart.", "\x1b"):
            self.assertNotIn(secret, log)
        self.assertIn("\\x1b[31mred", log)

    def test_routers_own_refusals_say_whether_to_retry(self):
        down = "http://127.0.0.1:%d" % refused_port(self)
        self.start(down, token="t")
        rows = [({"x-api-key": "t"}, 529, None), ({"x-api-key": "wrong"}, 401, "false")]
        for headers, expected, should_retry in rows:
            with self.subTest(expected=expected):
                status, got_headers, reply = self.post(request(user(text("hi"))), headers=headers)
                self.assertEnvelope(status, reply, expected)
                self.assertEqual(got_headers["x-should-retry"], should_retry)


################ Reading requests

class ReadingRequestsTest(unittest.TestCase):
    """The pure checks of a request's head, path and access."""

    def test_paths_are_normalised_as_rfc_3986_says(self):
        rows = [("/", "/"), ("/v1/messages", "/v1/messages"), ("/v1/../status", "/status"),
                ("/v1/%2e%2E/x", "/x"), ("/v1/./a/", "/v1/a/"), ("//v1//messages", "/v1/messages"),
                ("/a/b/..", "/a/"), ("/..", "/"), ("/v1/%41%7e", "/v1/A~"), ("/v1/..%2e/x", "/v1/.../x"),
                ("/v1/a%20b", "/v1/a%20b"), ("/a/%2F../x", None), ("/a/%5c", None)]
        for path, expected in rows:
            with self.subTest(path):
                self.assertEqual(cr.normalize_path(path), expected)

    def test_a_whole_head_is_split_only_when_every_line_would_be_taken(self):
        # (bytes at hand, the header lines split_head takes, what it leaves), or None when the
        # careful line-by-line reading must decide: a head not all there, or one it refuses.
        ok = b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A:\tv \r\n\r\n"
        many = b"X: 1\r\n" * cr.MAX_HEADERS
        fields = [b"Host: x\r", b"X-A:\tv \r"]
        rows = [(ok, fields, b""), (ok + b"{body", fields, b"{body"),
                (b"GET / HTTP/1.0\nA: 1\nB: 2\n\nGET", [b"A: 1", b"B: 2"], b"GET"),
                (b"GET / HTTP/1.1\r\n\r\n\r\n", [], b"\r\n"),
                (b"GET / HTTP/1.1\r\n" + many + b"\r\n", [b"X: 1\r"] * cr.MAX_HEADERS, b""),
                (ok[:-2], None, None), (ok[:-1], None, None), (ok[:10], None, None),
                (b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n", None, None),          # an obs-fold
                (b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n", None, None),             # a bare CR
                (b"GET / HTTP/1.1\r\nX-A : b\r\n\r\n", None, None),
                (b"GET  / HTTP/1.1\r\n\r\n", None, None),
                (b"\r\nGET / HTTP/1.1\r\n\r\n", None, None),
                (b"GET / HTTP/1.1\r\n" + many + b"X: 1\r\n\r\n", None, None),      # 431
                (b"GET / HTTP/1.1\r\nX: %s\r\n\r\n" % (b"a" * cr.MAX_HEAD_LINE), None, None)]
        for data, lines, rest in rows:
            with self.subTest(data[:40]):
                head = cr.split_head(data)
                self.assertEqual(head and (head[1], data[head[2]:]),
                                 None if lines is None else (lines, rest))

    def test_header_lines_read_as_http_client_reads_them(self):
        lines = [b"Host: 127.0.0.1\r\n", b"X-Spaces:  \t a b \t \r\n", b"X-Empty:\r\n",
                 b"x-MiXed: a:b: c\n", b"X-Latin: caf\xe9 \x85 \xff\r\n", b"X-Dup: 1\r\n",
                 b"x-dup: 2\r\n"]
        mine = cr.HeaderFields(lines)
        theirs = http.client.parse_headers(io.BytesIO(b"".join(lines) + b"\r\n"))
        self.assertEqual(mine.items(), theirs.items())
        self.assertEqual(mine.items()[1], ("X-Spaces", "a b \t "))
        for name in ("host", "X-DUP", "x-mixed", "x-empty", "x-none"):
            with self.subTest(name):
                self.assertEqual((mine.get(name), mine.get_all(name), name in mine, mine[name],
                                  mine.get(name, "-"), mine.get_all(name, "-")),
                                 (theirs.get(name), theirs.get_all(name), name in theirs,
                                  theirs[name], theirs.get(name, "-"), theirs.get_all(name, "-")))
        self.assertIsInstance(mine, http.client.HTTPMessage)

    def test_loopback_hosts(self):
        rows = [("127.0.0.1:3000", True), ("localhost", True), ("[::1]:3000", True),
                ("127.8.9.1", True), ("LOCALHOST:1", True), ("evil.example:3000", False),
                ("192.168.1.5", False), ("[fe80::1]:80", False), ("", False)]
        for host, expected in rows:
            with self.subTest(host):
                self.assertEqual(cr.is_loopback_host(host), expected)

    def test_a_host_too_long_to_be_a_name_is_none_and_not_kept(self):
        # The last answers are kept: 64 Host values of up to 64 KiB (a header line) held 4 MiB.
        self.assertFalse(cr.is_loopback_host("localhost" + " " * 400))
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(64):
            self.assertFalse(cr.is_loopback_host("localhost%s%d" % (" " * 60000, i)))
        self.assertLess(tracemalloc.get_traced_memory()[0] - before, 1_000_000)


def malformed_requests():
    """Return [(name, raw HTTP request bytes, status)]: hundreds of requests the router must
    refuse, each with the status it must refuse them with (400 unless said)."""
    rows = []

    def raw(name, head, body=b"", status=400):
        rows.append((name, head + b"\r\n" + body, status))

    def post(name, body, path=b"/v1/messages?beta=true", extra=b"", status=400):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        raw(name, b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n%s" % (path, len(data), extra), data, status)

    def message(content, role="user"):
        return {"model": "m", "max_tokens": 10, "messages": [{"role": role, "content": content}]}

    for i, data in enumerate([
            b"", b"{", b"}", b"{'a': 1}", b'{"a":}', b"nul", b"tru", b'{"messages": [}',
            b"\xff\xfe\x00", b"\x00" * 10, b'"unterminated', b'{"a":1,}', b"[1,2", b"NaN",
            b'{"max_tokens": NaN, "messages": [{"role": "user", "content": "x"}]}',
            b'{"x": Infinity}', b"-", b"1e", b'{"a" 1}', b"\xc3\x28", b"<html>",
            b'{"max_tokens": 1' + b"0" * 5000 + b"}",
            b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"a": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001]):
        post("not json %d" % i, data)
    for body in ([], 1, "s", None, True, 1.5, [{}]):
        post("not an object %r" % (body,), body)
    for messages in (None, "x", 5, {}, [], [1], ["x"], [None], [[]]):
        post("messages %r" % (messages,), {"max_tokens": 5, "messages": messages})
    for role in ("tool", "bot", None, 5, "USER", ""):
        post("role %r" % (role,), message("hi", role))
    post("role missing", {"messages": [{"content": "hi"}]})
    for content in (5, None, {"a": 1}, True, 1.5):
        post("content %r" % (content,), message(content))
    bad_blocks = [
        5, "str", None, [], {}, {"type": 5}, {"type": "text"}, {"type": "text", "text": 5},
        {"type": "image"}, {"type": "image", "source": "x"}, {"type": "image", "source": {}},
        {"type": "image", "source": {"type": "base64"}},
        {"type": "image", "source": {"type": "base64", "data": 5}},
        {"type": "image", "source": {"type": "base64", "data": ""}},
        {"type": "image", "source": {"type": "url"}},
        {"type": "image", "source": {"type": "file", "file_id": "f"}},
        {"type": "tool_use", "name": "Read", "input": {}},
        {"type": "tool_use", "id": "t", "input": {}},
        {"type": "tool_use", "id": "t", "name": "Read", "input": []},
        {"type": "tool_result", "content": "x"},
        {"type": "tool_result", "tool_use_id": 5, "content": "x"},
        {"type": "tool_result", "tool_use_id": "t", "content": 5},
        {"type": "tool_result", "tool_use_id": "t", "content": [5]},
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]},
        {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "tool_result", "tool_use_id": "u", "content": "x"}]},
    ]
    for i, block in enumerate(bad_blocks):
        post("block %d" % i, message([block]))
    for data in ("not base64!!", "abc", "a===", "====", "YWJj\n", "ab=c", "\u00e9\u00e9\u00e9\u00e9",
                 "YW Jj"):
        post("base64 %r" % data, message([text("look"), image(data)]))
    post("base64 in tool_result", message([tool_result("t", image("%%%%"))]))
    # Data beginning with http: skipped the base64 check and was spliced into the
    # upstream body unescaped (issue 11, section 3).
    for data in ('http:", "injected": true, "x": "', "http:\u00e9", "https://x/y.png"):
        post("base64 %r" % data, message([image(data)]))
    post("base64 in an earlier turn", {"model": "m", "max_tokens": 10, "messages": [
        user(image("%%%%")), assistant(text("?")), user(text("go on"))]})
    sources = [
        {"type": "base64", "data": PNG_A}, {"type": "base64", "media_type": 5, "data": PNG_A},
        {"type": "base64", "media_type": "", "data": PNG_A},
        {"type": "bytes", "media_type": "image/png", "data": PNG_A}, {"type": None, "data": PNG_A},
        {"type": "url", "url": 5}, {"type": "url", "url": ""},
        {"type": "url", "url": "file:///etc/passwd"}, {"type": "url", "url": "javascript:alert(1)"},
        {"type": "url", "url": "https://"}, {"type": "url", "url": "http://x/a b.png"},
        {"type": "url", "url": "http://[x/"}, {"type": "url", "url": "//x/y.png"},
        {"type": "url", "url": "http://x/y.png\n"}, {"type": "url", "url": "http://x:99999/"}]
    for i, source in enumerate(sources):
        post("image source %d" % i, message([{"type": "image", "source": source}]))
    for system in (5, [5], [{"type": "text"}], {"a": 1}, [{"text": 5}]):
        post("system %r" % (system,), {**message("hi"), "system": system})
    for tools in (5, "x", [5], ["x"], {"a": 1}):
        post("tools %r" % (tools,), {**message("hi"), "tools": tools})
    for max_tokens in (0, -1, "100", 1.5, True, None):
        post("max_tokens %r" % (max_tokens,), {**message("hi"), "max_tokens": max_tokens})
    for stream in ("yes", 1, None):
        post("stream %r" % (stream,), {**message("hi"), "stream": stream})
    for model in (5, [], {}):
        post("model %r" % (model,), {**message("hi"), "model": model})
    # Issue 14, section 2: a field's type is checked before anything uses it (a list or
    # an object as a role was a 500), on both endpoints that read messages.
    deep = 900      # under the JSON parser's limit, so it parsed, then a 500 on 3.9-3.11
    typed = [("role list", {"messages": [{"role": ["user"], "content": "hi"}]}),
             ("role object", {"messages": [{"role": {"a": 1}, "content": "hi"}]}),
             ("message list", {"messages": [["user", "hi"]]}),
             ("type list", message([{"type": ["text"], "text": "x"}])),
             ("document source type list", message([{"type": "document", "source": {
                 "type": ["text"], "media_type": "text/plain", "data": "x"}}])),
             ("document source type object", message([{"type": "document", "source": {
                 "type": {}, "data": "x"}}])),
             ("image source type list", message([{"type": "image", "source": {
                 "type": ["base64"], "media_type": "image/png", "data": "AAAA"}}])),
             ("thinking without text", message([{"type": "thinking"}], "assistant")),
             ("thinking number", message([{"type": "thinking", "thinking": 5}], "assistant")),
             ("redacted_thinking without data", message([{"type": "redacted_thinking"}],
                                                        "assistant")),
             ("tool_reference without name", message([{"type": "tool_reference"}])),
             ("tool_reference name list", message([{"type": "tool_reference", "tool_name": []}])),
             ("system block not text", {**message("hi"), "system": [{"type": "image", "text": "x"}]}),
             ("tool name", {**message("hi"), "tools": [{"name": 5, "input_schema": {}}]}),
             ("tool schema", {**message("hi"), "tools": [{"name": "x", "input_schema": 5}]}),
             ("tool description", {**message("hi"), "tools": [
                 {"name": "x", "description": [], "input_schema": {}}]}),
             ("tool_choice string", {**message("hi"), "tool_choice": "auto"}),
             ("tool_choice type", {**message("hi"), "tool_choice": {"type": 5}}),
             ("tool_choice tool without name", {**message("hi"), "tool_choice": {"type": "tool"}}),
             ("temperature", {**message("hi"), "temperature": "hot"}),
             ("top_p", {**message("hi"), "top_p": [1]}),
             ("top_k", {**message("hi"), "top_k": 1.5}),
             ("stop_sequences string", {**message("hi"), "stop_sequences": "END"}),
             ("stop_sequences number", {**message("hi"), "stop_sequences": [5]}),
             # everything cleans away: never messages: [] upstream
             ("empty string", message("")), ("empty list", message([])),
             ("only thinking", message([{"type": "thinking", "thinking": "x", "signature": "s"}],
                                       "assistant")),
             ("only an empty system message", message("", "system")),
             ("only empty messages", {"messages": [{"role": "user", "content": ""},
                                                   {"role": "assistant", "content": []},
                                                   {"role": "system", "content": [text("")]}]})]
    for name, body in typed:
        post("typed: %s" % name, body)
        post("typed, count_tokens: %s" % name, body, path=b"/v1/messages/count_tokens")
    # Numbers beyond double range were sent upstream as Infinity; integers beyond 64 bits
    # are no number a model server reads either.
    for name, data in [("1e400", b"1e400"), ("-1e400", b"-1e400"), ("max_tokens 1e400", None),
                       ("2**64", b"18446744073709551616"), ("-2**70", b"-%d" % 2 ** 70)]:
        number = data or b"1e400"
        field = b"max_tokens" if data is None else b"temperature"
        for place, body in [("field", b'{"%s": %s, "messages": [{"role": "user", "content": "x"}]}'
                             % (field, number)),
                            ("tool input", b'{"messages": [{"role": "assistant", "content": [{"type": '
                             b'"tool_use", "id": "t", "name": "n", "input": {"a": [%s]}}]}]}' % number)]:
            post("number %s in %s" % (name, place), body)
            post("number %s in %s, count_tokens" % (name, place), body,
                 path=b"/v1/messages/count_tokens")
    # Nesting: a body nested just under the parser's limit parsed, then failed in json.dumps.
    nest = b"[" * deep + b"]" * deep
    for place, body in [("tool input", b'{"messages": [{"role": "assistant", "content": [{"type": '
                         b'"tool_use", "id": "t", "name": "n", "input": {"a": %s}}]}]}' % nest),
                        ("text block", b'{"messages": [{"role": "user", "content": [{"type": "text", '
                         b'"text": "x", "extra": %s}]}]}' % nest),
                        ("tool schema", b'{"messages": [{"role": "user", "content": "x"}], "tools": '
                         b'[{"name": "n", "input_schema": {"a": %s}}]}' % nest),
                        ("dropped field", b'{"messages": [{"role": "user", "content": "x"}], '
                         b'"metadata": %s}' % nest)]:
        post("nested %d deep in %s" % (deep, place), body)
        post("nested %d deep in %s, count_tokens" % (deep, place), body,
             path=b"/v1/messages/count_tokens")
    post("count_tokens not json", b"{", path=b"/v1/messages/count_tokens")
    post("count_tokens no messages", {"model": "m"}, path=b"/v1/messages/count_tokens")
    post("unknown path", {"a": 1}, path=b"/v2/messages", status=404)
    post("root post", {"a": 1}, path=b"/", status=404)
    ok = json.dumps(message("hi")).encode()
    raw("no content-length", b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n", status=411)
    for length in (b"abc", b"-5", b"1e3", b" ", b"0x10"):
        raw("content-length %r" % length, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %s\r\n" % length, ok)
    raw("chunked body", b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
        b"chunked\r\n", b"%X\r\n%s\r\n0\r\n\r\n" % (len(ok), ok), 411)
    raw("over the size limit", b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: %d\r\n" % (cr.MAX_BODY_BYTES + 1), status=413)
    for method in (b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"FOO", b"BREW"):
        raw("method %s" % method.decode(), b"%s /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 0\r\n" % method, status=405)
    for path in (b"/nope", b"/v2/x", b"/status/x", b"/%00"):
        raw("get %r" % path, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % path, status=404)
    raw("garbage request line", b"GARBAGE\r\n")
    raw("too many words", b"GET / HTTP/1.1 extra\r\n")
    raw("bad version", b"GET / HTTP/x.y\r\n")
    raw("request line too long", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n", status=414)
    raw("header too long", b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n", status=431)
    raw("too many headers", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)),
        status=431)
    # Issue 11, section 1: one rule per class of HTTP defect.
    head = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"    # a 404, if answered
    for method in (b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"FOO"):
        raw("%s with a request as its body" % method.decode(),
            b"%s /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
            % (method, len(smuggled)), smuggled, 404 if method == b"GET" else 405)
    for length in (b"\xb2", b"1\xb2", b"\xd9\xa1", b"+5", b"5, 5", b"5 5", b"\x005"):
        raw("content-length %r" % length, head + b"Content-Length: %s\r\n" % length, ok)
    raw("content-length of 5000 digits", head + b"Content-Length: 1%s\r\n" % (b"0" * 5000), ok,
        413)
    raw("two content-lengths", head + b"Content-Length: %d\r\nContent-Length: %d\r\n"
        % (len(ok), len(ok) + 1), ok)
    for coding in (b"gzip", b"chunked, identity", b" chunked", b"identity"):
        raw("transfer-encoding %r with content-length" % coding,
            head + b"Transfer-Encoding: %s\r\nContent-Length: %d\r\n" % (coding, len(ok)), ok, 411)
    raw("over the size limit, with body bytes", head + b"Content-Length: %d\r\n"
        % (cr.MAX_BODY_BYTES + 1), ok * 100, 413)
    for name, line in [("obs-fold", b"X-A: a\r\n b\r\n"), ("obs-fold by tab", b"X-A: a\r\n\tb\r\n"),
                       ("NUL in a value", b"X-A: a\x00b\r\n"), ("bare CR in a value", b"X-A: a\rb\r\n"),
                       ("bare CR then a header", b"X-A: a\rContent-Length: 1\r\n"),
                       ("DEL in a value", b"X-A: a\x7fb\r\n"), ("ESC in a value", b"X-A: \x1b[2J\r\n"),
                       ("space before the colon", b"X-A : b\r\n"), ("no colon", b"X-A b\r\n"),
                       ("empty name", b": b\r\n"), ("NUL in a name", b"X\x00A: b\r\n"),
                       ("leading space", b" X-A: b\r\n"), ("two Host headers", b"Host: evil.example\r\n")]:
        raw("header: %s" % name, head + line + b"Content-Length: %d\r\n" % len(ok), ok)
    for name, line in [("NUL in the path", b"GET /v1/\x00 HTTP/1.1"), ("NUL in the method", b"G\x00T / HTTP/1.1"),
                       ("NUL in the version", b"GET / HTTP/1.1\x00"), ("ESC in the path", b"GET /\x1b HTTP/1.1"),
                       ("absolute-form", b"GET http://127.0.0.1/v1/models HTTP/1.1"),
                       ("absolute-form elsewhere", b"GET http://evil.example/api/tags HTTP/1.1"),
                       ("authority-form", b"CONNECT 127.0.0.1:80 HTTP/1.1"),
                       ("asterisk-form", b"OPTIONS * HTTP/1.1"), ("bad escape", b"GET /v1/%zz HTTP/1.1"),
                       ("backslash", b"GET /v1\\..\\x HTTP/1.1"), ("encoded slash", b"GET /v1/..%2F..%2Fx HTTP/1.1"),
                       ("encoded backslash", b"GET /v1/..%5c..%5cx HTTP/1.1"), ("fragment", b"GET /v1/x#y HTTP/1.1"),
                       ("tabs", b"GET\t/\tHTTP/1.1"), ("two spaces", b"GET  / HTTP/1.1"),
                       ("lower-case version", b"GET / http/1.1"), ("HTTP/2", b"GET / HTTP/2.0"),
                       ("HTTP/0.9", b"GET /")]:
        raw("request line: %s" % name, line + b"\r\nHost: 127.0.0.1\r\n")
    for path in (b"/v1/../nope", b"/v1/%2e%2e/nope", b"/api/../../etc/passwd", b"/v1/./../x",
                 b"/api/%2E%2e/%2e%2E/x", b"//nope", b"/v1/x/../../../nope"):
        raw("path %r" % path, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % path, status=404)
    return rows


class MalformedInputTest(RouterTestCase):

    def assertRefused(self, rows, split_body_bytes=cr.SPLIT_BODY_BYTES):
        """Send each (name, request, status) row on a connection of its own (request: raw HTTP
        bytes, or a body to POST to /v1/messages): each gets its status in Anthropic's envelope,
        a connection left open still serves a valid request, the router answers the next
        client and logs no error, and nothing refused reaches the model server."""
        upstream = FakeUpstream(self)
        self.start(upstream).split_body_bytes = split_body_bytes
        followed = 0
        valid = json.dumps(request(user(text("still there?")))).encode()
        for name, data, expected in rows:
            if not isinstance(data, bytes):
                data = json.dumps(data).encode()
                data = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n" \
                       b"\r\n%s" % (len(data), data)
            with self.subTest(name), socket.create_connection(
                    ("127.0.0.1", self.router.server_port), TIMEOUT) as sock:
                sock.sendall(data)
                status, headers, body = read_response(sock)
                self.assertEqual(status, expected, body[:200])
                reply = json.loads(body)
                self.assertEqual(reply["type"], "error")
                self.assertEqual(reply["error"]["type"], cr.error_type(status))
                if headers.get("connection", "").lower() != "close":
                    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(valid), valid))
                    self.assertEqual(read_response(sock)[0], 200)
                    followed += 1
            self.assertEqual(self.call("GET", "/")[0], 200)
        self.assertEqual(self.router.errors, [])
        # Nothing refused reached the model server: only the valid requests (and the
        # router's own look at the model list) did.
        self.assertEqual([(m, p) for m, p, _, _ in upstream.requests if not p.endswith("/models")],
                         [("POST", "/v1/messages")] * followed)
        return upstream

    def test_every_malformed_request_gets_its_4xx_envelope_and_the_router_lives_on(self):
        rows = malformed_requests()
        self.assertGreaterEqual(len(rows), 100)
        self.assertRefused(rows)

    def test_every_malformed_request_read_as_a_big_body_gets_the_same_envelope(self):
        # A body over split_body_bytes is read as a SplitBody; here every body is.
        self.assertRefused([row for row in malformed_requests()
                            if not row[1].endswith(b"\r\n\r\n")], split_body_bytes=0)

    def test_image_data_is_checked_in_every_turn_before_it_is_spliced(self):
        # Base64 data beginning with http: skipped the check and was spliced unescaped,
        # so a client could add fields the upstream parsed; non-ASCII data after http:
        # got no answer at all (issue 11, section 3).
        upstream = self.assertRefused([
            ("injection", request(user(text("look"), image('http:", "injected": true, "x": "'))),
             400),
            ("non-ascii", request(user(image("http:\u00e9"))), 400),
            ("earlier turn", request(user(image("not base64!")), assistant(text("?")),
                                     user(text("go on"))), 400),
            ("tool_result", request(user(text("q")), assistant(tool_use("t1")),
                                    user(tool_result("t1", image("https://x/y.png")))), 400)])
        url = {"type": "image", "source": {"type": "url", "url": 'https://x/"a",%20"b":1.png'}}
        status, _, reply = self.post(request(user(text("see"), url)))
        self.assertEqual(status, 200, reply)
        self.assertEqual(upstream.posts()[-1]["messages"], [user(text("see"), url)])

    def test_body_shorter_than_its_content_length(self):
        self.start(FakeUpstream(self))
        with socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\"")
            sock.shutdown(socket.SHUT_WR)
            status, headers, body = read_response(sock)
        self.assertEnvelope(status, json.loads(body), 400, "invalid_request_error")

    def test_oversized_body_is_refused_before_it_is_read(self):
        self.start(FakeUpstream(self), max_body_bytes=1000)
        with socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 100)
            status, headers, body = read_response(sock)
        self.assertEnvelope(status, json.loads(body), 413, "request_too_large")
        self.assertEqual(headers["connection"], "close")

    def test_gigantic_strings_pass(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        status, _, _ = self.post(request(user(text("x" * 5_000_000))))
        self.assertEqual(status, 200)
        self.assertEqual(len(upstream.posts()[-1]["messages"][0]["content"][0]["text"]), 5_000_000)


class AccessTest(RouterTestCase):

    def test_token_is_required_and_never_forwarded_or_logged(self):
        upstream = FakeUpstream(self)
        self.start(upstream, token="s3cret-token")
        body = request(user(text("hi")))
        rows = [({}, 401), ({"x-api-key": "wrong"}, 401), ({"Authorization": "Bearer nope"}, 401),
                ({"x-api-key": "s3cret-token"}, 200),
                ({"Authorization": "Bearer s3cret-token"}, 200)]
        for headers, expected in rows:
            with self.subTest(headers=headers):
                status, _, reply = self.post(body, headers=headers)
                self.assertEqual(status, expected)
                if expected == 401:
                    self.assertEnvelope(status, reply, 401, "authentication_error")
        self.assertEqual(len(upstream.posts()), 2)
        for _, _, headers, _ in upstream.requests:
            self.assertNotIn("s3cret-token", json.dumps(headers))
        self.assertNotIn("s3cret-token", self.log.getvalue())

    def test_foreign_host_and_origin_are_refused(self):
        self.start(FakeUpstream(self))
        rows = [({"Host": "evil.example:3000"}, 403), ({"Host": "localhost:3000"}, 200),
                ({"Host": "[::1]:3000"}, 200), ({"Origin": "http://evil.example"}, 403),
                ({"Origin": "http://127.0.0.1:3000"}, 200), ({"Origin": "null"}, 403)]
        for headers, expected in rows:
            with self.subTest(headers=headers):
                status, _, reply = self.post(request(user(text("hi"))), headers=headers)
                self.assertEqual(status, expected, reply)

    def test_with_a_token_lan_clients_may_name_the_machine_as_they_like(self):
        self.start(FakeUpstream(self), token="s3cret")
        rows = [({"Host": "192.168.1.20:3000", "x-api-key": "s3cret"}, 200),
                ({"Host": "[fe80::1]:3000", "Authorization": "Bearer s3cret"}, 200),
                ({"Host": "studio.local:3000", "x-api-key": "s3cret"}, 200),
                ({"Host": "192.168.1.20:3000"}, 401), ({"Host": "192.168.1.20:3000",
                                                       "x-api-key": "s3cret\u00e9"}, 401)]
        for headers, expected in rows:
            with self.subTest(headers=headers):
                status, _, reply = self.post(request(user(text("hi"))), headers=headers)
                self.assertEqual(status, expected, reply)


class HeadReadingTest(RouterTestCase):
    """A head read over the wire, taken whole (split_head) or a line at a time (HeadLines)."""

    def test_a_head_in_one_read_and_one_read_a_line_at_a_time_pass_the_same_headers(self):
        # A head all at hand is taken in one piece, without http.client's email parser; a
        # longer one (over MAX_HEAD_LINE in all) can never be, and is read a line at a time.
        upstream = FakeUpstream(self)
        self.start(upstream)
        fields = (b"Host: 127.0.0.1\r\nX-Spaces: \t a b \t\r\nx-MiXed: a:b\nX-Latin: caf\xe9\r\n"
                  b"X-Empty:\r\n")
        long = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(9))
        for name, pad in (("whole", b""), ("line by line", long)):
            with self.subTest(name):
                sock = self.raw_socket()
                sock.sendall(b"GET /api/tags HTTP/1.1\r\n" + fields + pad + b"\r\n")
                self.assertEqual(read_response(sock)[0], 404)   # the fake's answer, relayed
                method, path, headers, _ = upstream.requests[-1]
                self.assertEqual((method, path), ("GET", "/api/tags"))
                self.assertEqual({k: headers[k] for k in ("X-Spaces", "x-MiXed", "X-Latin", "X-Empty")},
                                 {"X-Spaces": "a b \t", "x-MiXed": "a:b", "X-Latin": "caf\xe9",
                                  "X-Empty": ""})
                self.assertEqual(len(headers), 6 + len(pad) // 8000)    # and Accept-Encoding

    def test_a_head_trickled_a_byte_at_a_time_gets_408_by_its_deadline(self):
        # Each byte came before the stall timeout, so such a head held its thread for as long
        # as the client liked (issue 14, section 4).
        self.start(FakeUpstream(self))
        self.router.request_timeout = 0.5
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        # select is the pace: a byte every 0.05 s until the router answers (or TIMEOUT).
        while not select.select([sock], [], [], 0.05)[0] and time.monotonic() - started < TIMEOUT:
            sock.sendall(b"a")
        status, headers, body = read_response(sock)
        self.assertEnvelope(status, json.loads(body), 408)
        self.assertLess(time.monotonic() - started, 3.0)       # the trickle ran on for 5 s
        self.assertEqual(headers["connection"], "close")


################ Reading requests: validation

class ValidationTest(unittest.TestCase):
    """The pure checks of a request's fields (malformed bodies over the wire:
    MalformedInputTest)."""

    def test_base64_check(self):
        rows = [(PNG_A, True), ("YWJj", True), ("YWI=", True), ("YQ==", True), ("", True),
                ("abc", False), ("a===", False), ("YW=j", False), ("YWJj\n", False),
                ("YW Jj", False), ("\u00e9\u00e9\u00e9\u00e9", False), ("YQ=\u00e9", False)]
        long = "YWJj" * cr.TEXT_SLICE      # checked a slice at a time: each slice counts
        rows += [(long, True), (long + "YQ==", True), (long[:-4] + "YQ=j", False),
                 (long[:cr.TEXT_SLICE - 1] + "=" + long[cr.TEXT_SLICE:], False),
                 (long[:cr.TEXT_SLICE] + "!" + long[cr.TEXT_SLICE + 1:], False)]
        for data, expected in rows:
            with self.subTest(data=data[:10]):
                self.assertEqual(cr.is_base64(data), expected)


################ Reading requests: what is new

def cc_request(turns=4, prompt="fix the bug"):
    """A request shaped like Claude Code's: system blocks with the billing line, custom and
    server tools, its environment as a system message, tool calls, thinking, tool results."""
    tools = [{"name": "Tool%d" % i, "description": "does thing %d" % i, "input_schema": {
        "type": "object", "properties": {"path": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["path"], "additionalProperties": False}} for i in range(4)]
    messages = [user(reminder("attribution"), text("start")), system_message("cwd: /p\ndate")]
    for i in range(turns):
        messages += [assistant({"type": "thinking", "thinking": "hmm %d" % i, "signature": "s"},
                               text("step %d" % i), tool_use("t%d" % i, "Tool%d" % (i % 4))),
                     user({**tool_result("t%d" % i, text("result %d \u00e9\u4e2d" % i)),
                           "cache_control": {"type": "ephemeral"}})]
    messages += [assistant(text("done?")), user(text(prompt))]
    system = [text("x-anthropic-billing-header: cc_version=2.1"), text("You are Claude Code."),
              {**text("Be brief. " * 50), "cache_control": {"type": "ephemeral"}}]
    return request(*messages, system=system, stream=True, temperature=1, top_p=0.5,
                   tools=tools + [{"type": "web_search_20250305", "name": "web_search"}],
                   metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 9})


def read_outcome(read, text):
    """What a request's text becomes read by read (parse_json_body, or a RequestParts' read):
    (its body, its checked_request) as JSON, or its ProxyError; and the parts to remember."""
    try:
        body, parts = read(text)
    except cr.ProxyError as e:
        return ("refused", e.status, str(e)), {}
    try:
        clean = cr.checked_request(body, cr.REQUEST_FIELDS, parts)
    except cr.ProxyError as e:
        return ("read", json.dumps(body), "refused", e.status, str(e)), {}
    return ("read", json.dumps(body), json.dumps(clean)), parts


def nested(depth):
    """A JSON text of objects nested depth deep."""
    return '{"a": ' * depth + "1" + "}" * depth


def edited(rng, body):
    """The JSON text of body with one random edit: valid or not, nearly the same or not."""
    def at(pattern):
        spots = [m.start() for m in re.finditer(pattern, whole)] or [1]
        return rng.choice(spots)
    messages = body["messages"]
    whole = json.dumps(body)
    i = rng.randrange(len(messages))
    pos = at(r'[a-z ]')
    kind = rng.randrange(14)
    if kind == 0:       # the newest message's text changes
        return json.dumps({**body, "messages": messages[:-1] + [user(text(str(rng.random())))]})
    if kind == 1:       # one character somewhere (mostly inside a string) changes
        return whole[:pos] + rng.choice('x"\\{},: \x01\u00e9\ud800]1') + whole[pos + 1:]
    if kind == 2:       # a key given twice, at the top or inside
        spot = rng.choice([0] + [m.start() for m in re.finditer(r"\{", whole)][:40])
        return whole[:spot + 1] + rng.choice(['"messages": [], ', '"role": "user", ',
                                              '"model": 1, ']) + whole[spot + 1:]
    if kind == 3:       # blanks, allowed or not, between tokens
        spot = at(r"[,:\[{]") + 1
        return whole[:spot] + rng.choice([" ", "\n\t", "\r\n  ", "\x0b", "\u00a0"]) + whole[spot:]
    if kind == 4:
        return json.dumps({**body, "messages": messages[:i] + messages[i + 1:]})
    if kind == 5:
        new = rng.choice([user(text("new")), assistant(text("a")), system_message("s")])
        return json.dumps({**body, "messages": messages[:i] + [new] + messages[i:]})
    if kind == 6:       # no object, or not the whole text
        return rng.choice(["[%s]" % whole, json.dumps(messages[i]), "null", '"x"', whole + " x",
                           whole + "}", " \n" + whole + "\t", "\ufeff" + whole, ""])
    if kind == 7:
        return whole[:rng.randrange(len(whole))]
    if kind == 8:       # numbers beyond what a model server reads
        number = rng.choice(["1e400", "-1e999", "123456789012345678901234", "1.5", "NaN",
                             "Infinity", "-0", "9223372036854775808", "9223372036854775807"])
        return whole.replace('"max_tokens": 32000', '"max_tokens": ' + number) if rng.random() < .5 \
            else whole.replace('"n": {', '"n": %s, "m": {' % number, 1)
    if kind == 9:       # nesting near the bound, in a new message or an old one
        deep = nested(rng.choice([96, 97, 98, 99, 100, 150, 3000]))
        return whole.replace('"input": {"file_path": "/x.png"}', '"input": %s' % deep,
                             rng.choice([1, 2]))
    if kind == 10:      # a message the checks refuse
        bad = rng.choice([{"role": "bot", "content": "x"}, {"content": "x"}, user({"text": "t"}),
                          user(image("not base64")), user(tool_result("t", tool_result("u"))), 7])
        return json.dumps({**body, "messages": messages[:i] + [bad] + messages[i + 1:]})
    if kind == 11:      # every part as JavaScript writes it: no blanks
        return json.dumps(body, separators=(",", ":"))
    if kind == 12:      # the top-level fields in another order, some of another type
        fields = list(body.items())
        rng.shuffle(fields)
        return json.dumps(dict(fields, **rng.choice([{}, {"tools": {}}, {"system": 5},
                                                     {"messages": {}}, {"messages": []}])))
    return whole.replace("cwd: /p", "cwd: /q")     # the system message changes


class RequestPartsTest(unittest.TestCase):
    """RequestParts reads what recent requests sent again as it read it then: the same body,
    checked and cleaned, or the same refusal; only what is new is parsed."""

    def test_random_edits_read_as_json_loads_reads_them(self):
        memo, rng = cr.RequestParts(), random.Random(14)
        bodies = [cc_request(), cc_request(turns=6), cc_request(turns=2, prompt="other")]
        for body in bodies:     # warm: every part of these has been read and checked
            outcome, parts = read_outcome(memo.read, json.dumps(body))
            memo.remember(parts)
        for n in range(400):
            body = rng.choice(bodies)
            text_ = edited(rng, body)
            if n % 3 == 0:      # an edit of an edit
                text_ = edited(rng, json.loads(text_)) if is_plain_request(text_) else text_
            with self.subTest(n=n, text=text_[:80]):
                warm, parts = read_outcome(memo.read, text_)
                self.assertEqual(warm, read_outcome(lambda t: (cr.parse_json_body(t), None),
                                                    text_)[0])
                memo.remember(parts)
        self.assertGreater(memo.reused, 1000)
        self.assertGreater(memo.parsed, 100)
        self.assertEqual(kept_mismatches(memo), [])

    def test_an_unchanged_history_is_reused_and_a_changed_message_read_anew(self):
        memo = cr.RequestParts()
        first = cc_request(turns=3)
        body, parts = memo.read(json.dumps(first))
        cr.checked_request(body, cr.REQUEST_FIELDS, parts)
        memo.remember(parts)
        self.assertEqual((memo.reused, memo.parsed), (0, 2 + len(first["messages"])))
        second = {**first, "messages": first["messages"] + [assistant(text("ok")),
                                                            user(text("next"))]}
        again, _ = memo.read(json.dumps(second))
        self.assertEqual((memo.reused, memo.parsed), (2 + len(first["messages"]),
                                                      2 + len(first["messages"]) + 2))
        self.assertIs(again["system"], body["system"])
        self.assertIs(again["tools"], body["tools"])
        self.assertTrue(all(a is b for a, b in zip(again["messages"], body["messages"])))
        changed = copy.deepcopy(second)
        changed["messages"][3]["content"][0]["text"] = "step 0, changed"
        third, parts = memo.read(json.dumps(changed))
        self.assertIsNot(third["messages"][3], body["messages"][3])
        self.assertEqual(third["messages"][3], changed["messages"][3])
        self.assertEqual([i for i, (a, b) in enumerate(zip(third["messages"], body["messages"]))
                          if a is not b], [3])
        # Not checked yet: a refused request leaves nothing behind to be taken as checked.
        self.assertFalse(parts[id(third["messages"][3])].checked)
        self.assertTrue(parts[id(third["messages"][4])].checked)

    def test_a_refused_request_leaves_nothing_taken_as_checked(self):
        memo = cr.RequestParts()
        bad = cc_request()
        bad["messages"][3]["content"].append(image("not base64!"))
        for _ in range(2):
            with self.assertRaisesRegex(cr.ProxyError, "^messages.3.content.1.source: "):
                body, parts = memo.read(json.dumps(bad))
                memo.remember(parts)    # as a careless caller would: nothing is checked
                cr.checked_request(body, cr.REQUEST_FIELDS, parts)
        self.assertEqual(memo.places, {})

    def test_a_part_sent_on_as_read_is_encoded_once(self):
        memo, encoded_parts, sent = cr.RequestParts(), cr.EncodedParts(), []
        first = cc_request(turns=3)
        for body in (first, {**first, "messages": first["messages"] + [
                assistant(text("ok"), tool_use("t9")), user(tool_result("t9", text("r")))]}):
            read, parts = memo.read(json.dumps(body))
            clean = cr.checked_request(read, cr.REQUEST_FIELDS, parts)
            memo.remember(parts)
            known = {id(p.clean): p for p in parts.values() if p.checked and p.clean}
            _, _, messages, _ = cr.route_request(clean, {}, {}, "V", "C", [])
            outgoing = {**clean, "messages": messages}
            encoded = cr.EncodedRequest(outgoing, {}, encoded_parts, known)
            plain = cr.EncodedRequest(outgoing, {})
            self.assertEqual((encoded.data(), encoded.prompt_parts()),
                             (plain.data(), plain.prompt_parts()))
            sent.append((messages, encoded))
        (old, before), (new, after) = sent
        # Folded already, an assistant message goes on as the same object, as every message
        # does but the first, which the environment message is merged into each turn: each
        # is found by its part, not looked up, and so are the system text and the tools.
        self.assertTrue(all(a is b for a, b in zip(old[1:], new[1:])))
        self.assertIs(after.fields["tools"], before.fields["tools"])
        self.assertTrue(all(a[0][0] is b[0][0] for a, b in zip(before.messages[1:],
                                                                after.messages[1:])))
        self.assertEqual({p.place for kept in memo.places.values() for p in kept
                          if p.encoded is None}, {("message", 0), ("message", 1)})

    def test_bounded_by_its_text_and_a_long_value_is_not_kept(self):
        memo = cr.RequestParts(max_chars=3000)
        for i in range(20):
            body, parts = memo.read(json.dumps(request(user(text("%d" % i + "x" * 100)),
                                                       assistant(text("y" * 900)))))
            cr.checked_request(body, cr.REQUEST_FIELDS, parts)
            memo.remember(parts)
            self.assertLessEqual(memo.size, 3000)
            self.assertEqual(memo.size, sum(p.cost for kept in memo.places.values()
                                            for p in kept))
        self.assertEqual(list(memo.places), [("message", 0)])   # 900 chars > 3000 / 8
        self.assertEqual(len(memo.places[("message", 0)]), cr.PLACE_CANDIDATES)

    def test_a_request_of_very_many_messages_or_fields_is_read_by_json_loads(self):
        # Read one by one, 300,000 tiny messages (9 MB) took 2.2 s of CPU and 250 MB, where
        # json.loads takes 0.3 s and 110 MB; 600,000 fields 2.0 s, where it takes 0.7.
        memo = cr.RequestParts()
        memo.max_messages, memo.max_keys = 50, 4
        for count, fields in ((50, {}), (51, {}), (50, {"stream": True}), (50, {"a": 1, "b": 2})):
            text_ = json.dumps(request(*[user(text("m"))] * count, **fields))
            body, parts = memo.read(text_)
            self.assertEqual(body, json.loads(text_))
            self.assertEqual(len(parts), 0 if count > 50 or len(fields) > 1 else 50)

    def test_bounded_by_its_values_too(self):
        # A block of 13 characters ({"type":"x"}) is a dict and a str as read and another
        # dict cleaned, ~450 bytes: kept by their text alone, such blocks held 24 bytes per
        # character of the bound, where Claude Code's text takes ~8 bytes a character.
        memo = cr.RequestParts(max_chars=60_000)
        tiny = user(*[{"type": "x"}] * 450)     # 6,750 characters: under max_chars / 8
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(12):     # at a new place each time, so that each is kept
            body, parts = memo.read(json.dumps(request(*[user(text("p"))] * i, tiny)))
            cr.checked_request(body, cr.REQUEST_FIELDS, parts)
            memo.remember(parts)
        del body, parts
        gc.collect()
        self.assertLessEqual(memo.size, memo.max_chars)
        self.assertLess(tracemalloc.get_traced_memory()[0] - before, 12 * memo.max_chars)


def is_plain_request(text_):
    """True when text_ is JSON whose object a further edit can take."""
    try:
        body = json.loads(text_)
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and isinstance(body.get("messages"), list) and \
        body["messages"] and "max_tokens" in body


def kept_mismatches(memo):
    """The places of memo's parts that are not what their text reads as now: a transform
    changed a shared value, or its cleaned form, in place."""
    cleaners = {("field", "system"): cr.clean_system, ("field", "tools"): cr.clean_tools}
    wrong = []
    for place, kept in memo.places.items():
        for part in kept:
            value = json.loads(part.span)
            clean = cleaners.get(place) or (cr.system_reminder if value["role"] == "system"
                                            else cr.clean_message)
            if json.dumps(part.value) != json.dumps(value) or \
                    json.dumps(part.clean) != json.dumps(clean(value)):
                wrong.append(place)
    return wrong


class PartsMutationTest(RouterTestCase):
    """Kept parts are shared by every later request that sends them: whatever a turn does
    with its request (documents, images described or sent, folding, merging, encoding,
    warm-up), they stay as read."""

    router_settings = {"warm": True}

    def test_two_turns_leave_kept_parts_as_read_and_send_what_a_new_router_sends(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        first = cc_request(turns=2)
        first["messages"] += [assistant(text("x")), assistant(text("more")), user(text("q")),
                              assistant(text("a"), tool_use("d1"), text("b"), tool_use("d2")),
                              user(tool_result("d1", image(PNG_A)), tool_result("d2", text("r")),
                                   text_document("notes"), image(PNG_B), text("look"))]
        second = {**first, "messages": first["messages"] + [
            assistant(text("seen")), system_message("## Exited Auto Mode"),
            user(text("and now"), {"type": "tool_reference", "tool_name": "Grep"})]}
        for body in (first, second):
            self.assertEqual(self.post(body)[0], 200)
            self.assertEqual(self.call("POST", "/v1/messages/count_tokens", body)[0], 200)
        self.assertGreater(self.router.request_parts.reused, len(first["messages"]))
        self.assertEqual(kept_mismatches(self.router.request_parts), [])
        turns = [raw for path, raw in upstream.raw if "count_tokens" not in path]
        self.router.request_parts = cr.RequestParts()      # a router that read nothing before
        self.assertEqual(self.post(second)[0], 200)
        self.assertEqual(upstream.raw[-1][1], turns[-1])



################ Big request bodies

RUN = base64.b64encode(bytes(range(256)) * 16).decode()     # 5,464 characters: cut out


def split_outcome(text_, size, read=None):
    """(The outcome of text_, bytes, read as a SplitBody fed size bytes at a time; whether
    whole() gave text_ back)."""
    body = cr.SplitBody()
    for i in range(0, len(text_), size):
        body.feed(text_[i:i + size])
    whole = body.whole() == text_
    read = read or (lambda t: (cr.parse_json_body(t), {}))
    try:
        outcome = read_outcome(lambda t: body.parse(read), None)[0]
    except UnicodeDecodeError:
        outcome = "not UTF-8"
    return outcome, whole


def whole_outcome(text_):
    """The outcome of text_, bytes, read whole."""
    try:
        decoded = text_.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return read_outcome(lambda t: (cr.parse_json_body(decoded), {}), None)[0]


class SplitBodyTest(RouterTestCase):
    """A big body read with its long base64 strings apart reads as the whole text does."""

    def test_texts_read_as_the_whole_text_reads_them_cut_anywhere(self):
        b = RUN.encode()
        texts = [
            json.dumps(request(user(image(RUN), text("x")))).encode(),     # cut out, put back
            json.dumps(request(user(image(RUN), image(RUN[:4096]), image(RUN[:4095])))).encode(),
            b'{"%s": 1, "messages": []}' % b,                          # a key: read whole
            b'{"messages": [], "a": "x\\"%s"}' % b,                    # after an escaped quote
            b'{"messages": [], "a": "%s", "a": 2}' % b,                # dropped by a second key
            b'{"messages": [], "a": "%s\u0041"}' % b,                 # an escape: not cut
            b'{"messages": [], "a": "%s\x01"}' % b,                   # a control character
            b'{"messages": [], "a": "%s\xc3\xa9"}' % b,              # then non-ASCII
            b'{"messages": [], "a": "%s"%s"}' % (b, b),               # no comma: not JSON
            b'"%s"' % b, b'["%s", "%s"]' % (b, b[:-4]), b'{"a": "%s' % b, b'{"a": "%s"' % b,
            b'{"messages": [], "a": "%s", "b": "\xff"}' % b,         # not UTF-8 elsewhere
            b'{"messages": [{"role": "user", "content": "%s"}], "max_tokens": 5}' % b,
            b'\xef\xbb\xbf{"messages": [], "a": "%s"}' % b,           # a BOM: refused whole too
            ('{"messages": [], "a": "%s"}' % RUN).encode("utf-16"),     # json.loads(bytes) reads it
            b'{"messages": [], "\xe2\x82\xac": "%s", "\xf0\x9f\x98\x80": 1}' % b,   # cut mid-character
            b'{"messages": [], "a": "%s", "a": "%s"}' % (b, b),          # one string twice
            b'{"messages": [], "a": "\\\\\\"%s"}' % b,                  # a run of backslashes
        ]
        for text_ in texts:
            expected = whole_outcome(text_)
            for size in (1, 7, 4096, 4097, 65536, len(text_)):
                with self.subTest(text=text_[:40], tail=text_[-20:], size=size):
                    self.assertEqual(split_outcome(text_, size), (expected, True))
        # The long string is cut out however the bytes come, and put back in its place.
        for size in (1, 4097, len(texts[0])):
            split = cr.SplitBody()
            for i in range(0, len(texts[0]), size):
                split.feed(texts[0][i:i + size])
            body, _ = split.parse(lambda t: (cr.parse_json_body(t), {}))
            self.assertEqual(len(split.strings), 1)
            self.assertIs(body["messages"][0]["content"][0]["source"]["data"], split.strings[0])

    def test_random_places_read_as_the_whole_text_reads_them(self):
        rng = random.Random(5)
        bodies = [cc_request(), request(user(image(RUN), text("look"))), [1, "x"]]
        for n in range(200):
            whole = json.dumps(rng.choice(bodies)).encode()
            for _ in range(rng.randrange(1, 3)):
                at = rng.randrange(len(whole) + 1)
                whole = whole[:at] + rng.choice((b'"%s"' % RUN.encode(), RUN.encode(),
                                                 b'"%s' % RUN.encode())) + whole[at:]
            size = rng.choice((7, 100, 4096, 5000, 65536))
            with self.subTest(n=n):
                self.assertEqual(split_outcome(whole, size, cr.RequestParts().read),
                                 (whole_outcome(whole), True))

    def test_a_body_sent_a_few_bytes_at_a_time_is_held_once(self):
        # Each read was fed as it came: a body read 16 bytes at a time held an object per
        # read: 3.6 times its size in text, 9 in a long string (3 bytes: 14 and 42).
        class Trickle(io.RawIOBase):
            """A client's bytes, 16 at a time (a client that sends them so)."""
            def __init__(self, data):
                self.data = memoryview(data)

            def readable(self):
                return True

            def readinto(self, buffer):
                size = min(16, len(buffer), len(self.data))
                buffer[:size], self.data = self.data[:size], self.data[size:]
                return size

        sock = socket.socket()
        self.addCleanup(sock.close)
        for data in ('"%s"' % ("word " * 30000), json.dumps([RUN * 27, "word " * 1000])):
            data = data.encode()
            tracemalloc.start()
            try:
                body = cr.read_split(io.BufferedReader(Trickle(data)), sock, len(data), TIMEOUT)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertEqual(body.whole(), data)
            self.assertLess(peak, 3 * len(data))

    def test_a_big_turn_sends_what_a_small_one_would_and_keeps_no_image(self):
        upstream = FakeUpstream(self)
        big = base64.b64encode(bytes(range(256)) * 3000).decode()      # 1 MB of base64
        body = request(user(text("look"), image(big)), assistant(tool_use("t1")),
                       user(tool_result("t1", image(big[:-8])), text("and this")))
        routers = []
        for split_body_bytes in (cr.SPLIT_BODY_BYTES, len(json.dumps(body))):
            self.cache_dir = tempfile.mkdtemp()     # a router that has not seen the images
            self.addCleanup(shutil.rmtree, self.cache_dir, True)
            routers.append(self.start(upstream))
            self.router.split_body_bytes = split_body_bytes
            self.assertEqual(self.post(body)[0], 200)
        self.assertEqual(upstream.raw[0][1], upstream.raw[1][1])
        self.assertIn(big[:-8].encode(), upstream.raw[0][1])
        kept = routers[0].request_parts.places.values()
        self.assertTrue(kept)
        self.assertFalse(any(big[:100] in json.dumps(part.value) for parts in kept
                             for part in parts))
        self.router = routers[0]
        status, _, _ = self.call("POST", "/v1/other", body)     # passed on as it came
        self.assertEqual(status, 200)
        self.assertEqual(upstream.raw[-1], ("/v1/other", json.dumps(body).encode()))


################ Request transforms

class CleanRequestTest(unittest.TestCase):

    def test_system_messages_become_reminders_and_system_stays_as_sent(self):
        env = {"role": "system", "content": [{"type": "text", "text": "env",
                                              "cache_control": {"type": "ephemeral"}}],
               "output_config": {"effort": "high"}}
        rows = [
            ("before the first reply: start of the first user message",
             [user(text("hi")), env], [user(reminder("env"), text("hi"))]),
            ("string and list read the same", [user(text("hi")), system_message("env")],
             [user(reminder("env"), text("hi"))]),
            ("several blocks are one reminder",
             [system_message([text("a"), text("b")]), user(text("hi"))],
             [user(reminder("a\n\nb"), text("hi"))]),
            ("empty is dropped", [user(text("hi")), system_message([])], [user(text("hi"))]),
            ("later ones stay in place and merge",
             [user(text("q")), assistant(tool_use("t1")), user(tool_result("t1", text("r"))),
              system_message("<total_tokens>9 tokens left</total_tokens>"), assistant(text("a")),
              system_message("## Exited Auto Mode"), user(text("next"))],
             [user(text("q")), assistant(tool_use("t1")),
              user(tool_result("t1", text("r")), reminder("<total_tokens>9 tokens left</total_tokens>")),
              assistant(text("a")), user(reminder("## Exited Auto Mode"), text("next"))]),
            ("last message", [user(text("q")), assistant(text("a")), user(text("b")),
                              system_message("mode")],
             [user(text("q")), assistant(text("a")), user(text("b"), reminder("mode"))]),
            ("after a compaction",
             [{"role": "user", "content": "summary"}, system_message("date"),
              assistant(text("a")), user(text("b")), system_message("env")],
             [user(reminder("date"), text("summary")), assistant(text("a")),
              user(text("b"), reminder("env"))]),
            ("no user message yet", [system_message("env")], [user(reminder("env"))]),
        ]
        for name, messages, expected in rows:
            with self.subTest(name):
                body = request(*messages, system=[text("x-anthropic-billing-header: 1"),
                                                  text("top")])
                clean = cr.clean_request(body)
                self.assertEqual(clean["system"], [text("top")])
                self.assertEqual(cr.fix_message_alternation(clean["messages"]), expected)
                counted = cr.clean_request(body, cr.COUNT_TOKENS_FIELDS)
                self.assertEqual(counted["messages"], clean["messages"])

    def test_billing_block_is_removed(self):
        body = request(user(text("hi")), system=[
            text("x-anthropic-billing-header: cc_version=2.1.332.abc; cc_entrypoint=sdk-cli;"),
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}])
        self.assertEqual(cr.clean_request(body)["system"], [text("You are Claude Code.")])

    def test_fields_local_servers_reject_are_dropped(self):
        body = request(user({"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}),
                       thinking={"type": "adaptive"}, context_management={"edits": []},
                       output_config={"effort": "high"}, metadata={"user_id": "u"},
                       safeguards=[{}], stream=True, temperature=0.5,
                       tools=[{"name": "Read", "description": "d", "input_schema": {},
                               "cache_control": {"type": "ephemeral"}},
                              {"name": "Later", "input_schema": {}, "defer_loading": True},
                              {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
                       tool_choice={"type": "auto"})
        self.assertEqual(cr.clean_request(body), {
            "model": "claude-opus-5-5", "max_tokens": 32000, "stream": True, "temperature": 0.5,
            "messages": [user(text("hi"))], "tool_choice": {"type": "auto"},
            "tools": [{"name": "Read", "description": "d", "input_schema": {}},
                      {"name": "Later", "input_schema": {}}]})

    def test_tool_choice_goes_with_the_last_tool(self):
        body = request(user(text("q")), tool_choice={"type": "auto"},
                       tools=[{"type": "web_search_20250305", "name": "web_search"}])
        self.assertNotIn("tool_choice", cr.clean_request(body))
        self.assertNotIn("tools", cr.clean_request(body))

    def test_blocks_are_cleaned(self):
        rows = [
            ("thinking dropped", assistant({"type": "thinking", "thinking": "hm", "signature": ""},
                                           text("a")), assistant(text("a"))),
            ("redacted dropped", assistant({"type": "redacted_thinking", "data": "x"}, text("a")),
             assistant(text("a"))),
            ("tool_reference to text", user(tool_result("t1", {"type": "tool_reference",
                                                               "tool_name": "WebFetch"})),
             user(tool_result("t1", text("Tool loaded: WebFetch")))),
            ("message-level output_config dropped, string content as blocks",
             {"role": "user", "content": "hi", "output_config": {"effort": "high"}},
             user(text("hi"))),
            # The same message as a string on one turn and as blocks on the next (a --bare
            # follow-up) must go upstream the same way both times, or the prefix moves.
            ("blocks stay blocks", user(text("hi")), user(text("hi"))),
        ]
        for name, message, expected in rows:
            with self.subTest(name):
                got = cr.clean_request(request(user(text("first")), message))["messages"]
                self.assertEqual(got[-1], expected)

    def test_message_left_empty_is_dropped(self):
        body = request(user(text("q")), assistant({"type": "thinking", "thinking": "x"}),
                       user(text("r")))
        self.assertEqual(cr.clean_request(body)["messages"], [user(text("q")), user(text("r"))])

    def test_count_tokens_keeps_only_its_fields(self):
        body = request(user(text("q")), system="s", stream=True)
        self.assertEqual(set(cr.clean_request(body, cr.COUNT_TOKENS_FIELDS)),
                         {"model", "messages", "system"})


class ImageTransformTest(unittest.TestCase):

    def keys(self, *messages):
        return cr.image_keys(list(messages))

    def test_image_identity_is_sha256_of_data_or_url(self):
        url_image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
        keys = cr.image_keys([user(image(PNG_A), tool_result("t", url_image))])
        self.assertEqual(keys, {PNG_A: key(PNG_A), "https://x/y.png": key("https://x/y.png")})
        long = "YWJj" * cr.TEXT_SLICE + "\u00e9"       # hashed a slice at a time
        self.assertEqual(cr.image_keys([user(image(long))]), {long: key(long)})

    def test_new_images_are_those_of_the_users_turn_without_description(self):
        rows = [
            ("pasted", [user(text("look"), image(PNG_A))], {}, [key(PNG_A)]),
            ("in tool_result", [user(text("q")), assistant(tool_use("t1")),
                                user(tool_result("t1", image(PNG_B)))], {}, [key(PNG_B)]),
            ("described already", [user(image(PNG_A))], {key(PNG_A): "a"}, []),
            ("earlier turn only", [user(image(PNG_A)), assistant(text("ok")), user(text("and?"))],
             {}, []),
            ("image then trailing text message", [user(image(PNG_C)), user(text("what is it"))],
             {}, [key(PNG_C)]),
            ("duplicates once", [user(image(PNG_A), image(PNG_A), image(PNG_B))], {},
             [key(PNG_A), key(PNG_B)]),
        ]
        for name, messages, known, expected in rows:
            with self.subTest(name):
                keys = cr.image_keys(messages)
                self.assertEqual(cr.new_image_keys(messages, keys, known), expected)

    def test_substitution_uses_descriptions_markers_and_does_not_repeat(self):
        messages = [user(text("see"), image(PNG_A), image(PNG_B)), assistant(text("ok")),
                    user(tool_result("t1", image(PNG_C), text("done")))]
        known = {key(PNG_A): "a red square", key(PNG_B): "a red square"}
        got, n = cr.substitute_images_with_descriptions(messages, cr.image_keys(messages), known)
        self.assertEqual(n, 2)
        self.assertEqual(got, [
            user(text("see"), text("<<IMAGE DESCRIPTION: a red square>>"),
                 text(cr.SAME_DESCRIPTION_MARKER)),
            assistant(text("ok")),
            user(tool_result("t1", text("<<IMAGE: binary image file>>"), text("done")))])

    def test_substitution_keeps_the_images_asked_for(self):
        messages = [user(image(PNG_A)), assistant(text("ok")), user(image(PNG_B))]
        got, n = cr.substitute_images_with_descriptions(
            messages, cr.image_keys(messages), {key(PNG_A): "old"}, keep={key(PNG_B)})
        self.assertEqual((got[0]["content"], got[2]["content"], n),
                         ([text("<<IMAGE DESCRIPTION: old>>")], [image(PNG_B)], 1))

    def test_rewrite_for_vision_lifts_tool_result_images(self):
        rows = [
            ("only a tool_result",
             [assistant(tool_use("t1")), user(tool_result("t1", image(PNG_A)))],
             [assistant(tool_use("t1")), user(tool_result("t1", text(cr.LIFTED_IMAGE_TEXT))),
              assistant(text(cr.SYNTHETIC_ASSISTANT_TEXT)),
              user(image(PNG_A), text(cr.SYNTHETIC_USER_TEXT))]),
            ("with text beside and after",
             [assistant(tool_use("t1"), tool_use("t2")),
              user(tool_result("t1", text("file"), image(PNG_A)), tool_result("t2", text("ok")),
                   text("what is wrong?"))],
             [assistant(tool_use("t1"), tool_use("t2")),
              user(tool_result("t1", text("file"), text(cr.LIFTED_IMAGE_TEXT)),
                   tool_result("t2", text("ok"))),
              assistant(text(cr.SYNTHETIC_ASSISTANT_TEXT)),
              user(image(PNG_A), text("what is wrong?"))]),
            ("pasted images stay", [user(text("see"), image(PNG_A))],
             [user(text("see"), image(PNG_A))]),
        ]
        for name, messages, expected in rows:
            with self.subTest(name):
                self.assertEqual(cr.rewrite_for_vision(messages), expected)

    def test_normalize_folds_interleaved_assistant_text(self):
        rows = [
            ("interleaved", assistant(text("a"), tool_use("1"), text("b"), tool_use("2")),
             assistant(text("a\n\nb"), tool_use("1"), tool_use("2"))),
            ("tool_use only", assistant(tool_use("1")), assistant(tool_use("1"))),
            ("no tools untouched", assistant(text("a"), text("b")), assistant(text("a"), text("b"))),
            ("string untouched", {"role": "assistant", "content": "a"},
             {"role": "assistant", "content": "a"}),
        ]
        for name, message, expected in rows:
            with self.subTest(name):
                self.assertEqual(cr.normalize_assistant_messages([message]), [expected])

    def test_alternation_merges_same_role_runs(self):
        rows = [
            ("string and list", [{"role": "user", "content": "reminder"}, user(image(PNG_A))],
             [user(text("reminder"), image(PNG_A))]),
            ("tool results first", [user(text("note")), user(tool_result("t", text("r")))],
             [user(tool_result("t", text("r")), text("note"))]),
            ("assistants", [assistant(text("a")), assistant(text("b"))],
             [assistant(text("a"), text("b"))]),
            ("alternating untouched", [user(text("a")), assistant(text("b"))],
             [user(text("a")), assistant(text("b"))]),
        ]
        for name, messages, expected in rows:
            with self.subTest(name):
                self.assertEqual(cr.fix_message_alternation(messages), expected)

    def test_no_transform_mutates_its_input(self):
        body = request({"role": "system", "content": "env"},
                       user(text("q"), image(PNG_A)), assistant(text("a"), tool_use("t1"),
                                                                text("b"), tool_use("t2")),
                       user(tool_result("t1", image(PNG_B)), tool_result("t2", text("x"))),
                       user(text("more")), system=[text("x-anthropic-billing-header: 1"), text("s")],
                       thinking={"type": "adaptive"})
        before = copy.deepcopy(body)
        clean = cr.clean_request(body)
        keys = cr.image_keys(clean["messages"])
        for new in ([], [key(PNG_B)]):
            cr.route_request(clean, keys, {key(PNG_A): "d"}, "v", "c", new)
        cr.EncodedRequest(clean, keys).clamp(100)
        self.assertEqual(body, before)

    def test_transforms_leave_no_reference_cycles(self):
        # A cycle kept each request's screenshots alive until the cyclic GC ran: the
        # router grew by the body's size per request (bench RSS 85 MiB after the big phase).
        # Only garbage that is ours counts (the router's functions, or anything holding
        # this test's own image strings): earlier tests leave thread locks and events
        # for the collector, and those must not decide this test.
        pngs = [base64.b64encode(os.urandom(48)).decode() for _ in range(3)]
        body = request({"role": "system", "content": "env"}, user(text("q"), image(pngs[0])),
                       assistant(text("a"), tool_use("t1"), text("b")),
                       user(tool_result("t1", image(pngs[1]), text("x")), image(pngs[2])))
        ours = {id(p) for p in pngs}
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            clean = cr.clean_request(body)
            keys = cr.image_keys(clean["messages"])
            for new in ([], [key(pngs[1])]):
                route = cr.route_request(clean, keys, {key(pngs[0]): "d"}, "V", "C", new)
                data = cr.EncodedRequest({**clean, "messages": route[2]}, keys).data()
                joined(data)
            del clean, keys, route, data
            gc.collect()
            garbage = [o for o in gc.garbage
                       if getattr(getattr(o, "__code__", None), "co_filename", "") == cr.__file__
                       or any(id(r) in ours for r in gc.get_referents(o))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        self.assertEqual(garbage, [])

    def test_route_request(self):
        body = cr.clean_request(request(user(text("q"), image(PNG_A))))
        keys = cr.image_keys(body["messages"])
        self.assertEqual(cr.route_request(body, keys, {}, "V", "C", [key(PNG_A)])[:2], ("vision", "V"))
        route = cr.route_request(body, keys, {key(PNG_A): "d"}, "V", "C", [])
        self.assertEqual(route[:2] + (route[3],), ("coder", "C", 1))


################ Description cache

class CacheTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.log = capture_log(self)

    def lines(self):
        with open(os.path.join(self.dir, cr.CACHE_FILE), "rb") as f:
            return [json.loads(line) for line in f]

    def test_entries_survive_a_new_cache_on_the_same_dir(self):
        cache = cr.DescriptionCache(self.dir)
        cache.store({"k1": "one", "k2": "two"}, "V")
        again = cr.DescriptionCache(self.dir)
        self.assertEqual(again.load(), 2)
        self.assertEqual(again.lookup(["k1", "k2", "k3"]), {"k1": "one", "k2": "two"})
        self.assertEqual((again.hits, again.misses), (2, 1))
        self.assertEqual({line["model"] for line in self.lines()}, {"V"})

    def test_any_text_a_model_sends_is_stored_and_read_back(self):
        # A lone surrogate arrives as "\ud800" in a model's JSON and has no UTF-8 form.
        texts = {"k1": "naïve 漢字 ✓", "k2": "broken \ud800 pair", "k3": "quote \" and \\n"}
        cache = cr.DescriptionCache(self.dir)
        cache.store(texts, "V")
        again = cr.DescriptionCache(self.dir)
        self.assertEqual(again.load(), 3)
        self.assertEqual(again.lookup(list(texts)), texts)

    def test_torn_and_corrupt_lines_are_skipped(self):
        cr.DescriptionCache(self.dir).store({"k1": "one"}, "V")
        with open(os.path.join(self.dir, cr.CACHE_FILE), "ab") as f:
            f.write(b'\xff\xfegarbage\n{"hash": 5, "description": "x"}\n[]\n{"hash": "k2", "desc')
        cache = cr.DescriptionCache(self.dir)
        self.assertEqual(cache.load(), 1)
        # The last line has no newline: another router may be writing it still.
        self.assertIn("skipped 3 unreadable line(s)", self.log.getvalue())
        cache.store({"k3": "three"}, "V")      # starts on a fresh line after the torn one
        self.assertEqual(cr.DescriptionCache(self.dir).load(), 2)
        self.assertIn("skipped 4 unreadable line(s)", self.log.getvalue())

    def test_bounded_with_oldest_evicted_and_file_rewritten(self):
        cache = cr.DescriptionCache(self.dir, max_entries=3)
        for i in range(7):
            cache.store({"k%d" % i: "d%d" % i}, "V")
        self.assertEqual(list(cache.entries), ["k4", "k5", "k6"])
        self.assertLessEqual(len(self.lines()), 3 * cr.CACHE_REWRITE_FACTOR)
        again = cr.DescriptionCache(self.dir, max_entries=3)
        again.load()
        self.assertEqual(list(again.entries), ["k4", "k5", "k6"])

    def test_two_caches_and_twenty_threads_lose_nothing(self):
        first, second = cr.DescriptionCache(self.dir), cr.DescriptionCache(self.dir)
        start = threading.Barrier(20)

        def store(i):
            start.wait(TIMEOUT)
            for j in range(25):
                (first if i % 2 else second).store({"k%d-%d" % (i, j): "x" * (i * 100 + j)}, "V")

        threads = [threading.Thread(target=store, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertEqual(len(self.lines()), 500)
        self.assertEqual(cr.DescriptionCache(self.dir).load(), 500)

    def test_two_caches_rewriting_keep_each_others_entries(self):
        first = cr.DescriptionCache(self.dir, max_entries=100)
        second = cr.DescriptionCache(self.dir, max_entries=100)
        for i in range(150):
            (first if i % 2 else second).store({"k%d" % i: "d"}, "V")
        reader = cr.DescriptionCache(self.dir, max_entries=100)
        reader.load()
        self.assertEqual(list(reader.entries), ["k%d" % i for i in range(50, 150)])

    def test_rewrite_keeps_the_file_private_and_every_field(self):
        # The first rewrite made the file, which holds screenshot text verbatim,
        # world-readable, and dropped each line's model and time.
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        cache = cr.DescriptionCache(self.dir, max_entries=3)
        for i in range(3 * cr.CACHE_REWRITE_FACTOR):
            cache.store({"k%d" % i: "d%d" % i}, "V%d" % i)
        lines = self.lines()
        self.assertEqual([line["hash"] for line in lines], ["k3", "k4", "k5"])  # rewritten
        self.assertEqual(os.stat(os.path.join(self.dir, cr.CACHE_FILE)).st_mode & 0o777, 0o600)
        for i, line in enumerate(lines, 3):
            self.assertEqual((line["description"], line["model"]), ("d%d" % i, "V%d" % i))
            self.assertIsInstance(line["time"], float)

    def test_two_caches_see_each_others_new_descriptions(self):
        # Routers sharing a directory read only at startup, so each described the
        # same screenshot again.
        first, second = cr.DescriptionCache(self.dir, max_entries=3), cr.DescriptionCache(self.dir)
        first.load(), second.load()
        first.store({"k1": "one"}, "V")
        self.assertEqual(second.lookup(["k1"]), {"k1": "one"})
        second.store({"k2": "two"}, "V")
        self.assertEqual(first.lookup(["k1", "k2"]), {"k1": "one", "k2": "two"})
        for i in range(3, 9):       # the first cache rewrites (replaces) the file meanwhile
            first.store({"k%d" % i: "d%d" % i}, "V")
        self.assertEqual(second.lookup(["k8"]), {"k8": "d8"})
        path = os.path.join(self.dir, cr.CACHE_FILE)
        with open(path, "ab") as f:     # a line another router is still writing
            f.write(b'{"hash": "k9", "descr')
        self.assertEqual(second.lookup(["k9"]), {})
        with open(path, "ab") as f:
            f.write(b'iption": "nine"}\n')
        self.assertEqual(second.lookup(["k9"]), {"k9": "nine"})
        self.assertEqual((second.hits, second.misses), (3, 1))

    def test_unwritable_dir_keeps_serving_from_memory_and_warns_once(self):
        blocker = os.path.join(self.dir, "file")
        open(blocker, "w").close()
        cache = cr.DescriptionCache(os.path.join(blocker, "sub"))
        cache.store({"k1": "one"}, "V")
        cache.store({"k2": "two"}, "V")
        self.assertEqual(cache.lookup(["k1", "k2"]), {"k1": "one", "k2": "two"})
        self.assertEqual(self.log.getvalue().count("cannot write"), 1)

    def test_disk_full_loses_nothing_already_stored(self):
        cache = cr.DescriptionCache(self.dir)
        cache.store({"k1": "one"}, "V")
        path = os.path.join(self.dir, cr.CACHE_FILE)
        before = open(path, "rb").read()
        # /dev/full fails every write with ENOSPC: a real full disk for this file.
        os.replace(path, path + ".kept")
        os.symlink("/dev/full", path)
        cache.store({"k2": "two"}, "V")
        self.assertIn("cannot write", self.log.getvalue())
        self.assertEqual(cache.lookup(["k2"]), {"k2": "two"})
        os.remove(path)
        os.replace(path + ".kept", path)
        self.assertEqual(open(path, "rb").read(), before)

    def test_an_unreadable_line_another_router_appended_is_skipped_with_a_warning(self):
        # Lines read on a lookup's miss were skipped without a word (issue 14, section 3).
        cache = cr.DescriptionCache(self.dir)
        cache.store({"k1": "one"}, "V")
        with open(os.path.join(self.dir, cr.CACHE_FILE), "ab") as f:
            f.write(b'{"hash": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
            f.write(b'{"hash": "k2", "description": "two"}\n')
        self.assertEqual(cache.lookup(["k2"]), {"k2": "two"})
        self.assertIn("skipped 1 unreadable line(s)", self.log.getvalue())


################ Documents: PDF syntax

class PdfSyntaxTest(unittest.TestCase):

    def test_inline_image_and_nested_parentheses(self):
        content = (b"BT /F1 12 Tf 72 720 Td (a (nested (twice)) string) Tj ET "
                   b"BI /W 2 /H 1 /CS /G /BPC 8 ID \x00) Tj (x\nEI "
                   b"BT /F1 12 Tf 72 700 Td (after) Tj ET")
        self.assertEqual(text_of(build_pdf(page_objects(content))),
                         "a (nested (twice)) string\nafter")

    def test_a_long_run_of_digits_is_read_in_linear_time(self):
        # The number pattern split a run of digits followed by a letter every way there
        # is before the bare word matched it: 8,000 digits took 0.9 s, 16 times 2,000's;
        # 200,000 would take ten minutes. And int() of them failed or took its time.
        run = b"7" * 200_000
        self.assertEqual(list(cr.iter_tokens(run + b"x 12. -.5 +3.25 4 1e5")),
                         [(run + b"x").decode(), 12.0, -0.5, 3.25, 4, "1e5"])
        self.assertEqual(cr.first_value(b"[" + run + b" 1.5]"), [run.decode(), 1.5])

    def test_a_run_of_whitespace_in_a_content_stream_is_read_in_linear_time(self):
        # Each space of a run before an operand matched the rest of the run as a token
        # and was then refused: 40,000 spaces before "(x) Tj" took 17 s, a megabyte of
        # them (a kilobyte once deflated) hours.
        content = b"BT /F1 12 Tf " + b" " * 1_000_000 + b"(x) Tj ET"
        self.assertEqual(list(cr.iter_content(content, {b"Tj", b"Tf"})),
                         [("Tf", ["F1", 12.0]), ("Tj", [b"x"])])
        self.assertEqual(list(cr.iter_content(b"%c (y) Tj  \n BT [(b) -3] TJ", {b"TJ", b"Tj"})),
                         [("TJ", [[b"b", -3.0]])])

    def test_a_run_of_escaped_parentheses_is_read_in_linear_time(self):
        # The string pattern read "\\(" after "\\(" to the end from each "(" and then failed
        # for want of a ")": 8,000 of them took 4 s, 100,000 would take ten minutes.
        run = b"\\(" * 100_000
        self.assertEqual(list(cr.iter_content(b"BT " + run + b" (x" + run + b"\n ET", {b"Tj"})), [])
        self.assertEqual(list(cr.iter_content(b"BT (a (b (c) d) e) Tj (f\\)) Tj ET", {b"Tj"})),
                         [("Tj", [b"a (b (c) d) e"]), ("Tj", [b"f)"])])

    def test_an_object_left_open_ends_at_the_next_object(self):
        # Each object of "n 0 obj [" parsed to the end of the file, as did each "trailer ["
        # a damaged file's trailers are looked for in: 4,000 of either took 31 s. A string
        # left open read to the end too: 4,000 "n 0 obj (" took 5.5 s.
        self.assertEqual(cr.first_value(b"[1 2 << /A [3 endobj 4 0 obj"), [1, 2, {"A": [3]}])
        self.assertEqual(cr.first_value(b"(a (b) c 4 0 obj (d)", 0, 11), b"a (b) c 4 ")
        self.assertEqual(list(cr.iter_operations(b"[1 0 R << /B /C >> 5 0 obj <<>>")),
                         [("obj", [[(1, 0), {"B": "C"}, 5, 0]]), (None, [{}])])
        for damaged in (b"".join(b"%d 0 obj [" % n for n in range(1, 10_000)), b"trailer [" * 10_000,
                        b"".join(b"%d 0 obj (" % n for n in range(1, 10_000)), b"trailer (" * 10_000):
            with self.assertRaisesRegex(cr.DocumentError, "damaged"):
                cr.pdf_pages(b"%PDF-1.4\n" + damaged)


################ Documents: filters and encryption

class PdfFiltersTest(unittest.TestCase):

    def test_zip_bomb_is_bounded(self):
        bomb = zlib.compress(b"BT /F1 12 Tf (x) Tj ET " + b" " * 4_000_000, 9)
        data = build_pdf(page_objects(pdf_stream(b"/Filter /FlateDecode", bomb)))
        with self.assertRaisesRegex(cr.DocumentError, "too large once decompressed"):
            cr.pdf_pages(data, max_inflate=1_000_000)
        self.assertEqual(text_of(data), "x")

    def test_rc4_empty_user_password(self):
        for revision in (2, 3):
            with self.subTest(revision=revision):
                data = encrypted_pdf(b"BT /F1 12 Tf 72 720 Td (Copy protected) Tj ET", revision)
                self.assertEqual(text_of(data), "Copy protected")

    def test_rc4_with_the_catalog_in_an_object_stream(self):
        # The catalog was looked for before the key was known, in an object stream not
        # yet decrypted: such a file read as damaged. Once found by a scan, an object
        # stream read before the key must be read again.
        data = catalog_stream_pdf(b"BT /F1 12 Tf 72 720 Td (Catalog in a stream) Tj ET",
                                  encrypted=True)
        self.assertEqual(text_of(data), "Catalog in a stream")
        at = data.rindex(b"startxref")
        self.assertEqual(text_of(data[:at] + b"startxref\n99999\n%%EOF\n"), "Catalog in a stream")

    def test_user_password_and_aes_give_their_reasons(self):
        content = b"BT /F1 12 Tf 72 720 Td (Secret) Tj ET"
        with self.assertRaisesRegex(cr.DocumentError, "^encrypted$"):
            cr.pdf_pages(encrypted_pdf(content, 3, user=b"secret"))
        with self.assertRaisesRegex(cr.DocumentError, "^AES encryption is not supported$"):
            cr.pdf_pages(encrypted_pdf(content, 4, aes=True))
        aes256 = build_pdf(page_objects(content) + [b"<< /Filter /Standard /V 5 /R 6 >>"],
                           b"/Encrypt 6 0 R")
        with self.assertRaisesRegex(cr.DocumentError, "^AES encryption is not supported$"):
            cr.pdf_pages(aes256)

    def test_filters_are_bounded_in_memory(self):
        # A row as wide as /Columns says was allocated whole (/Columns 4000000000 was
        # 16 GB of zeros), a TIFF predictor held a bytearray per row (2.6 GB for 30 MB),
        # and ASCII85's "z" made four bytes each, past the inflate limit (5 MB: 456 MB held).
        self.assertEqual(cr.undo_predictor(b"\x02abc", {"Predictor": 12, "Columns": 1 << 40}), b"")
        self.assertEqual(cr.undo_predictor(bytes([1, 1, 1, 5, 5]), {"Predictor": 2, "Columns": 3}),
                         bytes([1, 2, 3, 5, 10]))
        self.assertEqual(cr.decode_filter("A85", b"<~z!!*'\"~>", {}, 100), b"\0\0\0\0\0\1\0\0")
        with self.assertRaisesRegex(cr.DocumentError, "too large once decompressed"):
            cr.decode_filter("A85", b"z" * 300, {}, 1000)
        with self.assertRaisesRegex(cr.DocumentError, "too large once decompressed"):
            cr.undo_predictor(b"\0" * (cr.PDF_MAX_PREDICTED + 1), {"Predictor": 2})


################ Documents: PDF objects

class PdfObjectsTest(unittest.TestCase):

    def test_an_object_stream_entry_with_a_wrong_index_is_found_by_its_number(self):
        # Found by a scan of the stream's header per object, which made N such entries
        # cost N squared (40,000: 22 s); now by a table made once per stream.
        data = object_stream_pdf(b"BT /F1 12 Tf 72 720 Td (Indexed wrong) Tj ET")
        doc = cr.PdfFile(data)
        kind, stream, _ = next(e for e in doc.xref.values() if e[0] == 2)
        doc.xref = {n: (2, stream, 99) if e[0] == 2 else e for n, e in doc.xref.items()}
        doc.objects = {}
        self.assertEqual("\f".join(p["text"] for p in cr.pdf_pages(data)), "Indexed wrong")
        self.assertTrue(all(doc.fetch(n) is not None for n, e in doc.xref.items() if e[0] == 2))

    def test_cross_reference_stream_entries_are_read_once_each(self):
        # Each /Index pair read the rows from where the last left off, past their end: a
        # thousand pairs of 100,000 made a 1 KB file read a hundred million entries.
        head = b"%PDF-1.5\n"
        catalog = b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
        pages = b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"
        rows = b"".join(offset.to_bytes(4, "big") + b"\0"
                        for offset in (len(head), len(head) + len(catalog)))
        xref = len(head) + len(catalog) + len(pages)
        data = head + catalog + pages + b"3 0 obj\n" + pdf_stream(
            b"/Type /XRef /W [0 4 1] /Index [1 2 1000 100000] /Size 3 /Root 1 0 R", rows) + \
            b"\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref
        self.assertEqual(cr.PdfFile(data).xref, {1: (1, len(head), 0), 2: (1, len(head) + len(catalog), 0)})

    def test_xref_stream_and_object_stream(self):
        data = object_stream_pdf(b"BT /F1 12 Tf 72 720 Td (Inside an object stream) Tj ET")
        self.assertEqual(text_of(data), "Inside an object stream")

    def test_incremental_update_replaces_the_content(self):
        first = build_pdf(page_objects(b"BT /F1 12 Tf 72 720 Td (Old text) Tj ET"))
        previous = int(first.rsplit(b"startxref", 1)[1].split()[0])
        body = pdf_stream(b"", b"BT /F1 12 Tf 72 720 Td (New text) Tj ET")
        # Objects 3 and 6 are stale: no cross-reference entry points at them, and a
        # reader that scanned for objects instead of following /Prev would take them.
        update = b"5 0 obj\n%s\nendobj\n" % body + \
            b"3 0 obj\n<< /Type /Page /Parent 2 0 R /Contents 6 0 R >>\nendobj\n" + \
            b"6 0 obj\n%s\nendobj\n" % pdf_stream(b"", b"BT /F1 12 Tf (stale) Tj ET")
        xref = len(first) + len(update)
        data = first + update + (
            b"xref\n5 1\n%010d 00000 n \ntrailer\n<< /Size 6 /Root 1 0 R /Prev %d >>\n"
            b"startxref\n%d\n%%%%EOF\n" % (len(first), previous, xref))
        self.assertEqual(text_of(data), "New text")

    def test_broken_cross_references_fall_back_to_a_scan(self):
        data = build_pdf(page_objects(b"BT /F1 12 Tf 72 720 Td (Still here) Tj ET"))
        at = data.rindex(b"startxref")
        self.assertEqual(text_of(data[:at] + b"startxref\n99999\n%%EOF\n"), "Still here")
        shifted = data.replace(b"0000000009 00000 n", b"0000000001 00000 n")
        self.assertEqual(text_of(shifted), "Still here")

    def test_a_scan_reads_object_streams_again(self):
        # The cross-reference stream points at an old object stream 6, whose object 1 is
        # no catalog, so the file is scanned: the scan finds the newer stream 6, which the
        # reader must read again, not take from what it kept of the old one.
        data = catalog_stream_pdf(b"BT /F1 12 Tf 72 720 Td (The newer stream) Tj ET", stale=True)
        self.assertEqual(text_of(data), "The newer stream")
        self.assertEqual(text_of(catalog_stream_pdf(b"BT /F1 12 Tf (Not damaged) Tj ET")),
                         "Not damaged")

    def test_damaged_files(self):
        for data, reason in ((b"%PDF-1.4\n garbage only", "damaged: no cross-reference table"),
                             (b"not a pdf at all", "not a PDF"),
                             (build_pdf(page_objects(b"BT ET"))[:60], "damaged")):
            with self.subTest(reason=reason):
                with self.assertRaises(cr.DocumentError) as caught:
                    cr.pdf_pages(data)
                self.assertTrue(str(caught.exception).startswith(reason), str(caught.exception))


################ Documents: fonts

class PdfFontsTest(unittest.TestCase):

    def test_to_unicode_bfchar_and_bfrange(self):
        cmap = (b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n"
                b"1 begincodespacerange <00> <FF> endcodespacerange\n"
                b"2 beginbfchar <01> <0048> <02> <00E9> endbfchar\n"
                b"2 beginbfrange <03> <04> <006C> <05> <06> [<006F> <FB01>] endbfrange\n"
                b"endcmap CMapName currentdict /CMap defineresource pop end end")
        font = b"<< /Type /Font /Subtype /TrueType /BaseFont /Subset /ToUnicode 6 0 R >>"
        data = build_pdf(page_objects(b"BT /F1 10 Tf 72 720 Td <0102030305> Tj ( ) Tj <06> Tj ET",
                                      extra=(font, pdf_stream(b"", cmap))))
        self.assertEqual(text_of(data), "H\u00e9llo fi")

    def test_type0_identity_h_with_w_widths(self):
        # Glyph 1 is "a", 2 is "b"; W gives both 500. No space glyph is ever drawn: the
        # TJ kerning of -300 (0.3 of the font size) is the word break, -20 is not. CID 2's
        # width comes from W's "c1 c2 w" form: read as DW's 100, the b ends short of the a.
        cmap = b"begincmap 1 beginbfrange <0001> <0002> <0061> endbfrange endcmap"
        font = (b"<< /Type /Font /Subtype /Type0 /BaseFont /X /Encoding /Identity-H "
                b"/DescendantFonts [<< /Type /Font /Subtype /CIDFontType2 /W [1 [500] 2 2 500] "
                b"/DW 100 >>] /ToUnicode 6 0 R >>")
        content = (b"BT /F1 10 Tf 72 720 Td [<00010002> -20 <0001> -300 <00020002>] TJ "
                   b"1 0 0 1 72 700 Tm <0002> Tj 1 0 0 1 77 700 Tm <0001> Tj ET")
        data = build_pdf(page_objects(content, extra=(font, pdf_stream(b"", cmap))))
        self.assertEqual(text_of(data), "aba bb\nba")

    def test_differences_encoding(self):
        font = (b"<< /Type /Font /Subtype /Type1 /BaseFont /Custom /Encoding << /Type /Encoding "
                b"/BaseEncoding /WinAnsiEncoding /Differences [65 /eacute /germandbls /uni20AC "
                b"/f_i /Adieresis.sc /Omega /g123] >> >>")
        data = build_pdf(page_objects(b"BT /F1 10 Tf 72 720 Td (ABCDEF xG) Tj ET", extra=(font,)))
        self.assertEqual(text_of(data), "\u00e9\u00df\u20acfi\u00c4\u2126 x")

    def test_builtin_encoding_of_a_type1_program(self):
        program = (b"%!PS-AdobeFont-1.0: CMR10\n/Encoding 256 array\n0 1 255 {1 index exch "
                   b"/.notdef put} for\ndup 11 /ff put\ndup 65 /A put\nreadonly def\n"
                   b"currentfile eexec\n")
        font = (b"<< /Type /Font /Subtype /Type1 /BaseFont /CMR10 /FontDescriptor "
                b"<< /FontFile 6 0 R >> >>")
        data = build_pdf(page_objects(b"BT /F1 10 Tf 72 720 Td (\\013A) Tj ET",
                                      extra=(font, pdf_stream(b"/Length1 %d" % len(program),
                                                              program))))
        self.assertEqual(text_of(data), "ffA")

    def test_type3_widths_scale_by_the_font_matrix(self):
        # Glyph space is 1/100 of text space here: widths of 50 are half the font size.
        font = (b"<< /Type /Font /Subtype /Type3 /FontMatrix [0.01 0 0 0.01 0 0] /FirstChar 97 "
                b"/LastChar 98 /Widths [50 50] /Encoding << /Differences [97 /a /b] >> "
                b"/CharProcs << >> /FontBBox [0 0 100 100] /Resources << >> >>")
        content = b"BT /F1 10 Tf 100 700 Td (ab) Tj 13 0 Td (ba) Tj 10 0 Td (a) Tj ET"
        data = build_pdf(page_objects(content, extra=(font,)))
        self.assertEqual(text_of(data), "ab baa")

    def test_running_content_is_bounded(self):
        # A 3 KB file whose 2,000 pages each ran a tiny self-drawing form 2,000 times
        # took minutes of a core; so did 2,000 pages sharing one long content stream.
        form = pdf_stream(b"/Type /XObject /Subtype /Form /BBox [0 0 1 1]",
                          b"BT /F1 12 Tf (ab) Tj ET /Fm1 Do /Fm1 Do")
        data = build_pdf(page_objects(b"/Fm1 Do", extra=(HELVETICA, form),
                                      resources=b"/XObject << /Fm1 6 0 R >>"))
        self.assertEqual(text_of(data).count("ab"), cr.PDF_MAX_FORMS)
        with self.assertRaisesRegex(cr.DocumentError, "too much to read"):
            cr.pdf_pages(data, max_content=1000 * cr.PDF_RUN_COST)
        long_page = b"BT /F1 12 Tf " + b"(a) Tj " * 3000 + b"ET"
        self.assertEqual(text_of(build_pdf(page_objects(long_page)), max_content=30_000),
                         "a" * 3000)
        with self.assertRaisesRegex(cr.DocumentError, "too much to read"):
            cr.pdf_pages(build_pdf(page_objects(long_page)), max_content=20_000)

    def test_font_codes_are_bounded_per_document(self):
        # Each font's CMap is bounded, but a thousand fonts sharing one CMap of 200,000
        # codes held gigabytes: ten of them took 121 MB.
        cmap = pdf_stream(b"", b"begincmap 1 begincodespacerange <0000> <FFFF> endcodespacerange "
                               b"1 beginbfrange <0000> <0FFF> <0041> endbfrange endcmap")
        font = (b"<< /Type /Font /Subtype /Type0 /BaseFont /X /Encoding /Identity-H /ToUnicode 6 0 R "
                b"/DescendantFonts [<< /Subtype /CIDFontType2 /W [0 [500]] >>] >>")
        other = font.replace(b"/X ", b"/Y ")
        content = b"BT /F1 10 Tf 72 720 Td <0000> Tj /F2 10 Tf <0001> Tj ET"
        data = build_pdf(page_objects(content, fonts=b"/F1 4 0 R /F2 7 0 R",
                                      extra=(font, cmap, other)))
        self.assertEqual(text_of(data, max_codes=2 * (256 + 4097)), "AB")
        with self.assertRaisesRegex(cr.DocumentError, "too much to read"):
            cr.pdf_pages(data, max_codes=2 * (256 + 4097) - 1)

    def test_fonts_without_codes_are_bounded_per_document_too(self):
        # 20,000 fonts that define no codes, in a 2 MB file, held 290 MB: each has its
        # table of 256 codes all the same.
        content = b"BT " + b" ".join(b"/F%d 10 Tf (x) Tj" % i for i in range(3)) + b" ET"
        many = [HELVETICA.replace(b"Helvetica", b"Helvetica /Name /F%d" % i) for i in range(3)]
        fonts = b" ".join(b"/F%d %d 0 R" % (i, 6 + i) for i in range(3))
        data = build_pdf(page_objects(content, fonts=fonts, extra=(HELVETICA,) + tuple(many)))
        self.assertEqual(text_of(data, max_codes=3 * 256), "xxx")
        with self.assertRaisesRegex(cr.DocumentError, "too much to read"):
            cr.pdf_pages(data, max_codes=3 * 256 - 1)

    def test_no_unicode_mapping(self):
        font = (b"<< /Type /Font /Subtype /Type0 /BaseFont /X /Encoding /Identity-H "
                b"/DescendantFonts [<< /Subtype /CIDFontType2 >>] >>")
        data = build_pdf(page_objects(b"BT /F1 10 Tf 72 720 Td <00230024> Tj ET", extra=(font,)))
        with self.assertRaisesRegex(cr.DocumentError, "no Unicode mapping for its fonts"):
            cr.pdf_pages(data)


################ Documents: text

class PdfTextTest(unittest.TestCase):

    def test_simple_text(self):
        data = build_pdf(page_objects(b"BT /F1 12 Tf 72 720 Td (Hello, world) Tj ET"))
        self.assertEqual(cr.pdf_pages(data), [{"text": "Hello, world", "images": []}])

    def test_flate_content_and_lines(self):
        content = zlib.compress(b"BT /F1 12 Tf 72 720 Td (First line) Tj 0 -14 Td (Second) Tj "
                                b"T* (not reached: TL is 0) Tj ET")
        data = build_pdf(page_objects(pdf_stream(b"/Filter /FlateDecode", content)))
        self.assertEqual(text_of(data), "First line\nSecond not reached: TL is 0")

    def test_word_breaks_from_glyph_positions(self):
        # A producer that draws no spaces: words placed by Td and Tm, letters by widths.
        font = (b"<< /Type /Font /Subtype /Type1 /BaseFont /Custom /FirstChar 97 /LastChar 122 "
                b"/Widths [%s] /Encoding /WinAnsiEncoding >>" % b" ".join([b"500"] * 26))
        content = (b"BT /F1 10 Tf 1 0 0 1 100 700 Tm (two) Tj 18 0 Td (words) Tj "
                   b"25 0 Td (o) Tj "                  # touching the s: the same word
                   b"2 0 0 2 100 650 Tm (big) Tj (ger) Tj 32 0 Td (type) Tj "
                   b"200 Tz 1 0 0 1 100 600 Tm (wide) Tj 1 0 0 1 140 600 Tm (r) Tj ET")
        data = build_pdf(page_objects(content, extra=(font,)))
        self.assertEqual(text_of(data), "two wordso\nbigger type\nwider")

    def test_forms_inherited_resources_and_recursion(self):
        form = pdf_stream(b"/Subtype /Form /BBox [0 0 100 100] /Matrix [1 0 0 1 0 -20]",
                          b"BT /F1 12 Tf 72 720 Td (in a form) Tj ET /Fm1 Do")
        data = build_pdf(page_objects(b"BT /F1 12 Tf 72 720 Td (Page) Tj ET /Fm1 Do",
                                      extra=(HELVETICA, form),
                                      resources=b"/XObject << /Fm1 6 0 R >>"))
        text = text_of(data)
        self.assertTrue(text.startswith("Page\nin a form\nin a form"), text)
        self.assertEqual(text.count("in a form"), cr.PDF_MAX_DEPTH)

    def test_an_image_taller_than_its_data_is_skipped_before_its_rows_are_made(self):
        # /Height 10000000 over 2 bytes of pixels made ten million rows (872 MB) before
        # finding them short; a larger height would take all the memory there is.
        data = image_pdf(pdf_stream(b"/Subtype /Image /Width 1 /Height 2000000 /ColorSpace "
                                    b"/DeviceGray /BitsPerComponent 8 /Filter /FlateDecode",
                                    zlib.compress(b"\x80\x80")))
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        self.assertEqual(cr.pdf_pages(data), [{"text": "", "images": []}])
        self.assertLess(tracemalloc.get_traced_memory()[1], 20_000_000)

    def test_page_images_where_there_is_no_text(self):
        jpeg = b"\xff\xd8\xff\xe0 not really a JPEG \xff\xd9"
        data = image_pdf(pdf_stream(b"/Type /XObject /Subtype /Image /Width 2 /Height 1 "
                                    b"/ColorSpace /DeviceRGB /BitsPerComponent 8 "
                                    b"/Filter /DCTDecode",
                                    jpeg))
        self.assertEqual(cr.pdf_pages(data), [{"text": "", "images": [("image/jpeg", jpeg)]}])
        for space, pixels, color_type in ((b"/DeviceRGB", b"\xff\x00\x00\x00\x00\xff", 2),
                                          (b"/DeviceGray", b"\x10\x80", 0)):
            with self.subTest(space=space):
                data = image_pdf(pdf_stream(b"/Subtype /Image /Width 2 /Height 1 /ColorSpace %s "
                                            b"/BitsPerComponent 8 /Filter /FlateDecode" % space,
                                            zlib.compress(pixels)))
                [(kind, png)] = cr.pdf_pages(data)[0]["images"]
                self.assertEqual(kind, "image/png")
                self.assertEqual(png_rows(png), (2, 1, color_type, b"\x00" + pixels))
        # Scanlines a PNG predictor filtered (img2pdf's) keep their filter bytes.
        rows = b"\x02\x01\x02\x03\x04\x05\x06\x01\x01\x01\x01\x01\x01\x01"
        data = image_pdf(pdf_stream(b"/Subtype /Image /Width 2 /Height 2 /ColorSpace /DeviceRGB "
                                    b"/BitsPerComponent 8 /Filter /FlateDecode /DecodeParms "
                                    b"<< /Predictor 15 /Colors 3 /Columns 2 >>",
                                    zlib.compress(rows)))
        [(kind, png)] = cr.pdf_pages(data)[0]["images"]
        self.assertEqual(png_rows(png), (2, 2, 2, rows))
        # DecodeParms as a list, one per filter: the Flate one is the dict after the null.
        data = image_pdf(pdf_stream(b"/Subtype /Image /Width 2 /Height 2 /ColorSpace /DeviceRGB "
                                    b"/BitsPerComponent 8 /Filter [/ASCIIHexDecode /FlateDecode] "
                                    b"/DecodeParms [null << /Predictor 15 /Colors 3 /Columns 2 >>]",
                                    zlib.compress(rows).hex().encode() + b">"))
        [(kind, png)] = cr.pdf_pages(data)[0]["images"]
        self.assertEqual(png_rows(png), (2, 2, 2, rows))

    def test_an_indexed_image_keeps_a_palette_png_can_hold(self):
        # PNG's PLTE holds whole RGB entries, 256 at most: a palette of 7 bytes, or of
        # 300 entries, made a PNG that decoders refuse.
        for palette, kept in ((b"\xff\x00\x00\x00\x00\xff\x80", 6), (bytes(range(256)) * 4, 768)):
            with self.subTest(size=len(palette)):
                data = image_pdf(pdf_stream(
                    b"/Subtype /Image /Width 2 /Height 1 /ColorSpace [/Indexed /DeviceRGB 1 <%s>] "
                    b"/BitsPerComponent 8 /Filter /FlateDecode" % palette.hex().encode(),
                    zlib.compress(b"\x00\x01")))
                [(kind, png)] = cr.pdf_pages(data)[0]["images"]
                self.assertEqual(png_chunks(png)[b"PLTE"], palette[:kept])
                self.assertEqual(png_rows(png), (2, 1, 3, b"\x00\x00\x01"))


################ Documents

def document(source, **fields):
    return {"type": "document", "source": source, **fields}


def text_document(data, **fields):
    return document({"type": "text", "media_type": "text/plain", "data": data}, **fields)


def pdf_document(data, **fields):
    return document({"type": "base64", "media_type": "application/pdf",
                     "data": base64.b64encode(data).decode()}, **fields)


def page_record(*pages):
    return {"pages": list(pages), "more_pages": 0, "more_chars": 0}


def image_of(data, media_type="image/png"):
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode()}}


JPEG_A = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"A" * 64 + b"\xff\xd9"


def pdf_string(text):
    """text as a PDF literal string's body (WinAnsi), its delimiters escaped."""
    return text.encode("cp1252").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(
        b")", b"\\)")


def make_pdf(*pages):
    """A small PDF, one page per item: a str is drawn as lines of Helvetica text, bytes as a
    JPEG filling the page (a scan without a text layer)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", HELVETICA]
    kids = []
    for page in pages:
        if isinstance(page, str):
            content = b"BT /F1 12 Tf 14 TL 72 720 Td %s ET" % b" ".join(
                b"(%s) Tj T*" % pdf_string(line) for line in page.split("\n"))
            resources = b"<< /Font << /F1 3 0 R >> >>"
        else:
            objects.append(pdf_stream(b"/Type /XObject /Subtype /Image /Width 8 /Height 8 "
                                      b"/ColorSpace /DeviceGray /BitsPerComponent 8 "
                                      b"/Filter /DCTDecode", page))
            content = b"q 612 0 0 792 0 0 cm /Im1 Do Q"
            resources = b"<< /XObject << /Im1 %d 0 R >> >>" % len(objects)
        objects.append(pdf_stream(b"", content))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources %s "
                       b"/Contents %d 0 R >>" % (resources, len(objects)))
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    return build_pdf(objects)


DAMAGED_PDF = b"%PDF-1.4\n%garbage, and no objects\n"


def read_line(path="/x/report.pdf", size=592):
    return text("PDF file read: %s (%d bytes)" % (path, size))


def has_document_block(raw):
    """True when a body as the upstream received it holds a document block anywhere."""
    def walk(value):
        if isinstance(value, dict):
            return value.get("type") == "document" or any(map(walk, value.values()))
        return isinstance(value, list) and any(map(walk, value))
    return walk(json.loads(raw))


class DocumentTransformTest(unittest.TestCase):

    def test_the_file_name_comes_from_claude_codes_read_line(self):
        rows = [("PDF file read: /home/u/docs/invoice.pdf (592 bytes)", "invoice.pdf"),
                ("PDF file read: C:\\Users\\u\\spec v2.pdf (1.2 MB)", "spec v2.pdf"),
                ("PDF file read: /tmp/a (b).pdf (10 bytes)", "a (b).pdf"),
                ("I read /tmp/x.pdf", None), ("PDF file read: /tmp/ (3 bytes)", None)]
        for line, name in rows:
            with self.subTest(line):
                self.assertEqual(cr.file_read_name(line), name)

    def test_pages_past_the_page_limit_are_counted_and_said_to_be_left_out(self):
        # A PDF of more pages than the router reads came out as a whole one of
        # PDF_MAX_PAGES pages: the coder was told a 2,500-page manual had 2,000, all there.
        pages = cr.pdf_pages(make_pdf("one", "two", "three", "four"), max_pages=2)
        self.assertEqual((pages, pages.unread), ([{"text": "one", "images": []},
                                                  {"text": "two", "images": []}], 2))
        record, images = cr.document_record(pages)
        self.assertTrue(cr.is_document_record(record))
        [block] = cr.render_document({"type": "document"}, "m.pdf", record, images, None)
        self.assertEqual(block["text"].splitlines(), [
            "<<DOCUMENT TEXT: m.pdf, 4 pages>>", "--- page 1 ---", "one", "--- page 2 ---", "two",
            "<<DOCUMENT CUT: its last 2 pages not read: the router reads %s at most>>"
            % format(cr.PDF_MAX_PAGES, ",")])

    def test_every_source_renders_as_text_in_the_blocks_place(self):
        seen = []

        def render(block, name):
            seen.append(name)
            return cr.render_document(block, name, cr.source_record(block["source"]), None, 32768)
        blocks = [text("PDF file read: /x/notes.pdf (9 bytes)"),
                  text_document("alpha\nbeta", title="Notes", context="from the wiki"),
                  document({"type": "content", "content": [text("one"), image(PNG_A), text("two")]}),
                  document({"type": "url", "url": "https://example.com/a.pdf"}, title="A"),
                  document({"type": "file", "file_id": "file_01"})]
        out = cr.splice_blocks(blocks, cr.is_document,
                               lambda block, before: render(block, cr.document_name(block, before)))
        self.assertEqual(seen, ["notes.pdf", "document", "A", "document"])
        self.assertEqual(out, [
            blocks[0],
            text("<<DOCUMENT TEXT: notes.pdf>>\nTitle: Notes\nContext: from the wiki\nalpha\nbeta"),
            text("<<DOCUMENT TEXT: document>>\none"), image(PNG_A), text("two"),
            text("<<DOCUMENT: A could not be read: the router fetches nothing from the internet "
                 "(https://example.com/a.pdf)>>"),
            text("<<DOCUMENT: document could not be read: the router cannot fetch uploaded "
                 "files (file_01)>>")])

    def test_a_pdf_renders_as_numbered_pages_with_scans_and_blank_pages_marked(self):
        record = page_record("Total: 42 EUR", {"images": 1}, None)
        images = [[], [("image/jpeg", PNG_B)], []]
        out = cr.render_document(pdf_document(b"%PDF"), "invoice.pdf", record, images, 32768)
        self.assertEqual(out, [
            text("<<DOCUMENT TEXT: invoice.pdf, 3 pages>>\n--- page 1 ---\nTotal: 42 EUR\n"
                 + cr.SCANNED_PAGE_HEADER % 2),
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                         "data": PNG_B}},
            text(cr.BLANK_PAGE_HEADER % 3)])
        self.assertEqual(cr.page_contexts(images, "invoice.pdf"),
                         {key(PNG_B): cr.PAGE_CONTEXT % (2, "invoice.pdf")})

    def test_a_failed_pdf_is_one_marker(self):
        out = cr.render_document(pdf_document(b"%PDF"), "a.pdf", {"failed": "encrypted"}, [], 0)
        self.assertEqual(out, [text("<<DOCUMENT: a.pdf could not be read: encrypted>>")])

    def test_a_document_bigger_than_its_share_of_the_context_is_cut_by_a_rule(self):
        pages = ["".join("page %d line %d \u00e9\n" % (p, i) for i in range(100))
                 for p in range(1, 41)]
        record, total = page_record(*pages), sum(map(len, pages))
        for context in (2048, 4096, 32768):
            with self.subTest(context=context):
                out = cr.render_document(pdf_document(b"%PDF"), "big.pdf", record, [], context)
                self.assertEqual(out, cr.render_document(pdf_document(b"%PDF"), "big.pdf",
                                                         record, [], context))
                self.assertEqual(len(out), 1)
                shown, note = out[0]["text"].rsplit("\n", 1)
                self.assertLessEqual(cr.json_length(shown), cr.document_budget(context) + 100)
                self.assertGreater(cr.json_length(shown), cr.document_budget(context) - 100)
                kept = sum(len(line) + 1 for line in shown.split("\n") if line.startswith("page "))
                cut = next(n for n, page in enumerate(pages, 1) if page not in shown)
                self.assertEqual(note, "<<DOCUMENT CUT: %s of its %s chars left out from page %d "
                                       "on, to fit the coder's %s-token context>>" % (
                                           format(total - kept, ","), format(total, ","),
                                           cut, format(context, ",")))
        whole = cr.render_document(pdf_document(b"%PDF"), "big.pdf", record, [], 10 ** 6)
        self.assertNotIn("DOCUMENT CUT", whole[0]["text"])
        self.assertEqual(whole[0]["text"].count(" \u00e9\n"), 4000)

    def test_the_cut_counts_what_it_leaves_out(self):
        record = page_record("a" * 100, "b" * 100)
        kept, page, left = cr.cut_parts(cr.pdf_parts(record, []), 30)
        self.assertEqual(page, 1)
        self.assertEqual(left, 200 - sum(c for _, _, c in kept))
        self.assertEqual(cr.cut_text("ab\ncd\nef", 7), "ab\n")
        self.assertEqual(cr.cut_text("ab\ncd\nef", 8), "ab\ncd\n")
        self.assertEqual(cr.cut_text("abcdef", 4), "abcd")
        self.assertEqual(cr.cut_text("\u00e9\u00e9\u00e9", 12), "\u00e9\u00e9")

    def test_pages_past_the_routers_limit_are_counted_not_kept(self):
        pages = [{"text": "x" * 40, "images": []}] * 5
        record, images = cr.document_record(pages, max_chars=100)
        self.assertEqual(record, {"pages": ["x" * 40] * 2, "more_pages": 3, "more_chars": 120})
        self.assertTrue(cr.is_document_record(record))
        out = cr.render_document(pdf_document(b"%PDF"), "d.pdf", record, images, 32768)
        self.assertTrue(out[0]["text"].startswith("<<DOCUMENT TEXT: d.pdf, 5 pages>>"))
        self.assertTrue(out[0]["text"].endswith(
            "<<DOCUMENT CUT: 120 of its 200 chars left out from page 3 on, to fit the "
            "router's limit of %s chars>>" % format(cr.DOCUMENT_MAX_CHARS, ",")))

    def test_a_lone_surrogate_in_a_pages_text_is_replaced(self):
        record, _ = cr.document_record([{"text": "a\ud83d\ude00b\ud800c", "images": []}])
        self.assertEqual(record["pages"], ["a\U0001f600b\ufffdc"])

    def test_records_read_back_only_in_their_shape(self):
        good = [page_record("a", None, {"images": 2}), {"failed": "encrypted"}]
        bad = [None, "text", {"pages": "a"}, {"pages": [1], "more_pages": 0, "more_chars": 0},
               {"failed": 3}, {"pages": [], "more_pages": "0", "more_chars": 0}]
        self.assertEqual([cr.is_document_record(r) for r in good], [True, True])
        self.assertEqual([cr.is_document_record(r) for r in bad], [False] * len(bad))

    def test_malformed_documents_are_refused_naming_the_field(self):
        pdf = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}
        rows = [
            ({"type": "document"}, "source: a document source must be an object"),
            (document({"type": "zip"}), "source: a document source"),
            (document({**pdf, "media_type": "image/png"}), "source.media_type: a base64 "
             "document must be application/pdf"),
            (document({**pdf, "data": "JVBER!x"}), "source.data: must be strict base64"),
            (document({**pdf, "data": ""}), "source.data: must be strict base64"),
            (document({"type": "text", "media_type": "text/html", "data": "x"}),
             "source.media_type: a text document must be text/plain"),
            (document({"type": "text", "media_type": "text/plain"}), "source.data: must be a string"),
            (document({"type": "content", "content": [{"type": "document"}]}),
             "source.content.0: must be a text or an image block"),
            (document({"type": "content", "content": [image("not base64!")]}),
             "source.content.0: data must be strict base64"),
            (document({"type": "content", "content": 5}), "source.content: must be a string"),
            (document({"type": "url", "url": "file:///etc/passwd"}), "source.url: must be an http"),
            (document({"type": "file"}), "source.file_id: must be a string"),
            (document(pdf, title=5), "title: must be a string"),
            (document(pdf, context=["x"]), "context: must be a string")]
        for block, problem in rows:
            with self.subTest(problem):
                with self.assertRaises(cr.ProxyError) as caught:
                    cr.validate_request(request(user(text("q"), block)))
                self.assertEqual(caught.exception.status, 400)
                self.assertTrue(str(caught.exception).startswith("messages.0.content.1." + problem),
                                str(caught.exception))
        cr.validate_request(request(user(document(pdf, title=None, context="c"))))


################ Documents: the reader

class DocumentTest(RouterTestCase):

    def test_a_turn_of_many_documents_logs_a_few_lines_and_a_count(self):
        # Each document of the user's turn had its line: 50,000 one-byte documents in a
        # 3 MB request wrote 3.2 MB of log, and the body limit allows twenty times that.
        upstream = FakeUpstream(self)
        self.start(upstream)
        many = [text_document("x")] * 1000
        status, _, reply = self.post(request(user(text("q"), *many)))
        self.assertEqual(status, 200, reply)
        lines = [l for l in self.log.getvalue().splitlines() if "document: " in l]
        self.assertEqual(len(lines), cr.DOCUMENT_LINES + 1)
        self.assertTrue(lines[-1].endswith("document: %d more in this turn"
                                           % (1000 - cr.DOCUMENT_LINES)), lines[-1])

    def documents_in_every_place(self):
        """Requests with documents of every source, at the top of a user message and in a
        tool_result, in the user's turn and in an earlier one."""
        sources = {
            "pdf": pdf_document(DAMAGED_PDF),
            "text": text_document("plain words", title="notes.txt"),
            "content": document({"type": "content", "content": [text("in blocks")]}),
            "url": document({"type": "url", "url": "https://example.com/a.pdf"}),
            "file": document({"type": "file", "file_id": "file_01"})}
        for name, block in sources.items():
            yield name + " in a user message", request(user(text("what is in it?"), block))
            yield name + " in a tool_result", request(
                user(text("read it")), assistant(tool_use("t1")),
                user(tool_result("t1", read_line(), block)))
            yield name + " in an earlier turn", request(
                user(text("read it")), assistant(tool_use("t1")),
                user(tool_result("t1", read_line(), block)), assistant(text("Done.")),
                user(text("and now?")), stream=True)

    def test_no_document_block_reaches_the_upstream(self):
        # llama-server dropped a document block silently and strict servers refused the
        # whole conversation for it (issue 15); the strict fake refuses it too.
        upstream = FakeUpstream(self, strict=True, count_tokens=(200, {"input_tokens": 7}))
        self.start(upstream)
        for name, body in self.documents_in_every_place():
            with self.subTest(name):
                status, _, reply = self.post(body)
                self.assertEqual(status, 200, reply)
                status, _, reply = self.call("POST", "/v1/messages/count_tokens", body)
                self.assertEqual((status, reply), (200, {"input_tokens": 7}))
        self.assertEqual(len(upstream.raw), 30)
        for path, raw in upstream.raw:
            self.assertFalse(has_document_block(raw), raw[:300])
            self.assertIn(b"<<DOCUMENT", raw)

    def test_a_document_in_a_nested_tool_result_is_refused_before_the_upstream(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        inner = tool_result("t0", text_document("x"))
        status, _, reply = self.post(request(user(text("q")), assistant(tool_use("t1")),
                                             user(tool_result("t1", inner))))
        self.assertEnvelope(status, reply, 400, "invalid_request_error")
        self.assertEqual(upstream.posts(), [])

    def test_a_malformed_document_is_a_400_naming_its_field(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        bad = document({"type": "base64", "media_type": "application/pdf", "data": "JVBE%%"})
        status, _, reply = self.post(request(user(text("q"), bad)))
        self.assertEnvelope(status, reply, 400, "invalid_request_error")
        self.assertEqual(reply["error"]["message"],
                         "messages.0.content.1.source.data: must be strict base64")
        self.assertEqual(upstream.posts(), [])

    def test_an_unreadable_pdf_is_a_marker_and_the_coder_answers(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        body = request(user(text("read it")), assistant(tool_use("t1")),
                       user(tool_result("t1", read_line("/x/invoice.pdf"), pdf_document(DAMAGED_PDF))))
        status, headers, reply = self.post(body)
        self.assertEqual((status, reply["content"]), (200, [text("ok")]))
        sent = upstream.posts()[-1]["messages"][2]["content"][0]["content"]
        self.assertEqual(sent[0], read_line("/x/invoice.pdf"))
        self.assertRegex(sent[1]["text"], r"\A<<DOCUMENT: invoice\.pdf could not be read: [^>]+>>\Z")
        self.assertEqual(len(sent), 2)
        self.assertRegex(self.log.getvalue(), r"document: invoice\.pdf could not be read: .+\n")
        self.assertEqual(self.router.status()["documents"]["failed"], 1)

    def test_a_pdf_is_read_once_and_renders_the_same_on_every_turn_and_after_a_restart(self):
        upstream = FakeUpstream(self)
        first = self.start(upstream)
        turn = [user(text("read it")), assistant(tool_use("t1")),
                user(tool_result("t1", read_line(), pdf_document(DAMAGED_PDF))),
                assistant(text("Done."))]
        self.post(request(*turn[:3]))
        self.post(request(*turn, user(text("again?"))))
        first.shutdown()
        path = os.path.join(self.cache_dir, cr.DOCUMENT_CACHE_FILE)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        second = self.start(upstream)
        second.documents.cache.load()
        self.post(request(*turn, user(text("again?")), assistant(text("Yes.")),
                          user(text("and once more?"))))
        rendered = [json.dumps(body["messages"][2]) for body in upstream.posts()]
        self.assertEqual(len(set(rendered)), 1, rendered)
        self.assertEqual(first.status()["documents"]["extracted"]
                         + first.status()["documents"]["failed"], 1)
        self.assertEqual(first.status()["documents"]["cached"], 1)
        self.assertEqual(second.status()["documents"], {
            "extracted": 0, "cached": 1, "failed": 0, "entries": 1, "file": path})
        with open(path, "rb") as f:
            self.assertEqual(len(f.readlines()), 1)

    def test_a_document_bigger_than_the_coders_context_is_cut_and_counted(self):
        upstream = FakeUpstream(self, listing=llama_listing(n_ctx=4096))
        self.start(upstream)
        words = "".join("line %d of a long text\n" % i for i in range(5000))
        body = request(user(text("summarise"), text_document(words, title="long.txt")))
        self.assertEqual(self.post(body)[0], 200)
        self.assertEqual(self.post(body)[0], 200)
        first, second = upstream.raw
        self.assertEqual(first[1], second[1])
        sent = upstream.posts()[-1]
        shown = sent["messages"][0]["content"][1]["text"]
        self.assertLess(len(first[1]), 4096 * cr.BYTES_PER_TOKEN)
        self.assertRegex(shown, r"<<DOCUMENT CUT: [\d,]+ of its %s chars left out, to fit the "
                                r"coder's 4,096-token context>>\Z" % format(len(words), ","))
        # The clamp counts the text actually sent: what is left of the context, at least 1024.
        estimate = cr.estimate_tokens(len(json.dumps({**sent, "max_tokens": 32000})))
        self.assertEqual(sent["max_tokens"], max(4096 - estimate, cr.MIN_OUTPUT_TOKENS))

    def test_a_pdf_reaches_the_coder_as_its_text_page_by_page(self):
        upstream = FakeUpstream(self, strict=True)
        self.start(upstream)
        pdf = make_pdf("Invoice 1234\nTotal: 42 EUR (paid)", "Thanks, \u00e9t\u00e9 2026")
        body = request(user(text("What is the total in invoice.pdf?")), assistant(tool_use("t1")),
                       user(tool_result("t1", read_line("/home/u/invoice.pdf", len(pdf)),
                                        pdf_document(pdf, context="from accounting"))))
        status, _, reply = self.post(body)
        self.assertEqual((status, reply["content"]), (200, [text("ok")]))
        sent = upstream.posts()[-1]["messages"][2]["content"][0]["content"]
        self.assertEqual(sent, [read_line("/home/u/invoice.pdf", len(pdf)), text(
            "<<DOCUMENT TEXT: invoice.pdf, 2 pages>>\nContext: from accounting\n--- page 1 ---\n"
            "Invoice 1234\nTotal: 42 EUR (paid)\n--- page 2 ---\nThanks, \u00e9t\u00e9 2026")])
        self.assertIn("document: invoice.pdf, 2 pages, 49 chars, extracted\n", self.log.getvalue())

    def test_an_encrypted_pdf_is_a_marker_and_the_coder_answers(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        body = request(user(text("read it")), assistant(tool_use("t1")), user(tool_result(
            "t1", read_line("/x/secret.pdf"), pdf_document(encrypted_pdf(b"BT /F1 12 Tf 72 720 Td (x) Tj ET", 3, user=b"secret")))))
        status, _, reply = self.post(body, headers={"Accept": "text/event-stream"})
        self.assertEqual(status, 200, reply)
        self.assertEqual(upstream.posts()[-1]["messages"][2]["content"][0]["content"][1],
                         text("<<DOCUMENT: secret.pdf could not be read: encrypted>>"))

    def test_a_scanned_page_is_described_once_in_its_place_even_in_answer_mode(self):
        vision = FakeUpstream(self, default=lambda handler, body: json_reply(message_json(
            "Invoice 77, total 9 EUR."))(handler))
        coder = FakeUpstream(self)
        self.start(coder, vision_upstream_url=vision.url)
        pdf = make_pdf("Cover letter", JPEG_A)
        turn = [user(text("read scan.pdf")), assistant(tool_use("t1")),
                user(tool_result("t1", read_line("/x/scan.pdf"), pdf_document(pdf)))]
        self.assertEqual(self.post(request(*turn))[0], 200)
        self.assertEqual(self.post(request(*turn, assistant(text("ok")),
                                           user(text("the total?"))))[0], 200)
        asked = vision.posts()
        self.assertEqual(len(asked), 1)
        self.assertEqual(asked[0]["system"], cr.DESCRIBE_PROMPT)
        self.assertEqual(asked[0]["messages"][0]["content"], [
            text(cr.PAGE_CONTEXT % (2, "scan.pdf")),
            image_of(JPEG_A, "image/jpeg")])
        first, second = coder.posts()
        self.assertEqual(first["messages"][2], second["messages"][2])
        self.assertEqual(first["messages"][2]["content"][0]["content"][1:], [
            text("<<DOCUMENT TEXT: scan.pdf, 2 pages>>\n--- page 1 ---\nCover letter\n"
                 + cr.SCANNED_PAGE_HEADER % 2),
            text("<<IMAGE DESCRIPTION: Invoice 77, total 9 EUR.>>")])
        self.assertIn("document: scan.pdf, 2 pages, 12 chars, extracted, 1 page image(s)\n",
                      self.log.getvalue())

    def test_a_scanned_page_the_vision_model_cannot_read_is_a_marker(self):
        upstream = VisionFailureTest.no_vision_server(self)
        self.start(upstream)
        body = request(user(text("what does it say?"), pdf_document(make_pdf(JPEG_A))))
        status, _, reply = self.post(body)
        self.assertEqual((status, reply["content"]), (200, [text("I cannot see it.")]))
        self.assertEqual(upstream.posts()[-1]["messages"][0]["content"][1:], [
            text("<<DOCUMENT TEXT: document, 1 page>>\n" + cr.SCANNED_PAGE_HEADER % 1),
            text("<<IMAGE: could not be read by the vision model: image input is not supported>>")])

    def test_routers_sharing_a_cache_dir_read_a_pdf_once(self):
        upstream = FakeUpstream(self)
        first, second = self.start(upstream), self.start(upstream)
        body = request(user(text("q"), pdf_document(make_pdf("Shared text."))))
        self.post(body, conn=self.connect(first))
        self.post(body, conn=self.connect(second))
        self.assertEqual([(r.status()["documents"]["extracted"], r.status()["documents"]["cached"])
                          for r in (first, second)], [(1, 0), (0, 1)])
        self.assertEqual(upstream.raw[0][1], upstream.raw[1][1])

    def test_a_scanned_page_without_a_vision_model_is_the_image_marker(self):
        upstream = FakeUpstream(self)
        self.start(upstream, vision_model="")
        body = request(user(text("what does it say?"), pdf_document(make_pdf(JPEG_A))))
        self.assertEqual(self.post(body)[0], 200)
        self.assertEqual(upstream.posts()[-1]["messages"][0]["content"][1:], [
            text("<<DOCUMENT TEXT: document, 1 page>>\n--- page 1: no text layer; its image "
                 "follows ---"), text(cr.UNKNOWN_IMAGE_MARKER)])

    def test_a_pdf_is_extracted_once_ever_and_reads_the_same_after_a_restart(self):
        upstream = FakeUpstream(self)
        first = self.start(upstream)
        pdf = make_pdf("The number is 4417.")
        turn = [user(text("read it")), assistant(tool_use("t1")),
                user(tool_result("t1", read_line("/x/n.pdf"), pdf_document(pdf))),
                assistant(text("Done."))]
        self.post(request(*turn[:3]))
        self.post(request(*turn, user(text("again?"))))
        first.shutdown()
        second = self.start(upstream)
        second.documents.cache.load()
        self.post(request(*turn, user(text("again?")), assistant(text("Yes.")),
                          user(text("and once more?"))))
        rendered = {json.dumps(body["messages"][2]) for body in upstream.posts()}
        self.assertEqual(len(rendered), 1)
        self.assertIn("The number is 4417.", rendered.pop())
        self.assertEqual((first.status()["documents"]["extracted"],
                          first.status()["documents"]["cached"]), (1, 1))
        self.assertEqual((second.status()["documents"]["extracted"],
                          second.status()["documents"]["cached"]), (0, 1))

    def test_the_route_line_and_status_say_what_became_of_each_document(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        self.post(request(user(text("q"), text_document("abc", title="a.txt"),
                               document({"type": "url", "url": "https://x.org/b.pdf"}))))
        log = self.log.getvalue()
        self.assertIn("document: a.txt, text source, 3 chars\n", log)
        self.assertIn("document: document could not be read: the router fetches nothing from "
                      "the internet (https://x.org/b.pdf)\n", log)
        self.assertEqual(self.router.status()["documents"]["entries"], 0)


################ Encoding and estimates

class EncodingTest(unittest.TestCase):
    """One encode per turn: the body's bytes, the estimate, the clamp and the prompt's parts."""

    def test_the_encoded_body_is_the_json_of_the_body(self):
        shot = base64.b64encode(os.urandom(3000)).decode()
        rows = [
            ("no images", request(user(text("hi \u00e9 \"q\"")), system="s", max_tokens=9), True),
            ("images everywhere", request(user(image(PNG_A), text("\"quoted\" \u00e9")),
                                          assistant(tool_use("t1")),
                                          user(tool_result("t1", image(PNG_B), text("x")),
                                               image(PNG_A), image(shot))), False),
            ("url image", request(user({"type": "image", "source": {
                "type": "url", "url": "https://x/\"y\".png"}})), True),
            ("data that is not base64 is encoded, not spliced",
             request(user(image('http:", "injected": true, "x": "')), user(image("\u00e9"))), True),
        ]
        for name, body, same_bytes in rows:
            with self.subTest(name):
                encoded = cr.EncodedRequest(body, cr.image_keys(body["messages"]))
                data = joined(encoded.data())
                self.assertEqual((json.loads(data), len(data)), (body, encoded.length))
                if same_bytes:
                    self.assertEqual(data, json.dumps(body).encode())

    def test_a_clamp_splices_max_tokens_into_the_same_bytes(self):
        body = request(user(text("q " * 3000), image(PNG_A)), max_tokens=32000)
        encoded = cr.EncodedRequest(body, cr.image_keys(body["messages"]))
        estimate = encoded.tokens()
        self.assertEqual(estimate, cr.estimate_tokens(encoded.length, len(PNG_A), 1))
        encoded.clamp(estimate + 5000)
        data = joined(encoded.data())
        self.assertEqual((json.loads(data), len(data)), ({**body, "max_tokens": 5000}, encoded.length))
        encoded.clamp(None)
        self.assertEqual(encoded.max_tokens, 5000)

    def test_clamped_max_tokens(self):
        rows = [(32000, 20000, 32768, 12768), (1000, 20000, 32768, 1000),
                (32000, 40000, 32768, cr.MIN_OUTPUT_TOKENS), (32000, 100, None, 32000),
                (None, 100, 200, None)]
        for asked, estimate, context, expected in rows:
            with self.subTest(asked=asked, estimate=estimate, context=context):
                self.assertEqual(cr.clamped_max_tokens(asked, estimate, context), expected)

    def test_prompt_parts_follow_the_prefix_and_know_images_by_their_key(self):
        def parts(*messages):
            body = request(*messages, system="s", tools=[{"name": "t"}])
            return cr.EncodedRequest(body, cr.image_keys(body["messages"])).prompt_parts()
        first = parts(user(text("q"), image(PNG_A)))
        again = parts(user(text("q"), image(PNG_A)), assistant(text("a")))
        other = parts(user(text("q"), image(PNG_B)))
        self.assertEqual(first[0], ["system", "tools", "message 0"])
        self.assertEqual(again[0][:3], first[0])
        self.assertEqual(again[1][:48], first[1])   # the same image, another request
        self.assertEqual(other[1][:32], first[1][:32])
        self.assertNotEqual(other[1][32:48], first[1][32:48])
        self.assertEqual(first[2][2], len(json.dumps(user(text("q"), image(PNG_A)))))

    def test_estimate_errs_high_and_costs_images(self):
        self.assertEqual(cr.estimate_tokens(3001), 1001)
        self.assertEqual(cr.estimate_tokens(10_000 + 300, 10_000, 1), 100 + cr.IMAGE_TOKENS)

    def test_conversations_remembered_are_bounded_oldest_first(self):
        memory = cr.PromptMemory(max_entries=2)
        names, digests, sizes = cr.EncodedRequest({"messages": [user(text("q"))]}, {}).prompt_parts()
        for conversation in ("a", "b", "a", "c", "b", "a"):
                memory.note_prompt(conversation, "M", names, digests, sizes, 99)
        self.assertEqual(list(memory.prompts), [("b", "M"), ("a", "M")])
        self.assertIsNone(memory.note_prompt("c", "M", names, digests, sizes, 99))


class EstimateTest(RouterTestCase):

    def test_a_described_screenshot_in_the_history_leaves_max_tokens_alone(self):
        # One 1.9 MB screenshot anywhere in the history made every later coder turn's
        # max_tokens the 1024 floor when the context length was known (issue 10).
        shot = base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(300_000)).decode()
        upstream = FakeUpstream(self, listing={"data": [{"id": "CODER", "meta": {"n_ctx": 16384}}]},
                                count_tokens=(404, {"error": "no"}))
        self.start(upstream)
        self.router.vision.cache.store({key(shot): "a login form"}, "VISION")
        history = [user(text("look"), image(shot)), assistant(text("A login form.")),
                   user(tool_result("t0", text("x")), text("fix it"))]
        self.post(request(*history))
        sent = upstream.posts()[-1]
        unclamped = {**sent, "max_tokens": 32000}
        self.assertEqual(sent["max_tokens"],
                         16384 - cr.estimate_tokens(len(json.dumps(unclamped))))
        self.assertGreater(sent["max_tokens"], 16000)
        _, _, counted = self.call("POST", "/v1/messages/count_tokens", request(*history))
        self.assertEqual(counted["input_tokens"], cr.estimate_tokens(len(json.dumps(
            {k: v for k, v in unclamped.items() if k != "max_tokens"}))))

    def test_images_still_sent_as_pixels_cost_a_fixed_amount(self):
        body = request(user(text("q"), image(PNG_A)), user(tool_result("t", image(PNG_B))))
        encoded = cr.EncodedRequest(body, cr.image_keys(body["messages"]))
        self.assertEqual(encoded.tokens(), cr.estimate_tokens(
            len(json.dumps(body)), len(PNG_A) + len(PNG_B), 2))


class CacheReportTest(RouterTestCase):
    """What the route line, the usage line and /status say about the server's prefix cache."""

    def test_route_line_says_how_much_of_the_last_prompt_is_sent_again(self):
        usage = {"input_tokens": 100, "cache_read_input_tokens": 900, "output_tokens": 0}
        streamed = text_events("ok")
        streamed[0][1]["message"]["usage"] = usage
        upstream = FakeUpstream(self, [stream_reply(streamed)])
        self.start(upstream)
        turn = [user(text("read a.py")), system_message("cwd: /p")]
        grown = turn + [assistant(text("done")), user(text("next")),
                        system_message("<total_tokens>9 tokens left</total_tokens>")]
        session = {"X-Claude-Code-Session-Id": "s1"}
        rows = [
            ("first", request(*turn, system="top", stream=True), session, "first turn"),
            ("grown", request(*grown, system="top"), session, "100.0% as last turn"),
            # Without Claude Code's hint headers, each system text keeps its own books.
            ("new system text", request(*grown, system="other"), session, "first turn"),
            ("another session", request(*grown, system="other"), {"X-Claude-Code-Session-Id": "s2"},
             "first turn"),
            ("no session header", request(*turn, system="top"), {}, "first turn"),
            ("same conversation by its head", request(*grown, system="top"), {},
             "100.0% as last turn"),
            ("history rewritten", request(user(text("read b.py")), *grown[1:], system="other"),
             session, "changed from message 0 on"),
        ]
        for name, body, headers, said in rows:
            with self.subTest(name):
                self.post(body, headers=headers)
                line = [l for l in self.log.lines() if l.startswith("→")][-1]
                size = len(upstream.raw[-1][1]) / 1024
                self.assertRegex(line, r"^→ coder \[CODER\] %.1f KB, " % size)
                self.assertIn(said, line)
        self.assertIn("usage [CODER]: 1000 prompt tokens, 900 of them from the server's cache",
                      self.log.getvalue())
        _, _, status = self.call("GET", "/status")
        coder = status["prompt_cache"]["CODER"]
        sent = [len(raw) for _, raw in upstream.raw]
        self.assertEqual((coder["last_turn"]["bytes"], coder["totals"]["bytes"]),
                         (sent[-1], sum(sent)))
        self.assertEqual(coder["totals"]["turns"], 7)
        self.assertEqual((coder["totals"]["input_tokens"], coder["totals"]["cache_read_input_tokens"],
                          coder["totals"]["output_tokens"]), (100 + 6 * 5, 900, 6 * 3 + 3))
        self.assertLess(coder["totals"]["unchanged_bytes"], coder["totals"]["bytes"])

    def test_parts_seen_before_come_back_as_encoded_and_equal_values_of_other_types_do_not(self):
        memo = cr.EncodedParts(max_bytes=4000)
        rows = [{"a": 1}, {"a": True}, {"a": 1.0}, {"a": 1}, user(text("q")), user(text("q"))]
        for value in rows:
            with self.subTest(value):
                self.assertEqual(memo.encode(value), cr.encode_part(value))
        self.assertEqual(len(memo.parts), 4)
        for i in range(100):
            memo.encode(user(text("message %d" % i)))
        self.assertLessEqual(memo.size, 4000)
        self.assertEqual(memo.size, sum(len(k) + len(v[0]) for k, v in memo.parts.items()))

    def test_a_turn_encodes_only_the_messages_it_adds(self):
        memo = cr.EncodedParts()
        history = [user(text("q")), assistant(text("a"))]
        first = cr.EncodedRequest(request(*history, system="s"), {}, memo)
        again = cr.EncodedRequest(request(*history, user(text("more")), system="s"), {}, memo)
        self.assertIs(again.messages[1][0][0], first.messages[1][0][0])
        self.assertEqual(joined(again.data()),
                         json.dumps(request(*history, user(text("more")), system="s")).encode())


################ Event streams

class EventStreamTest(unittest.TestCase):
    """The one splitter every reader of an upstream event stream goes through."""

    STREAMS = [
        ("LF", b"event: a\ndata: {\"n\": 1}\n\nevent: b\ndata: 2\n\n"),
        ("CRLF", b"event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2\r\n\r\n"),
        ("CR", b"event: a\rdata: 1\r\revent: b\rdata: 2\r\r"),
        ("mixed", b"event: a\r\ndata: 1\n\r\nevent: b\rdata: 2\r\n\revent: c\ndata: 3\r\r\n"
                  b"data: 4\n\n\n\ndata: 5\r\n\n"),
    ]

    def split(self, pieces, limit=cr.MAX_EVENT_BYTES):
        """Feed pieces to one splitter; return (its events, the bytes it returned, the rest)."""
        splitter = cr.EventSplitter(limit)
        out = [splitter.feed(p) for p in pieces]
        return [e for block in out for e in cr.sse_events(block)], b"".join(out), splitter

    def test_line_ends_of_every_kind_give_the_same_events(self):
        expected = {"LF": [b"event: a\ndata: {\"n\": 1}", b"event: b\ndata: 2"],
                    "mixed": [b"event: a\ndata: 1", b"event: b\ndata: 2", b"event: c\ndata: 3",
                              b"data: 4", b"data: 5"]}
        for name, data in self.STREAMS:
            with self.subTest(name):
                events, out, splitter = self.split([data])
                self.assertEqual(events, expected.get(name, [b"event: a\ndata: 1",
                                                             b"event: b\ndata: 2"]))
                self.assertFalse(splitter.has_partial())

    def test_splits_at_every_byte_boundary_give_the_same_events(self):
        for name, data in self.STREAMS:
            whole, _, _ = self.split([data])
            for cut in [*range(len(data) + 1), "bytewise"]:
                with self.subTest(name, cut=cut):
                    pieces = ([data[i:i + 1] for i in range(len(data))] if cut == "bytewise"
                              else [data[:cut], data[cut:]])
                    events, out, splitter = self.split(pieces)
                    self.assertEqual(events, whole)
                    self.assertEqual(out + b"".join(splitter.held), data)

    def test_a_crlf_cut_between_reads_is_one_line_end(self):
        rows = [([b"data: 1\r", b"\ndata: 2\n\n"], [b"", b"data: 1\r\ndata: 2\n\n"]),
                ([b"data: 1\r", b"\r"], [b"", b"data: 1\r\r"]),
                ([b"data: 1\r", b"\n", b"\r", b"\ndata: 2"], [b"", b"", b"data: 1\r\n\r", b""])]
        for pieces, expected in rows:
            with self.subTest(pieces):
                splitter = cr.EventSplitter()
                self.assertEqual([splitter.feed(p) for p in pieces], expected)

    def test_an_event_past_the_bound_is_refused_not_held(self):
        splitter = cr.EventSplitter(1000)
        self.assertEqual(splitter.feed(b"data: 1\n\ndata: " + b"x" * 900), b"data: 1\n\n")
        with self.assertRaises(cr.EventTooLarge):
            splitter.feed(b"x" * 101)
        small = cr.EventSplitter(1000)
        self.assertEqual(small.feed(b"data: " + b"x" * 990 + b"\n\n"), b"data: " + b"x" * 990 + b"\n\n")

    def test_the_capture_reads_whole_events_from_the_splitter(self):
        raw = sse(*text_events("Hello world")).replace(b"\n", b"\r\n")
        for step in (1, 7, len(raw)):
            with self.subTest(step=step):
                splitter, capture = cr.EventSplitter(), cr.ReplyCapture()
                for i in range(0, len(raw), step):
                    capture.feed(splitter.feed(raw[i:i + step]))
                self.assertEqual(capture.text(), "Hello world")
                self.assertEqual(capture.usage, {"input_tokens": 5, "output_tokens": 3})

    def test_marked_events_are_the_events_holding_a_mark(self):
        marks = (b"message_", b"error")
        streams = [*self.STREAMS, ("none", sse(*text_events("x")[1:5])),
                   ("all", sse(*text_events("x"))), ("first and last", b"data: message_\n\n"
                    b"data: 1\n\n\n\ndata: error\r\n\r\ndata: message_error\n\n"),
                   ("in text", sse(("content_block_delta", {"text": "an error message_"})))]
        for name, data in streams:
            with self.subTest(name):
                self.assertEqual(cr.marked_events(data, marks), [
                    e for e in cr.sse_events(data) if any(m in e for m in marks)])

    def test_the_capture_without_text_reads_usage_and_the_end(self):
        events = text_events("Hello")
        rows = [("whole", [sse(*events)], True, None),
                ("in pieces", [sse(e) for e in events], True, None),
                ("cut", [sse(*events[:4])], False, None),
                ("failed", [sse(*events[:3], ("error", {"type": "error", "error": {
                    "message": "overloaded"}}), events[-1])], True, "overloaded")]
        for name, blocks, complete, failed in rows:
            with self.subTest(name):
                capture = cr.ReplyCapture(keep_text=False)
                for block in blocks:
                    capture.feed(block)
                self.assertEqual((capture.complete, capture.failed, capture.parts),
                                 (complete, failed, []))
                self.assertEqual(capture.usage["input_tokens"], 5)
                self.assertEqual(capture.stop_reason, "end_turn" if failed is None and complete
                                 else None)

    def test_reply_capture_stores_nothing_for_cut_or_failed_streams(self):
        events = text_events("Hello")
        cut, failed = cr.ReplyCapture(), cr.ReplyCapture()
        cut.feed(sse(*events[:4]))
        failed.feed(sse(*events[:3], ("error", {"type": "error", "error": {}}), events[-1]))
        self.assertEqual((cut.text(), failed.text()), ("", ""))


################ Upstream

class UpstreamTest(unittest.TestCase):
    """What a model server's refusals and listings mean."""

    def test_a_request_head_is_what_http_client_writes(self):
        # open_upstream writes the head itself, to send it in one piece with the body;
        # http.client, given the same request, writes it byte for byte alike.
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        rows = [("POST", "/v1/messages", [("Content-Type", "application/json"),
                                          ("Content-Length", "2")], b"{}"),
                ("POST", "/api/x?y=1", [("x-MiXed", " a\tb "), ("X-Empty", "")], b"abc"),
                ("POST", "/v1/messages/count_tokens", [], bytearray(b"[1]")),
                ("POST", "/v1/x", [], None), ("GET", "/v1/models", [], None),
                ("HEAD", "/api/hello", [("X-Latin", "caf\xe9")], None)]
        for url in ("http://127.0.0.1:%d" % port, "http://127.0.0.1:%d/base/" % port):
            parts = urllib.parse.urlsplit(url)
            for method, path, headers, body in rows:
                with self.subTest(url=url, path=path):
                    target = parts.path.rstrip("/") + path
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
                    conn.request(method, target, body, dict(headers))
                    conn.close()        # all of it is sent: what the server reads ends there
                    server, _ = listener.accept()
                    with server:
                        server.settimeout(TIMEOUT)
                        received = b""
                        while data := server.recv(65536):
                            received += data
                    head = cr.request_head(method, target, cr.host_header(parts), headers, body)
                    self.assertEqual(received, head + bytes(body or b""))

    def test_host_headers_and_refused_heads(self):
        rows = [("http://127.0.0.1:8080", "127.0.0.1:8080"), ("http://LocalHost", "localhost"),
                ("http://[::1]:1234/x", "[::1]:1234"), ("http://h:80", "h")]
        for url, host in rows:
            with self.subTest(url):
                self.assertEqual(cr.host_header(urllib.parse.urlsplit(url)), host)
        bad = [("GET", "/a b", [], http.client.InvalidURL),
               ("GET", "/a HTTP/1.1\r\nX-Injected: 1\r\nX: /b", [], http.client.InvalidURL),
               ("GET", "/", [("X-A", "1\r\nX-Injected: 1")], ValueError),
               ("GET", "/", [("X-A", "1\nX-Injected: 1")], ValueError),
               ("GET", "/", [("X A", "1")], ValueError), ("GET", "/", [("X-A", "\x1b[2J")], ValueError),
               ("GET", "/", [("X-A", "\u20ac")], ValueError),
               ("POST", "/", [], iter([b"pieces", b"without a length"]), ValueError)]
        for method, target, headers, *body, error in bad:
            with self.subTest(target=target, headers=headers):
                with self.assertRaises(error):
                    cr.request_head(method, target, "h", headers, body[0] if body else None)

    def test_failure_reasons_are_short_single_lines(self):
        rows = [
            (b'{"error":{"code":500,"message":"image input is not supported - hint: if this '
             b'is unexpected, you may need to provide the mmproj","type":"server_error"}}',
             "image input is not supported"),
            (b'{"type":"error","error":{"type":"invalid_request_error","message":"Model does '
             b'not support images. Please use a model that does."}}',
             "Model does not support images"),
            (b"upstream says\x1b[31m <no>\r\nmore", "upstream says [31m no more"),
            (b"x" * 500, "x" * (cr.FAILURE_REASON_CHARS - 3) + "..."),
        ]
        for raw, expected in rows:
            with self.subTest(raw[:20]):
                self.assertEqual(cr.short_reason(cr.upstream_message(raw)), expected)
                self.assertNotRegex(expected, r"[\x00-\x1f<>]")

    def test_overflow_texts_of_each_backend(self):
        rows = [
            ("llama-server", '{"error":{"code":400,"message":"request (80030 tokens) exceeds the '
             'available context size (32768 tokens), try increasing it","type":'
             '"exceed_context_size_error","n_prompt_tokens":80030,"n_ctx":32768}}',
             "prompt is too long: 80030 tokens > 32768 maximum"),
            ("lm studio keep", "Trying to keep the first 111490 tokens when context the overflows. "
             "However, the model is loaded with context length of only 32768 tokens, which is "
             "not enough.", "prompt is too long: 111490 tokens > 32768 maximum"),
            ("lm studio n_keep", "Cannot truncate prompt with n_keep (15028) >= n_ctx (7424)",
             "prompt is too long: 15028 tokens > 7424 maximum"),
            ("lm studio no numbers", "The number of tokens to keep from the initial prompt is "
             "greater than the context length. Try to load the model with a larger context",
             "prompt is too long: 5001 tokens > 5000 maximum"),
            ("vllm", "This model's maximum context length is 4096 tokens. However, you requested "
             "5000 tokens (4000 in the messages, 1000 in the completion).",
             "prompt is too long: 4097 tokens > 4096 maximum"),
            ("vllm 0.10-0.17", "This model's maximum context length is 4096 tokens. However, your "
             "request has 5000 input tokens. Please reduce the length of the input messages.",
             "prompt is too long: 5000 tokens > 4096 maximum"),
            ("vllm 0.18", "This model's maximum context length is 4096 tokens. However, you "
             "requested 1000 output tokens and your prompt contains at least 4500 input tokens, "
             "for a total of at least 5500 tokens. Please reduce the length of the input prompt "
             "or the number of requested output tokens. (parameter=input_tokens, value=4500)",
             "prompt is too long: 4500 tokens > 4096 maximum"),
            ("vllm 0.18 characters", "This model's maximum context length is 4096 tokens. However, "
             "you requested 1000 output tokens and your prompt contains 90000 characters (more "
             "than 12288 characters, which is the upper bound for 3096 input tokens).",
             "prompt is too long: 4097 tokens > 4096 maximum"),
            ("vllm max_tokens, prompt leaves no room to answer", "'max_tokens' or "
             "'max_completion_tokens' is too large: 1024. This model's maximum context length is "
             "32768 tokens and your request has 32000 input tokens (1024 > 32768 - 32000).",
             "prompt is too long: 32769 tokens > 32768 maximum"),
            ("lm studio 500", '{"type":"error","error":{"type":"api_error","message":"Context '
             'size has been exceeded."}}', "prompt is too long: 5001 tokens > 5000 maximum"),
            ("lm studio engine", "Engine protocol predict stream returned an error: {code:500, "
             "message:'Context size has been exceeded'}",
             "prompt is too long: 5001 tokens > 5000 maximum"),
            ("lm studio n_keep:", "The number of tokens to keep from the initial prompt is "
             "greater than the context length (n_keep: 13055>= n_ctx: 4096). Try to load the "
             "model with a larger context length, or provide a shorter input.",
             "prompt is too long: 13055 tokens > 4096 maximum"),
            ("vllm prompt", "The prompt (total length 25938) is too long to fit into the model "
             "(context length 4096).", "prompt is too long: 25938 tokens > 4096 maximum"),
            ("ollama", "input length exceeds the context length",
             "prompt is too long: 5001 tokens > 5000 maximum"),
        ]
        for name, upstream_text, expected in rows:
            with self.subTest(name):
                self.assertEqual(cr.overflow_error(upstream_text, 4000, 5000),
                                 {"type": "error", "error": {"type": "invalid_request_error",
                                                             "message": expected}})
        self.assertIsNone(cr.overflow_error('{"error": "model not found"}', 4000, 5000))

    def test_refused_output_budgets_are_not_overflows(self):
        # vLLM refuses max_tokens that do not fit beside a prompt that does; compacting the
        # conversation would not help, so these must not become "prompt is too long".
        rows = [
            ("vllm 0.10-0.17", "'max_tokens' or 'max_completion_tokens' is too large: 32000. "
             "This model's maximum context length is 32768 tokens and your request has 12000 "
             "input tokens (32000 > 32768 - 12000)."),
            ("vllm 0.18", "This model's maximum context length is 32768 tokens. However, you "
             "requested 32000 output tokens and your prompt contains 12000 input tokens, for a "
             "total of 44000 tokens. Please reduce the length of the input prompt or the number "
             "of requested output tokens. (parameter=input_tokens, value=12000)"),
            ("vllm before 0.10", "This model's maximum context length is 32768 tokens. However, "
             "you requested 44000 tokens (12000 in the messages, 32000 in the completion). "
             "Please reduce the length of the messages or completion."),
            ("vllm 0.18 max_tokens alone", "max_tokens=40000 cannot be greater than "
             "max_model_len=max_total_tokens=32768. Please request fewer output tokens. "
             "(parameter=max_tokens, value=40000)"),
            ("lm studio crash", '{"type":"error","error":{"type":"api_error","message":"The model '
             'has crashed without additional information. (Exit code: null)"}}'),
        ]
        for name, upstream_text in rows:
            with self.subTest(name):
                self.assertIsNone(cr.overflow_error(upstream_text, 4000, 32768))

    def test_an_overflow_is_read_only_in_an_opening_error_event(self):
        overflow = {"type": "error", "error": {"message": "request (9 tokens) exceeds the "
                                               "available context size (8 tokens)"}}
        rows = [("error event", sse(("error", overflow)), "prompt is too long: 9 tokens > 8 maximum"),
                ("crlf and a partial second event", sse(("error", overflow)).replace(b"\n", b"\r\n")
                 + b"event: ping", "prompt is too long: 9 tokens > 8 maximum"),
                ("other error", sse(("error", {"type": "error", "error": {"message": "x"}})), None),
                ("normal start", sse(*text_events("request (9 tokens) exceeds the available "
                                                  "context size (8 tokens)")), None)]
        for name, head, expected in rows:
            with self.subTest(name):
                text = cr.opening_error(head)     # as a turn reads a stream's head
                got = text and cr.overflow_error(text, 100, 200)
                self.assertEqual(got and got["error"]["message"], expected)

    def test_upstream_messages_in_each_servers_shape(self):
        rows = [(b'{"type":"error","error":{"type":"api_error","message":"boom"}}', "boom"),
                (b'{"error":"model not found"}', "model not found"),
                (b'{"object":"error","message":"max_tokens is too large"}', "max_tokens is too large"),
                (b'{"detail":"Not Found"}', "Not Found"),
                (b"Internal\n  Server Error", "Internal Server Error"),
                (b'{"error":{"code":1}}', '{"error":{"code":1}}'), (b"x" * 999, "x" * 300)]
        for raw, message in rows:
            with self.subTest(raw=raw[:40]):
                self.assertEqual(cr.upstream_message(raw), message)


class UpstreamFaultTest(RouterTestCase):
    """A model server that is down, silent, or asks for a key."""

    def test_upstream_down_is_529_naming_it(self):
        port = refused_port(self)
        router = self.start("http://127.0.0.1:%d" % port)
        status, _, reply = self.post(request(user(text("hi"))))
        self.assertEnvelope(status, reply, 529, "overloaded_error")
        self.assertIn("127.0.0.1:%d" % port, reply["error"]["message"])
        self.assertEqual(router.status()["last_upstream_error"]["message"], reply["error"]["message"])

    def test_upstream_that_never_accepts_is_529_within_the_connect_timeout(self):
        # A LAN box asleep drops SYNs; so does Linux when a listen queue is full
        # (tcp_conn_request), which listen(0) and one waiting connection make happen.
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        waiting = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.addCleanup(waiting.close)
        self.start("http://127.0.0.1:%d" % port, connect_timeout=0.2, read_timeout=TIMEOUT * 4)
        status, _, reply = self.post(request(user(text("hi"))))
        self.assertEnvelope(status, reply, 529, "overloaded_error")
        self.assertIn("127.0.0.1:%d is not reachable" % port, reply["error"]["message"])

    def test_a_trickled_listing_or_props_ends_within_its_timeout(self):
        # The model-list refresh runs on a client connection's thread after its answer,
        # holding its connection slot: a server that trickled /props a byte a second
        # (each read within the timeout) held it for as long as it liked, and with a
        # refresh every 30 s the router ran out of slots.
        stop = threading.Event()
        self.addCleanup(stop.set)
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)

        def trickle():
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{")
                while not stop.wait(0.02):
                    conn.sendall(b" ")
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        url = "http://127.0.0.1:%d" % listener.getsockname()[1]
        ended = []
        worker = threading.Thread(target=lambda: ended.append(cr.server_start_mark(url, 0.3)),
                                  daemon=True)
        worker.start()
        worker.join(TIMEOUT)
        self.assertEqual(ended, [None])

    def test_upstream_silent_before_headers_is_504(self):
        hang = threading.Event()
        self.addCleanup(hang.set)
        upstream = FakeUpstream(self, [lambda handler: hang.wait(TIMEOUT)])
        self.start(upstream, read_timeout=0.2)
        status, _, reply = self.post(request(user(text("hi"))))
        self.assertEnvelope(status, reply, 504, "timeout_error")

    def test_client_hanging_up_while_the_model_is_silent_closes_the_upstream(self):
        # Esc in Claude Code while a local model reads a long prompt: the router must
        # give up the upstream request then, not at the model's next write (or, for a
        # non-streamed request, after its whole answer).
        def silent(stream, phase, arrived, closed):
            def reply(handler):
                if phase != "before headers":
                    begin_stream(handler)
                if phase == "after the first event":
                    write_chunk(handler, sse(text_events("x")[0]))
                if phase == "after a piece of the answer":
                    write_chunk(handler, sse(*text_events("xy")[:3]))
                arrived.set()
                handler.close_connection = True
                if sees_close(handler.connection):
                    closed.set()
            return reply

        for stream, phase in ((False, "before headers"), (True, "before headers"),
                              (True, "after headers"), (True, "after the first event"),
                              (True, "after a piece of the answer")):
            with self.subTest(stream=stream, phase=phase):
                arrived, closed = threading.Event(), threading.Event()
                upstream = FakeUpstream(self, [silent(stream, phase, arrived, closed)])
                self.start(upstream)
                sock = self.post_raw(request(user(text("go")), stream=stream))
                self.assertTrue(arrived.wait(TIMEOUT))
                if phase.startswith("after a"):
                    recv_until(sock, b"text_delta")     # the client has it: it was relayed
                sock.close()
                self.assertTrue(closed.wait(TIMEOUT), "the upstream request stayed open")
                said = [l for l in self.log.lines() if l.startswith("client went away")][-1]
                # What it had of the answer: 'silent' only when it had none of it (issue 16;
                # a message_start, as llama-server's comments, says nothing yet).
                self.assertEqual(said, "client went away %s; closed the upstream request" % (
                    "after 1 piece of the answer (%d B) reached it" % len(sse(
                        *text_events("xy")[:3])) if phase == "after a piece of the answer"
                    else "while the model was silent"))

    def test_interim_upstream_responses_are_skipped(self):
        def interim(handler):
            handler.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                                b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
            send_json(handler, 200, message_json("after the hints"))

        self.start(FakeUpstream(self, [interim]))
        status, headers, reply = self.post(request(user(text("hi"))))
        self.assertEqual((status, reply), (200, message_json("after the hints")))
        self.assertIsNone(headers["link"])
        self.assertEqual(self.call("GET", "/")[0], 200)

    def test_upstream_key_goes_on_every_upstream_request_and_is_never_shown(self):
        upstream = FakeUpstream(self, listing={"models": [
            {"key": "CODER", "loaded_instances": []},
            {"key": "VISION", "capabilities": {"vision": True}, "loaded_instances": [{}]}]},
            count_tokens=(200, {"input_tokens": 7}),
            default=lambda handler, body: json_reply(message_json("Shows A."))(handler))
        upstream.key = "up-k3y-9"
        self.start(upstream, token="client-token", upstream_key="up-k3y-9", vision_mode="describe")
        client = {"x-api-key": "client-token"}
        self.router.check_upstream(preload=True)
        rows = [("POST", "/v1/messages", request(user(text("look"), image(PNG_A)))),
                ("POST", "/v1/messages/count_tokens", request(user(text("q")))),
                ("GET", "/v1/models", None), ("GET", "/api/v1/models", None)]
        for method, path, body in rows:
            with self.subTest(path=path):
                status, _, reply = self.call(method, path, body, headers=client)
                self.assertEqual(status, 200, reply)
        seen = {(m, p) for m, p, _, _ in upstream.requests}
        self.assertTrue({("GET", "/api/v1/models"), ("POST", "/api/v1/models/load"),
                         ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")} <= seen)
        for method, path, headers, _ in upstream.requests:
            self.assertEqual(headers.get("Authorization"), "Bearer up-k3y-9", (method, path))
            self.assertNotIn("client-token", json.dumps(headers))
        shown = [self.log.getvalue(), json.dumps(self.call("GET", "/status", headers=client)[2]),
                 cr.build_parser({"CLAUDE_ROUTER_UPSTREAM_KEY": "up-k3y-9"}).format_help()]
        for text_ in shown:
            self.assertNotIn("up-k3y-9", text_)


def raw_reply(head, body=b""):
    """A reply written as raw bytes: a status line and header lines as given, then body."""
    def reply(handler):
        handler.close_connection = True
        handler.wfile.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                            % (head, len(body), body))
    return reply


ESCAPES = "\x1b]52;c;aGk=\x07\x1b[2J\x9b1m\x00\x7f"     # the clipboard, a cleared screen, C1, NUL, DEL


def has_controls(data):
    """True when data (bytes or text) holds a control character other than CR, LF and tab."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return any(ord(c) < 32 and c not in "\r\n\t" or 127 <= ord(c) < 160 for c in text)


class UpstreamTrustTest(RouterTestCase):
    """Issue 14, section 3: what a model server sends is input too."""

    def test_model_listings_of_wrong_types_are_read_for_what_they_say(self):
        # A string context_length or a list key stopped the router at startup.
        listings = [
            ("lmstudio", {"models": [
                {"key": ["a"]}, {"key": 5}, {"key": "m1", "capabilities": {"vision": "yes"},
                                             "loaded_instances": [{"id": ["x"], "config": {
                                                 "context_length": "32768"}}]},
                {"key": "m2", "loaded_instances": [{"config": []}, 5]},
                {"key": "m3", "loaded_instances": "all"}, {"key": "m4", "capabilities": []}]}),
            ("openai", {"data": [{"id": ["x"]}, {"id": "d1", "owned_by": ["llamacpp"],
                                                 "meta": {"n_ctx": "4096"}},
                                 {"id": "d2", "meta": [], "max_model_len": 1.5,
                                  "architecture": {"input_modalities": "image"}}],
                        "models": [{"model": ["d1"], "capabilities": ["multimodal"]},
                                   {"model": "d2", "capabilities": "vision"}]}),
            ("not lists", {"models": {"a": 1}, "data": "x"})]
        for name, listing in listings:
            with self.subTest(name):
                router = self.start(FakeUpstream(self, listing=listing))
                lines = router.check_upstream()
                self.assertTrue(all(isinstance(line, str) for line in lines), lines)
                self.assertEqual(self.call("GET", "/status")[0], 200)
                self.assertEqual(self.post(request(user(text("hi"))))[0], 200)
                for info in (router.models or {}).values():
                    self.assertIn(type(info["context_length"]), (int, type(None)))
                    self.assertIn(info["vision"], (True, False, None))

    def test_response_headers_with_control_characters_are_not_relayed(self):
        # Claude Code's Node runtime refuses a response with such a header, and retries it
        # as a connection error.
        bad = [b"X-Esc: a\x1b[2Jb", b"X-Nul: a\x00b", b"X-Del: a\x7fb", b"X-Fold: a\r\n b",
               b"X-Cr: a\rb"]
        body = json.dumps(message_json("ok")).encode()
        rows = [("a reply", b"200 OK\r\nContent-Type: application/json\r\nX-Good: fine", 200),
                ("an error", b"429 Too Many\r\nContent-Type: application/json\r\n"
                             b"Retry-After: 3\x1b[2J\r\nX-Good: fine", 429)]
        for name, head, status in rows:
            with self.subTest(name):
                self.start(FakeUpstream(self, [raw_reply(b"\r\n".join([head] + bad), body)]))
                sock = self.post_raw(request(user(text("hi"))))
                data = recv_until(sock, b"\r\n\r\n")
                head_out = data.split(b"\r\n\r\n")[0]
                self.assertIn(b"HTTP/1.1 %d" % status, head_out)
                self.assertFalse(has_controls(head_out), head_out)
                self.assertNotIn(b"X-Esc", head_out)
                self.assertNotIn(b"X-Fold", head_out)
                self.assertEqual(b"X-Good: fine" in head_out, status == 200)

    def test_what_an_upstream_says_is_escaped_before_a_terminal_shows_it(self):
        # A model id can carry escape sequences that clear the screen or write the clipboard.
        bad_id = "qwen" + ESCAPES
        listing = {"data": [{"id": bad_id, "owned_by": "llamacpp", "meta": {"n_ctx": 4096}}]}
        error = {"error": {"message": "no" + ESCAPES}}
        upstream = FakeUpstream(self, [json_reply(error, 400)], listing=listing)
        router = self.start(upstream)
        lines = router.check_upstream()
        status, _, reply = self.post(request(user(text("hi"))))
        self.assertEqual(status, 400)
        _, _, raw_status = self.call("GET", "/status", headers={"Accept": "text/plain"})
        shown = [*lines, reply["error"]["message"], self.log.getvalue(),
                 json.dumps(raw_status, ensure_ascii=False), cr.status_line(raw_status)]
        for text_shown in shown:
            self.assertFalse(has_controls(text_shown), text_shown)
        self.assertIn("qwen\\x1b]52;c;aGk=\\x07", cr.status_line(raw_status))
        self.assertIn("no\\x1b]52", raw_status["last_upstream_error"]["message"])

    def test_overflow_is_read_in_the_servers_own_message_not_in_an_echo(self):
        # A refusal that echoes the conversation back was taken for an overflow whenever
        # the conversation mentioned one, and Claude Code compacted for nothing.
        said = "we talked about 'prompt is too long: 5 tokens > 4' yesterday"
        rows = [("json", json_reply({"error": {"message": "tools.0: unknown field",
                                               "request": {"messages": [user(text(said))]}}}, 400),
                 "tools.0: unknown field"),
                ("pydantic detail", json_reply({"object": "error", "message": "invalid request",
                                                "detail": [{"input": said}]}, 400),
                 "invalid request")]
        for name, reply, message in rows:
            with self.subTest(name):
                self.start(FakeUpstream(self, [reply]))
                status, _, answer = self.post(request(user(text(said))))
                self.assertEnvelope(status, answer, 400)
                self.assertEqual(answer["error"]["message"], message)
        opening = ("error", {"type": "error", "error": {"type": "invalid_request_error",
                                                        "message": "bad tool"}, "echo": said})
        self.start(FakeUpstream(self, [stream_reply([opening])]))
        status, _, answer = self.post(request(user(text(said)), stream=True))
        self.assertEqual(status, 200, answer)      # the stream as the server sent it
        self.assertIn(b'"message": "bad tool"', answer)

    def test_a_describe_reply_that_is_no_object_fails_with_a_reason(self):
        # Every retry was a 500: the reply was read as a dict.
        for name, reply in [("list", json_reply([1, 2])), ("string", json_reply("a cat")),
                            ("not json", raw_reply(b"200 OK\r\nContent-Type: application/json",
                                                   b"<html>")),
                            ("content not a list", json_reply({"content": "a cat"}))]:
            with self.subTest(name):
                vision = FakeUpstream(self, [reply])
                coder = FakeUpstream(self)
                self.start(coder, vision_mode="describe", vision_upstream_url=vision.url)
                status, _, _ = self.post(request(user(text("look"), image(PNG_C))))
                self.assertEqual(status, 200)
                content = coder.posts()[-1]["messages"][0]["content"]
                self.assertTrue(content[1]["text"].startswith(
                    "<<IMAGE: could not be read by the vision model: "), content)
                error = self.call("GET", "/status")[2]["last_upstream_error"]
                self.assertIsNotNone(error)
                self.assertIn(content[1]["text"][49:-2], error["message"])

    def test_an_unreadable_cache_line_is_skipped_with_a_warning(self):
        # A line nested past the parser's limit stopped the router at startup.
        cr.DescriptionCache(self.cache_dir).store({"k1": "one"}, "V")
        with open(os.path.join(self.cache_dir, cr.CACHE_FILE), "ab") as f:
            f.write(b'{"hash": ' + b"[" * 100_000 + b"]" * 100_000 + b', "description": "x"}\n')
            f.write(b'[' * 100_000 + b"\n" + b'{"hash": "k2", "description": "two"}\n')
        router = self.start(FakeUpstream(self))
        self.assertEqual(len(router.vision.cache), 2)
        self.assertIn("skipped 2 unreadable line(s)", self.log.getvalue())


################ Upstream bodies

def chunk(data, size_line=None):
    """One chunk of data, its size line as given (without CRLF) or as it should be."""
    return (b"%X" % len(data) if size_line is None else size_line) + b"\r\n" + data + b"\r\n"


def framed_reply(first, rest=b"", gate=None, hold=None):
    """A streamed reply whose body is written as raw bytes, framing and all: first, then rest
    once gate is set; then the connection closes, or stays open until hold is set."""
    def reply(handler):
        begin_stream(handler)
        handler.close_connection = True
        try:
            handler.wfile.write(first)
            if gate is not None:
                gate.wait(TIMEOUT)
            if rest:
                handler.wfile.write(rest)
            if hold is not None:    # past the client's timeout: a router that waits fails
                hold.wait(TIMEOUT * 4)
        except OSError:
            pass        # the router closed the connection first: what this test wants
    return reply


class ChunkedBodyTest(RouterTestCase):
    """A model server's chunked body (RFC 9112 7.1), decoded many chunks a read: its bytes
    are hostile input, read strictly and within bounds."""

    events = text_events("chunked framing")

    def stream_of(self, reply, **settings):
        """Start a router on an upstream answering with reply; return (status, raw body) of
        a streamed request."""
        self.start(FakeUpstream(self, [reply]), **settings)
        status, _, raw = self.post(request(user(text("hi")), stream=True))
        return status, raw

    def held_open(self):
        """An Event an upstream holds its connection open on, set when the test ends."""
        hold = threading.Event()
        self.addCleanup(hold.set)
        return hold

    def assertBrokeOff(self, raw, complete, why):
        """raw is the whole events complete, then one error event; the log says why."""
        self.assertEqual(raw[:len(complete)], complete)
        name, data = cr.parse_sse_event(raw[len(complete):].strip())
        self.assertEqual((name, data["error"]["type"]), ("error", "overloaded_error"), raw)
        self.assertIn("broke off", data["error"]["message"])
        self.assertIn("upstream stream broke off (%s" % why, self.log.getvalue())

    def test_chunk_sizes_are_hex_digits_and_extensions_are_ignored(self):
        # int(size, 16) also took a sign, "0x", "_" and spaces: bytes a server never
        # means as a size.
        e0, e1 = sse(self.events[0]), sse(self.events[1])
        rest = b"".join(chunk(sse(e)) for e in self.events[2:]) + b"0;last=yes\r\n\r\n"
        rows = [(b"%x" % len(e1), True), (b"%04X" % len(e1), True),
                (b"%X;name=value" % len(e1), True), (b'%X \t; a="b;c" ;d' % len(e1), True),
                (b"+%X" % len(e1), False), (b"0x%X" % len(e1), False),
                (b" %X" % len(e1), False), (b"%X " % len(e1), False),
                (b"1_%X" % len(e1), False), (b"", False), (b"%X\x00" % len(e1), False)]
        for size_line, valid in rows:
            with self.subTest(size_line):
                status, raw = self.stream_of(framed_reply(
                    chunk(e0) + chunk(e1, size_line) + rest))
                self.assertEqual(status, 200)
                if valid:
                    self.assertEqual(raw, sse(*self.events))
                else:
                    self.assertBrokeOff(raw, e0, "a chunk size that is not hex digits")

    def test_a_coding_besides_chunked_is_a_broken_response(self):
        # http.client reads "gzip, chunked" (or "chunked " with a blank) to the close, so
        # its chunk framing went out as the stream's bytes with a 200.
        for coding in ("gzip, chunked", "chunked, identity", "gzip", "Chunked ", "CHUNKED"):
            with self.subTest(coding):
                def reply(handler):
                    handler.send_response(200)
                    handler.send_header("Content-Type", "text/event-stream")
                    handler.send_header("Transfer-Encoding", coding)
                    handler.end_headers()
                    handler.close_connection = True
                    handler.wfile.write(chunk(sse(*self.events)) + b"0\r\n\r\n")
                self.start(FakeUpstream(self, [reply]))
                status, _, reply_body = self.post(request(user(text("hi")), stream=True))
                if coding.strip().lower() == "chunked":     # chunked, however spelled
                    self.assertEqual((status, reply_body), (200, sse(*self.events)))
                    continue
                self.assertEnvelope(status, reply_body, 502, "api_error")
                self.assertIn("UnknownTransferEncoding", self.log.getvalue())

    def test_chunk_data_without_its_crlf_ends_the_stream(self):
        # http.client tossed the two bytes after a chunk's data, whatever they were.
        e0, e1, e2 = (sse(e) for e in self.events[:3])
        rows = [("other bytes", chunk(e0) + b"%X\r\n%s--" % (len(e1), e1) + chunk(e2), e0 + e1),
                ("a size one short", chunk(e0) + chunk(e1, b"%X" % (len(e1) - 1)) + chunk(e2),
                 e0)]
        for name, body, complete in rows:
            with self.subTest(name):
                status, raw = self.stream_of(framed_reply(body + b"0\r\n\r\n"))
                self.assertEqual(status, 200)
                self.assertBrokeOff(raw, complete, "no CRLF after a chunk's data")

    def test_a_chunk_cut_anywhere_across_reads_arrives_whole(self):
        # The router reads the first write (one send) whole before the test lets the rest
        # go, so each row cuts a read where it says; an event whose data is in is relayed.
        e0, e1 = sse(self.events[0]), sse(self.events[1])
        c1 = chunk(e1)
        digits = len(b"%X" % len(e1))
        tail = b"".join(chunk(sse(e)) for e in self.events[2:])
        rows = [("in the size", 1), ("before the CR", digits), ("between CR and LF", digits + 1),
                ("before the data", digits + 2), ("in the data", digits + 12),
                ("before the CRLF after data", len(c1) - 2),
                ("between that CR and LF", len(c1) - 1)]
        rows = [(name, chunk(e0) + c1[:cut], c1[cut:] + tail + b"0\r\n\r\n",
                 e0 + e1 if cut >= len(c1) - 2 else e0) for name, cut in rows] + [
            (name, chunk(e0) + c1 + tail + end[:cut], end[cut:], sse(*self.events))
            for name, end, cut in [("in the last chunk", b"0\r\n\r\n", 1),
                                   ("in the last chunk's CRLF", b"0\r\n\r\n", 2)]]
        for name, first, rest, before in rows:
            with self.subTest(name):
                gate = threading.Event()
                self.addCleanup(gate.set)
                self.start(FakeUpstream(self, [framed_reply(first, rest, gate)]))
                conn = self.connect()
                conn.request("POST", "/v1/messages",
                             json.dumps(request(user(text("hi")), stream=True)))
                resp = conn.getresponse()
                got = b""
                while len(got) < len(before):
                    got += resp.read1(65536)
                self.assertEqual(got, before)
                gate.set()
                self.assertEqual(got + resp.read(), sse(*self.events))

    def test_the_last_chunk_ends_the_stream_without_waiting_for_trailers(self):
        # http.client read trailers until their blank line: a server that sent "0" and
        # kept its connection open stalled a complete answer until the read timeout.
        body = b"".join(chunk(sse(e)) for e in self.events)
        rows = [("trailers", b"0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n"),
                ("trailers not ended", b"0\r\nX-Sum: 1\r\n"),
                ("a flood of trailers", b"0\r\n" + b"X-Pad: %s\r\n" % (b"p" * 1000) * 200)]
        for name, end in rows:
            with self.subTest(name):
                status, raw = self.stream_of(framed_reply(body + end, hold=self.held_open()),
                                             read_timeout=TIMEOUT * 4)
                self.assertEqual((status, raw), (200, sse(*self.events)))
        self.assertNotIn("broke off", self.log.getvalue())

    def test_a_size_line_past_the_bound_ends_the_stream(self):
        # A size line held whole until its line end (http.client allowed 64 KiB and
        # waited for it).
        e0, e1 = sse(self.events[0]), sse(self.events[1])
        long_size = b"1" + b"0" * cr.MAX_CHUNK_HEAD
        rows = [("a size without end", chunk(e0) + long_size),
                ("a long extension", chunk(e0) + chunk(e1, b"%X;x=%s" % (
                    len(e1), b"y" * cr.MAX_CHUNK_HEAD)) + b"0\r\n\r\n")]
        for name, body in rows:
            with self.subTest(name):
                status, raw = self.stream_of(framed_reply(body, hold=self.held_open()),
                                             read_timeout=TIMEOUT * 4)
                self.assertEqual(status, 200)
                self.assertBrokeOff(raw, e0, "a chunk size line of over %d bytes"
                                    % cr.MAX_CHUNK_HEAD)

    def test_an_early_end_anywhere_ends_with_an_error_event(self):
        e0, e1 = sse(self.events[0]), sse(self.events[1])
        c0, c1 = chunk(e0), chunk(e1)
        digits = len(b"%X" % len(e1))
        body = b"".join(chunk(sse(e)) for e in self.events)
        rows = [(name, c0 + c1[:cut], e0 + e1 if cut >= len(c1) - 2 else e0) for name, cut in [
            ("before a chunk", 0), ("in the size", 1), ("before the CR", digits),
            ("between CR and LF", digits + 1), ("before the data", digits + 2),
            ("in the data", digits + 12), ("before the CRLF after data", len(c1) - 2),
            ("between that CR and LF", len(c1) - 1)]] + [
            ("before the last chunk", body, sse(*self.events)),
            ("in the last chunk's size line", body + b"0", sse(*self.events))]
        for name, sent, complete in rows:
            with self.subTest(name):
                status, raw = self.stream_of(framed_reply(sent))
                self.assertEqual(status, 200)
                self.assertBrokeOff(raw, complete, "IncompleteRead")
        with self.subTest("in the first chunk"):
            status, reply = self.stream_of(framed_reply(c0[:5]))
            self.assertEnvelope(status, reply, 502)
        with self.subTest("after the last chunk's size line"):
            self.assertEqual(self.stream_of(framed_reply(body + b"0\r\n")),
                             (200, sse(*self.events)))


################ Model listings

class ModelListingTest(unittest.TestCase):
    """What a model server's listing says it has, and the advice fitted to it."""

    def test_models_from_listings(self):
        lmstudio = {"models": [
            {"key": "qwen/coder", "type": "llm", "capabilities": {"vision": False},
             "loaded_instances": [{"id": "qwen/coder", "config": {"context_length": 65536}}]},
            {"key": "dev/vision", "capabilities": {"vision": True}, "loaded_instances": []}]}
        llama = {"object": "list", "data": [{"id": "q05", "meta": {"n_ctx": 32768}}]}
        self.assertEqual(cr.models_from_listing(lmstudio), {
            "qwen/coder": {"loaded": True, "context_length": 65536, "vision": False},
            "dev/vision": {"loaded": False, "context_length": None, "vision": True}})
        self.assertEqual(cr.models_from_listing(llama),
                         {"q05": {"loaded": True, "context_length": 32768, "vision": None}})
        vllm = {"object": "list", "data": [{"id": "Qwen/Qwen3-Coder", "object": "model",
                                            "owned_by": "vllm", "max_model_len": 32768},
                                           {"id": "odd", "max_model_len": "32768"}]}
        self.assertEqual(cr.models_from_listing(vllm), {
            "Qwen/Qwen3-Coder": {"loaded": True, "context_length": 32768, "vision": None},
            "odd": {"loaded": True, "context_length": None, "vision": None}})
        self.assertEqual(cr.models_from_listing(["junk"]), {})

    def test_llama_server_says_whether_a_model_takes_images(self):
        rows = [("no mmproj", LLAMA_LISTING, False),
                ("mmproj", llama_listing(vision=True), True),
                ("capabilities only", {"models": [{"model": "q", "capabilities": ["completion",
                                                                                 "multimodal"]}],
                                       "data": [{"id": "q"}]}, True),
                ("says nothing", {"data": [{"id": "q"}]}, None)]
        for name, listing, vision in rows:
            with self.subTest(name):
                found = cr.models_from_listing(listing)
                self.assertEqual(list(found.values())[0]["vision"], vision)

    def test_server_kind_by_the_listing_that_answered(self):
        rows = [("/api/v1/models", {"models": []}, "lmstudio"),
                ("/v1/models", LLAMA_LISTING, "llama.cpp"),
                ("/v1/models", {"data": [{"id": "m", "owned_by": "vllm"}]}, "vllm"),
                ("/v1/models", {"data": [{"id": "m:7b", "owned_by": "library"}]}, "ollama"),
                ("/v1/models", {"data": [{"id": "m"}]}, "other"), ("/v1/models", [], "other")]
        for path, listing, kind in rows:
            with self.subTest(kind):
                self.assertEqual(cr.server_kind(path, listing), kind)

    def test_model_report_says_what_it_found_and_fits_its_advice_to_the_server(self):
        lmstudio = {"c": {"loaded": False, "context_length": None, "vision": None},
                    "v": {"loaded": True, "context_length": 4096, "vision": False}}
        line, problems = cr.model_report("vision", "v", "lmstudio", lmstudio)
        self.assertEqual(line, "vision v: loaded, 4096-token context, text only")
        self.assertEqual(len(problems), 2)
        self.assertIn("cannot see images", problems[0])
        self.assertIn("lms unload v && lms load v --context-length 32768", problems[1])
        line, problems = cr.model_report("coder", "c", "lmstudio", lmstudio)
        self.assertEqual((line, len(problems)), ("coder c: not loaded, context unknown, "
                                                 "images unknown", 1))
        self.assertIn("lms load c", problems[0])
        _, problems = cr.model_report("coder", "x/y", "lmstudio", lmstudio)
        self.assertIn("not on the lmstudio server, which has: c, v. Fix: lms get x/y", problems[0])
        for kind in ("llama.cpp", "vllm", "ollama", "other"):
            with self.subTest(kind):
                models = {"a": {"loaded": True, "context_length": 4096, "vision": False},
                          "b": {"loaded": True, "context_length": 4096, "vision": False}}
                lines = [l for role in ("coder", "vision")
                         for l in cr.model_report(role, "z", kind, models)[1]
                         + cr.model_report(role, "a", kind, models)[1]]
                self.assertTrue(lines)
                self.assertFalse([l for l in lines if "lms " in l], lines)
                self.assertIn("which has: a, b", lines[0])

    def test_a_llama_server_with_one_model_serves_any_name(self):
        models = cr.models_from_listing(LLAMA_LISTING)
        line, problems = cr.model_report("vision", "dev/vision", "llama.cpp", models)
        self.assertEqual(line, "vision dev/vision (served by qwen2.5-coder-0.5b, the server's only "
                               "model): loaded, 32768-token context, text only")
        self.assertEqual(len(problems), 1)
        self.assertIn("--mmproj", problems[0])
        self.assertNotIn("lms", problems[0])


################ Vision

class VisionTest(unittest.TestCase):

    def test_failures_keep_their_first_reason_are_bounded_and_retried_after_a_while(self):
        memory = cr.Vision(None, None, max_entries=2)
        memory.note_failure(["a"], "first")
        memory.note_failure(["a"], "second")
        self.assertEqual(memory.failure_reasons(["a"]), {"a": "first"})
        self.assertEqual(memory.recent_failures(["a", "b"]), {"a"})
        memory.retry_after = 0
        self.assertEqual(memory.recent_failures(["a"]), set())
        self.assertEqual(memory.failure_reasons(["a"]), {"a": "first"})   # still shown
        memory.note_failure(["b"], "b's")
        memory.note_failure(["c"], "c's")
        self.assertEqual(memory.failure_reasons(["a", "b", "c"]), {"b": "b's", "c": "c's"})

    def test_claims_are_all_or_nothing_and_released_with_a_wake_up(self):
        memory = cr.Vision(None, None)
        self.assertEqual(memory.claim(["a"], ["a"]), (["a"], {}))
        claimed, busy = memory.claim(["b"], ["a", "b"])
        self.assertEqual((claimed, len(busy)), ([], 1))
        self.assertNotIn("b", memory.pending)
        memory.release(["a"])
        self.assertEqual(busy["a"].result(0), (None, None))     # released, nothing came of it
        self.assertEqual(memory.claim(["b"], ["a", "b"]), (["b"], {}))

    def test_a_waiting_turn_gets_the_description_or_the_failure_from_its_future(self):
        memory = cr.Vision(None, None)
        memory.claim(["a", "b"], ["a", "b"])
        _, busy = memory.claim([], ["a", "b"])
        memory.resolve(["a"], "a red square")
        memory.resolve(["b"], failure="image input is not supported")
        self.assertEqual({k: f.result(0) for k, f in busy.items()},
                         {"a": ("a red square", None), "b": (None, "image input is not supported")})
        self.assertEqual(memory.pending, {})

    def test_describe_request_is_short_and_deterministic(self):
        got = cr.describe_request(image(PNG_A), "The user wrote: hi", "V")
        self.assertEqual(got, cr.describe_request(image(PNG_A), "The user wrote: hi", "V"))
        self.assertEqual(got["messages"], [user(text("The user wrote: hi"), image(PNG_A))])
        self.assertNotIn("tools", got)

    def test_descriptions_keep_only_the_models_own_complete_text(self):
        rows = [
            ("as it is", "A cat.", False, "A cat."),
            ("router text dropped", cr.SYNTHETIC_USER_TEXT + " A chart. <<IMAGE DESCRIPTION: "
             "old one>> " + cr.LIFTED_IMAGE_TEXT, False, "A chart."),
            ("looping sentence", "A form. It is red. It is red. It is red. It i", True,
             "A form. It is red."),
            ("looping lines", "- a\n- b\n- a\n- b\n- a\n- b\n- a", True, "- a\n- b"),
            ("cut, no loop", "A form with two fields and a butt", True,
             "A form with two fields and a butt " + cr.CUT_OFF_NOTE),
            ("a sentence said twice is no loop", "Red. Red. Blue.", True,
             "Red. Red. Blue. " + cr.CUT_OFF_NOTE),
            ("only router text", cr.SYNTHETIC_USER_TEXT, True, ""),
        ]
        for name, reply, cut_off, expected in rows:
            with self.subTest(name):
                self.assertEqual(cr.description_text(reply, cut_off), expected)

    def test_a_describe_requests_context_is_not_kept_when_echoed(self):
        # The real OCR vision server answered "[Image: ...]\n\nThe user wrote: <prompt>".
        context = "The user wrote: Look at @shape.png again."
        reply = "[Image: a red square.]\n\n%s\n\n[Image: a red square.]" % context
        self.assertEqual(cr.description_text(reply, False, context),
                         "[Image: a red square.]\n\n[Image: a red square.]")


class VisionModeTest(RouterTestCase):

    def describer(self, vision):
        """A vision server that describes each image by the first letters of its data."""
        def describe(handler, body):
            images = [b for b in body["messages"][-1]["content"] if b["type"] == "image"]
            reply = "Shows %s." % base64.b64decode(images[0]["source"]["data"])[8:11].decode()
            json_reply(message_json(reply))(handler)
        return FakeUpstream(self, default=describe)

    def test_a_client_hanging_up_during_a_describe_closes_the_describe_request(self):
        # A describe request was sent without watching the client: after Esc, the vision
        # model went on describing for nobody, and the claim held the next turn back.
        arrived, closed = threading.Event(), threading.Event()

        def silent(handler):
            arrived.set()
            handler.close_connection = True
            if sees_close(handler.connection):
                closed.set()

        upstream = FakeUpstream(self, [silent, json_reply(message_json("A red square.")),
                                       json_reply(message_json("Done."))])
        router = self.start(upstream, vision_mode="describe")
        sock = self.post_raw(request(user(text("look"), image(PNG_A))))
        self.assertTrue(arrived.wait(TIMEOUT))
        sock.close()
        self.assertTrue(closed.wait(TIMEOUT), "the describe request stayed open")
        self.assertIn("client went away", self.log.getvalue())
        # Neither a failure nor a claim is left: the retry describes the image.
        status, _, reply = self.post(request(user(text("look"), image(PNG_A))))
        self.assertEqual((status, reply["content"]), (200, [text("Done.")]))
        self.assertEqual(upstream.posts()[-1]["messages"], [user(
            text("look"), text("<<IMAGE DESCRIPTION: A red square.>>"))])
        self.assertEqual(router.vision.failures, {})

    def test_describe_mode_asks_per_image_then_the_coder_answers(self):
        vision = self.describer(self)
        coder = FakeUpstream(self, [stream_reply(text_events("Fixed."))])
        self.start(coder, vision_mode="describe", vision_upstream_url=vision.url)
        history = [user(text("compare"), image(PNG_A), text("and"), image(PNG_B))]
        status, _, raw = self.post(request(*history, stream=True, tools=[
            {"name": "Read", "input_schema": {}}], system="You are Claude Code. " * 200))
        self.assertEqual(raw, sse(*text_events("Fixed.")))
        asked = vision.posts()
        self.assertEqual(len(asked), 2)
        for body in asked:
            self.assertEqual((body["model"], body["system"], "tools" in body),
                             ("VISION", cr.DESCRIBE_PROMPT, False))
            self.assertEqual(sum(b["type"] == "image" for b in body["messages"][0]["content"]), 1)
            self.assertLess(len(json.dumps(body)), 2000)
        sent = coder.posts()[-1]
        self.assertEqual(sent["model"], "CODER")
        self.assertEqual(sent["messages"], [user(
            text("compare"), text("<<IMAGE DESCRIPTION: Shows AAA.>>"), text("and"),
            text("<<IMAGE DESCRIPTION: Shows BBB.>>"))])
        status = self.router.status()
        self.assertEqual((status["vision_calls"], status["images_described"]), ({"describe": 2}, 2))
        self.assertEqual(status["routes"], {"coder": 1, "vision": 0, "describe": 2})
        self.assertEqual(status["model_switches"], 0)

    def test_answer_mode_fallback_describes_after_the_response_and_once(self):
        # The describe fallback ran before the response ended, so the client waited as long
        # as the vision model took; and a turn could ask for the same image again (issue 10).
        describing, gate = threading.Event(), threading.Event()
        self.addCleanup(gate.set)

        def describe(handler, body):
            describing.set()
            gate.wait(TIMEOUT)
            json_reply(message_json("Shows CCC."))(handler)

        vision = FakeUpstream(self, [stream_reply(tool_call_events())], default=describe)
        coder = FakeUpstream(self)
        self.start(coder, vision_upstream_url=vision.url)
        history = [user(text("what is on screen"), image(PNG_C))]
        status, _, raw = self.post(request(*history, stream=True))     # the describe is held
        self.assertEqual(raw, sse(*tool_call_events()))
        self.assertTrue(describing.wait(TIMEOUT))
        waiting = self.log.when("waiting for the description of 1 image(s)")
        answers = []
        later = request(*history, assistant(tool_use("t9")), user(tool_result("t9", text("a"))))
        thread = threading.Thread(target=lambda: answers.append(self.post(later)))
        thread.start()
        self.assertTrue(waiting.wait(TIMEOUT))
        gate.set()
        thread.join(TIMEOUT)
        self.assertEqual(answers[0][0], 200)
        self.assertEqual(coder.posts()[-1]["messages"][0]["content"][1],
                         text("<<IMAGE DESCRIPTION: Shows CCC.>>"))
        self.assertEqual(len(vision.posts()), 2)
        self.assertEqual(self.router.status()["vision_calls"], {"answer": 1, "fallback": 1})

    def test_descriptions_lose_injected_text_and_looping_tails(self):
        # A small model looped until max_tokens, echoing the router's own synthetic turn.
        looping = dict(message_json(cr.SYNTHETIC_USER_TEXT + " A login form. The button is "
                                    "red. The button is red. The button is red. The butt"),
                       stop_reason="max_tokens")
        vision = FakeUpstream(self, [json_reply(looping)])
        self.start(FakeUpstream(self), vision_upstream_url=vision.url)
        history = [user(text("check")), assistant(tool_use("t1")),
                   user(tool_result("t1", image(PNG_A)))]
        self.post(request(*history))
        self.post(request(*history, assistant(text("A login form.")), user(text("fix it"))))
        self.assertEqual(self.router.vision.cache.lookup([key(PNG_A)]),
                         {key(PNG_A): "A login form. The button is red."})

    def test_describe_context_echoed_by_the_vision_model_is_not_stored(self):
        def echo(handler, body):
            said = body["messages"][0]["content"][0]["text"]
            json_reply(message_json("%s\n\nA red square." % said))(handler)

        vision = FakeUpstream(self, default=echo)
        self.start(FakeUpstream(self), vision_upstream_url=vision.url, vision_mode="describe")
        self.post(request(user(text("what shape?"), image(PNG_A))))
        self.assertEqual(self.router.vision.cache.lookup([key(PNG_A)]), {key(PNG_A): "A red square."})

    def test_vision_upstream_is_separate_from_the_coder_upstream(self):
        vision = FakeUpstream(self, [json_reply(message_json("A diagram."))])
        coder = FakeUpstream(self)
        self.start(coder, vision_upstream_url=vision.url)
        self.post(request(user(image(PNG_A))))
        self.post(request(user(image(PNG_A)), assistant(text("A diagram.")), user(text("ok"))))
        self.assertEqual([b["model"] for b in vision.posts()], ["VISION"])
        self.assertEqual([b["model"] for b in coder.posts()], ["CODER"])


class VisionFailureTest(RouterTestCase):
    """A vision model that fails leaves the turn to the coder, with a marker saying why."""

    def no_vision_server(self):
        """An upstream like llama-server without an mmproj: the coder answers, images fail."""
        def reply(handler, body):
            if body["model"] == "VISION":
                return json_reply({"error": {"code": 500, "type": "server_error", "message":
                    "image input is not supported - hint: if this is unexpected, you may "
                    "need to provide the mmproj"}}, 500)(handler)
            json_reply(message_json("I cannot see it."))(handler)
        return FakeUpstream(self, default=reply)

    def test_failed_image_becomes_a_marker_and_is_not_sent_again(self):
        # llama-server without an mmproj answered 500; Claude Code retried it for three
        # minutes, and every later prompt of that turn failed the same way (issue 9).
        upstream = self.no_vision_server()
        self.start(upstream)
        marker = text("<<IMAGE: could not be read by the vision model: "
                      "image input is not supported>>")
        turn = [user(text("What shape is in @shape.png?"), image(PNG_A))]
        status, _, raw = self.post(request(*turn, stream=True))
        self.assertEqual(status, 200)
        first = upstream.posts()[-1]
        self.assertEqual((first["model"], first["messages"]),
                         ("CODER", [user(text("What shape is in @shape.png?"), marker)]))
        self.assertIn("could not read 1 image(s): image input is not supported",
                      self.log.getvalue())
        # A retry, then a later prompt in the same user turn, then the next turn.
        self.post(request(*turn))
        self.post(request(*turn, user(text("and now?"))))
        self.post(request(*turn, assistant(text("I cannot see it.")), user(text("go on"))))
        models = [b["model"] for b in upstream.posts()]
        self.assertEqual(models, ["VISION", "CODER", "CODER", "CODER", "CODER"])
        for body in upstream.posts()[2:]:
            self.assertEqual(body["messages"][0]["content"][:2], first["messages"][0]["content"])
        # Once retry_after has passed, the image of the user's turn is tried again.
        self.router.vision.retry_after = 0
        self.post(request(*turn))
        self.assertEqual([b["model"] for b in upstream.posts()[5:]], ["VISION", "CODER"])
        self.assertEqual(upstream.posts()[-1]["messages"], first["messages"])

    def test_a_turn_waiting_on_a_failed_image_does_not_wait_for_the_coder_too(self):
        a_arrived, gate = threading.Event(), threading.Event()

        def reply(handler, body):
            if body["model"] == "VISION":
                return json_reply({"error": {"message": "image input is not supported"}},
                                  500)(handler)
            if "first" in json.dumps(body["messages"]):
                a_arrived.set()
                gate.wait(3 * TIMEOUT)      # longer than the second request may take
            json_reply(message_json("no image here"))(handler)

        self.start(FakeUpstream(self, default=reply))
        first = threading.Thread(target=self.post,
                                 args=(request(user(text("first"), image(PNG_A))),))
        first.start()
        self.addCleanup(first.join, TIMEOUT)
        self.addCleanup(gate.set)
        self.assertTrue(a_arrived.wait(TIMEOUT))
        # The coder is still answering the first request; the second must not wait for it.
        status, _, reply_body = self.post(request(user(text("second"), image(PNG_A))))
        self.assertEqual((status, reply_body["content"]), (200, [text("no image here")]))

    def test_a_client_that_leaves_while_waiting_for_a_description_is_let_go(self):
        v_arrived, gate = threading.Event(), threading.Event()

        def reply(handler, body):
            v_arrived.set()
            gate.wait(TIMEOUT)
            json_reply(message_json("a red square"))(handler)

        self.start(FakeUpstream(self, default=reply))
        waiting = self.log.when("waiting for the description")
        gone = self.log.when("client went away while waiting for a description")
        first = threading.Thread(target=self.post, args=(request(user(text("a"), image(PNG_A))),))
        first.start()
        self.addCleanup(first.join, TIMEOUT)
        self.addCleanup(gate.set)
        self.assertTrue(v_arrived.wait(TIMEOUT))
        sock = self.post_raw(request(user(text("b"), image(PNG_A))))
        self.assertTrue(waiting.wait(TIMEOUT))
        sock.close()
        self.assertTrue(gone.wait(TIMEOUT), "the router kept waiting for a client that left")

    def test_vision_server_down_silent_or_failing_in_stream_falls_back(self):
        refused = "http://127.0.0.1:%d" % refused_port(self)
        hang = threading.Event()
        self.addCleanup(hang.set)
        lm_studio_error = stream_reply([("error", {"type": "error", "error": {
            "type": "invalid_request_error", "message": "Model does not support images."}})])
        rows = [("down", refused, "its server is not reachable"),
                ("silent", FakeUpstream(self, [lambda handler: hang.wait(TIMEOUT)]).url,
                 "no answer in time"),
                ("error event", FakeUpstream(self, [lm_studio_error]).url,
                 "Model does not support images")]
        for name, vision_url, reason in rows:
            with self.subTest(name):
                coder = FakeUpstream(self)
                self.start(coder, vision_upstream_url=vision_url, read_timeout=0.5)
                status, _, reply = self.post(request(user(text("look"), image(PNG_B)),
                                                     stream=True))
                self.assertEqual(status, 200)
                self.assertEqual(coder.posts()[-1]["messages"], [user(text("look"), text(
                    "<<IMAGE: could not be read by the vision model: %s>>" % reason))])

    def test_a_vision_answer_that_fails_midway_sends_the_retry_to_the_coder(self):
        # Once its answer has begun, the turn cannot fall back; but Claude Code retries,
        # and the retry must not meet the same failure (issue 9: the session was trapped).
        opening = text_events("I see")[:1]
        error = ("error", {"type": "error", "error": {"type": "api_error",
                                                     "message": "vision encoder crashed"}})
        rows = [("error event", stream_reply(opening + [error]), "vision encoder crashed"),
                ("cut", stream_reply(opening + text_events("x")[1:], cut_after=1),
                 "its answer broke off")]
        for name, reply, reason in rows:
            with self.subTest(name):
                upstream = FakeUpstream(self, [reply])
                self.start(upstream)
                turn = request(user(text("look"), image(PNG_C)), stream=True)
                status, _, first = self.post(turn)
                self.assertEqual(status, 200)
                self.assertIn(b"event: error", first)
                status, _, again = self.post(turn)
                self.assertEqual(status, 200)
                self.assertEqual([b["model"] for b in upstream.posts()], ["VISION", "CODER"])
                self.assertEqual(upstream.posts()[-1]["messages"], [user(text("look"), text(
                    "<<IMAGE: could not be read by the vision model: %s>>" % reason))])

    def test_a_whole_vision_answer_is_learned_however_its_stream_ends(self):
        # A stream cut after message_stop holds a complete answer; a stream with CR line
        # ends (RFC-valid SSE) is one too. Neither may cost the image its description.
        def whole_then(cut, newline):
            def reply(handler):
                begin_stream(handler)
                for event in text_events("a red square"):
                    write_chunk(handler, sse(event).replace(b"\n", newline))
                if cut:
                    handler.close_connection = True
                    handler.connection.shutdown(socket.SHUT_RDWR)
                else:
                    handler.wfile.write(b"0\r\n\r\n")
            return reply

        for cut, newline in ((True, b"\n"), (False, b"\r"), (False, b"\r\n")):
            with self.subTest(cut=cut, newline=newline):
                upstream = FakeUpstream(self, [whole_then(cut, newline)])
                router = self.start(upstream)
                turn = [user(text("look"), image(PNG_C))]
                status, _, _ = self.post(request(*turn, stream=True))
                self.assertEqual(status, 200)
                self.post(request(*turn, assistant(text("a red square")), user(text("and?"))))
                self.assertEqual([b["model"] for b in upstream.posts()], ["VISION", "CODER"])
                self.assertEqual(upstream.posts()[-1]["messages"][0]["content"][1],
                                 text("<<IMAGE DESCRIPTION: a red square>>"))
                self.assertEqual(router.vision.failures, {})
                shutil.rmtree(self.cache_dir)
                os.mkdir(self.cache_dir)

    def test_one_server_down_for_both_models_is_529_and_not_remembered(self):
        url = "http://127.0.0.1:%d" % refused_port(self)
        router = self.start(url)
        status, _, reply = self.post(request(user(image(PNG_B))))
        self.assertEnvelope(status, reply, 529, "overloaded_error")
        self.assertEqual(router.vision.failures, {})

    def test_failed_describe_is_not_followed_by_the_vision_model(self):
        # Describe mode made two calls per retry: the failed describe, then the whole
        # conversation to the vision model anyway (issue 9).
        upstream = self.no_vision_server()
        self.start(upstream, vision_mode="describe")
        status, _, _ = self.post(request(user(text("look"), image(PNG_C))))
        self.assertEqual(status, 200)
        self.assertEqual([b["model"] for b in upstream.posts()], ["VISION", "CODER"])
        self.assertEqual(upstream.posts()[0]["system"], cr.DESCRIBE_PROMPT)
        self.assertEqual(upstream.posts()[-1]["messages"], [user(text("look"), text(
            "<<IMAGE: could not be read by the vision model: image input is not supported>>"))])


class TextOnlyTest(RouterTestCase):
    """--vision-model none: no vision model, so images reach the coder as markers."""

    def test_none_or_empty_means_text_only(self):
        for value in ("none", "None", "", " "):
            with self.subTest(value=value):
                self.assertEqual(cr.parse_settings(["--vision-model", value], {}).vision_model, "")
                self.assertEqual(cr.parse_settings(
                    [], {"CLAUDE_ROUTER_VISION_MODEL": value}).vision_model, "")

    def test_an_image_turn_goes_to_the_coder_with_the_marker_and_nothing_is_warned(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        router = self.start(upstream, vision_model="")
        lines = router.check_upstream()
        self.assertEqual(lines, ["coder CODER (served by qwen2.5-coder-0.5b, the server's only "
                                 "model): loaded, 32768-token context, text only"])
        status, _, reply = self.post(request(user(text("what is this?"), image(PNG_A))))
        self.assertEqual(status, 200, reply)
        self.assertEqual([(b["model"], b["messages"]) for b in upstream.posts()], [
            ("CODER", [user(text("what is this?"), text(cr.UNKNOWN_IMAGE_MARKER))])])
        document = self.call("GET", "/status")[2]
        self.assertEqual((document["vision"], document["startup"]["problems"]),
                         ({"model": None}, []))
        self.assertNotIn("!", cr.status_line(document))


################ Connections

class ConnectionSlotTest(RouterTestCase):
    """The connection cap: an idle connection makes room for a new one; a busy one keeps its
    slot; past the cap with none idle, a newcomer gets a 503."""

    def get(self, sock):
        """GET / on sock; return the status."""
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return read_response(sock)[0]

    def wait_slots(self, idle, served=None):
        """Wait until idle connections wait for a request and no closed one is still ending."""
        router = self.router
        with router.slots:
            self.assertTrue(router.slots.wait_for(lambda: len(router.idle) == idle and (
                served in (None, router.served)) and not router.evicted, TIMEOUT),
                (len(router.idle), router.served, len(router.evicted)))

    def test_a_newcomer_takes_an_idle_connections_slot_and_busy_ones_keep_theirs(self):
        # Idle keep-alive connections held their slots for IDLE_TIMEOUT (15 minutes): as
        # many as the cap locked every new client out (issue 14, section 4).
        gate = threading.Event()
        self.addCleanup(gate.set)
        events = text_events("streamed")
        self.start(FakeUpstream(self, [stream_reply(events, gate=gate)]), max_connections=3)
        streaming = self.connect()
        streaming.request("POST", "/v1/messages", json.dumps(request(user(text("hi")), stream=True)))
        resp = streaming.getresponse()
        got = b""
        while len(got) < len(sse(events[0])):   # the rest waits for the model
            got += resp.read1(65536)
        ok = json.dumps(request(user(text("hi")))).encode()
        reading = self.raw_socket()
        begin_body(reading, ok, 10)
        idle = self.raw_socket()
        self.assertEqual(self.get(idle), 200)
        self.wait_slots(idle=1, served=3)
        newcomer = self.raw_socket()
        self.assertEqual(self.get(newcomer), 200)
        self.assertTrue(sees_close(idle))
        reading.sendall(ok[10:])
        self.assertEqual(read_response(reading)[0], 200)
        gate.set()
        self.assertEqual(got + resp.read(), sse(*events))
        self.assertEqual(self.log.getvalue().count("connections are open, the limit"), 1)

    def test_the_connection_idle_longest_makes_room_first(self):
        self.start(FakeUpstream(self), max_connections=2)
        older = self.raw_socket()
        self.assertEqual(self.get(older), 200)
        self.wait_slots(idle=1)
        silent = self.raw_socket()      # connected, and sent nothing (a port scanner's)
        self.wait_slots(idle=2)
        first = self.raw_socket()
        self.assertEqual(self.get(first), 200)
        self.assertTrue(sees_close(older))
        self.wait_slots(idle=2)
        second = self.raw_socket()
        self.assertEqual(self.get(second), 200)
        self.assertTrue(sees_close(silent))
        self.assertEqual((self.get(first), self.get(second)), (200, 200))

    def test_a_request_begun_as_its_slot_goes_gets_503_not_a_silent_close(self):
        # The connection's thread reads the request's bytes, but it cannot note that a
        # request began while the test holds the slots' lock: a newcomer takes its slot.
        router = self.start(FakeUpstream(self), max_connections=1)
        sock = self.raw_socket()
        self.assertEqual(self.get(sock), 200)
        self.wait_slots(idle=1)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            newcomer = socket.create_connection(listener.getsockname(), TIMEOUT)
            self.addCleanup(newcomer.close)
            theirs, address = listener.accept()
        with router.slots:
            [ours] = router.idle
            unread = select.poll()
            unread.register(ours, select.POLLIN)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            started = time.monotonic()
            # Until the thread has read them (Linux keeps bytes unread when the reading side
            # is shut, BSD drops them): on every system it then has the request, and no slot.
            while unread.poll(0) and time.monotonic() - started < TIMEOUT:
                pass
            router.process_request(theirs, address)     # as serve_forever passes it on
        status, headers, body = read_response(sock)
        self.assertEnvelope(status, json.loads(body), 503, "api_error")
        self.assertEqual(headers["connection"], "close")
        self.assertTrue(sees_close(sock))
        self.assertEqual(self.get(newcomer), 200)

    def test_slots_add_up_after_many_newcomers_took_idle_ones_places(self):
        router = self.start(FakeUpstream(self), max_connections=2)
        threads = threading.active_count()
        socks = []
        for i in range(12):
            socks.append(self.raw_socket())
            self.assertEqual(self.get(socks[-1]), 200)
            self.wait_slots(idle=min(i + 1, 2), served=min(i + 1, 2))
        for sock in socks[:-2]:
            self.assertTrue(sees_close(sock))
        # Two served; ten threads ended (one may be on its last line still).
        self.assertLessEqual(threading.active_count(), threads + 3)
        for sock in socks[-2:]:
            self.assertEqual(self.get(sock), 200)
            sock.close()
        self.wait_slots(idle=0, served=0)

    def test_connections_past_the_cap_get_503_at_once_and_no_thread(self):
        # Every connection got a thread, idle ones too: 1,200 idle sockets made 1,201
        # threads before a request was read (issue 14, section 4).
        self.start(FakeUpstream(self), max_connections=2)
        ok = json.dumps(request(user(text("hi")))).encode()
        held = [self.raw_socket() for _ in range(2)]
        for sock in held:
            begin_body(sock, ok, 10)    # both hold a slot, in the middle of a request
        threads = threading.active_count()
        for _ in range(20):
            sock = self.raw_socket()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, body = read_response(sock)
            self.assertEnvelope(status, json.loads(body), 503, "api_error")
            self.assertEqual((headers["connection"], headers.get("x-should-retry")), ("close", None))
        self.assertLessEqual(threading.active_count(), threads + 1)
        self.assertEqual(self.log.getvalue().count("connections are open, the limit"), 1)
        held[0].close()     # its slot is free once its thread sees the close
        started, status = time.monotonic(), 503
        while status == 503 and time.monotonic() - started < TIMEOUT:
            sock = self.raw_socket()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status = read_response(sock)[0]
        self.assertEqual(status, 200)
        held[1].sendall(ok[10:])
        self.assertEqual(read_response(held[1])[0], 200)


################ Handler

class HandlerTest(RouterTestCase):
    """The endpoints the router answers itself, and keep-alive."""

    def test_probes_answer_200(self):
        self.start()
        for method, path in (("HEAD", "/"), ("GET", "/"), ("HEAD", "/api/hello")):
            with self.subTest(method=method, path=path):
                self.assertEqual(self.call(method, path)[0], 200)

    def test_a_connection_idle_after_a_big_body_hands_its_memory_back(self):
        # Kept until the connection ended, a screenshot's memory stayed while the client
        # kept the connection for its next turn, as Claude Code does: 16 such held 146 MiB.
        cr.release_freed_memory(start=True)     # as main() does: a heap keeps what is freed
        router = self.start(FakeUpstream(self))
        router.trim_idle_seconds = 0.2
        conn = self.connect()
        body = request(user(image(base64.b64encode(os.urandom(6 << 20)).decode())))
        self.assertEqual(self.call("POST", "/v1/messages", body, conn=conn)[0], 200)
        with router.slots:      # the request is done with: its connection waits for the next
            self.assertTrue(router.slots.wait_for(lambda: router.idle, TIMEOUT))
        held = resident_bytes()
        deadline = time.monotonic() + TIMEOUT
        while resident_bytes() > held - (3 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertLess(resident_bytes(), held - (3 << 20))
        self.assertEqual(self.call("GET", "/", conn=conn)[0], 200)    # still open, still served

    def test_models_fall_back_to_the_configured_two(self):
        self.start()
        status, _, reply = self.call("GET", "/v1/models")
        self.assertEqual((status, [m["id"] for m in reply["data"]]), (200, ["CODER", "VISION"]))

    def test_a_client_polling_the_model_list_never_reaches_the_model_server(self):
        # Every GET /v1/models asked each upstream for its list, inline: a client polling
        # it made the router poll the model server as fast.
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        self.start(upstream)        # its start's look is seconds fresh
        seen = len(upstream.requests)
        for _ in range(20):
            status, _, reply = self.call("GET", "/v1/models?limit=1000")
            self.assertEqual((status, [m["id"] for m in reply["data"]]),
                             (200, ["qwen2.5-coder-0.5b"]))
        self.assertEqual(upstream.requests[seen:], [])

    def test_a_stale_model_list_is_served_as_known_and_looked_at_after_the_answer(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        self.start(upstream, models_ttl=0)      # every request finds the list stale
        gate = threading.Event()
        self.addCleanup(gate.set)
        upstream.listing_gate = gate            # a listing that does not answer yet
        status, headers, reply = self.call("GET", "/v1/models")
        self.assertEqual((status, [m["id"] for m in reply["data"]], headers["Connection"]),
                         (200, ["qwen2.5-coder-0.5b"], "close"))
        gate.set()

    def test_count_tokens_is_forwarded_when_the_upstream_counts(self):
        upstream = FakeUpstream(self, count_tokens=(200, {"input_tokens": 42}))
        self.start(upstream)
        body = request(user(text("q"), image(PNG_A)), {"role": "system", "content": "s"},
                       thinking={"type": "adaptive"})
        status, _, reply = self.call("POST", "/v1/messages/count_tokens?beta=true", body)
        self.assertEqual((status, reply), (200, {"input_tokens": 42}))
        sent = upstream.posts("/v1/messages/count_tokens")[0]
        self.assertEqual(sent, {"model": "CODER", "messages": [
            user(reminder("s"), text("q"), text(cr.UNKNOWN_IMAGE_MARKER))]})

    def test_count_tokens_is_estimated_when_the_upstream_cannot(self):
        for count_tokens in ((200, {"error": "Unexpected endpoint or method."}), None):
            with self.subTest(count_tokens=count_tokens):
                upstream = FakeUpstream(self, count_tokens=count_tokens)
                self.start(upstream)
                body = request(user(text("q" * 3000)))
                for _ in range(2):
                    status, _, reply = self.call("POST", "/v1/messages/count_tokens", body)
                    self.assertEqual(status, 200)
                    self.assertGreater(reply["input_tokens"], 1000)
                self.assertEqual(len(upstream.posts("/v1/messages/count_tokens")), 1)

    def test_count_tokens_and_models_and_status(self):
        upstream = FakeUpstream(self, listing={"object": "list", "data": [
            {"id": "CODER", "meta": {"n_ctx": 8192}}, {"id": "VISION"}]})
        self.start(upstream)
        status, _, reply = self.call("GET", "/v1/models?limit=1000")
        self.assertEqual([m["id"] for m in reply["data"]], ["CODER", "VISION"])
        self.post(request(user(text("hi"))))
        status, _, reply = self.call("GET", "/status")
        self.assertEqual((reply["coder"]["context_length"], reply["requests"]), (8192, {"CODER": 1}))
        sent = {"model": "CODER", "max_tokens": 32000, "messages": [user(text("hi"))]}
        self.assertEqual(upstream.posts()[-1]["max_tokens"],
                         8192 - cr.estimate_tokens(len(json.dumps(sent))))

    def test_keep_alive_two_requests_one_connection(self):
        upstream = FakeUpstream(self, [stream_reply(text_events("one"))])
        self.start(upstream)
        conn = self.connect()
        self.post(request(user(text("a")), stream=True), conn=conn)
        sock = conn.sock
        status, _, reply = self.post(request(user(text("b"))), conn=conn)
        self.assertEqual((status, conn.sock), (200, sock))

    def test_pass_through_forwards_only_the_normalised_path(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        rows = [("/api/v0/../tags?name=a/../b", "/api/tags?name=a/../b"),
                ("/v1/./x/%2e%2E/y/", "/v1/y/"), ("/v1//a///b", "/v1/a/b"),
                ("/api/%7Euser/%41", "/api/~user/A")]
        for path, forwarded in rows:
            with self.subTest(path):
                self.call("GET", path, headers={"Host": "localhost:1"})
                method, seen, headers, _ = upstream.requests[-1]
                self.assertEqual((method, seen), ("GET", forwarded))
                self.assertEqual(headers["Host"], upstream.url[len("http://"):])
        for path in ("/v1/../../etc/passwd", "/api/%2e%2e/status/x"):
            with self.subTest(path):
                count = len(upstream.requests)
                status, _, reply = self.call("GET", path)
                self.assertEnvelope(status, reply, 404, "not_found_error")
                self.assertEqual(len(upstream.requests), count)


    def test_an_answer_is_one_head_as_http_servers_then_its_body(self):
        # The head is written by send_head, no longer by http.server's send_response,
        # send_header and end_headers: same lines, same order, then the body.
        self.start(FakeUpstream(self))
        with socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT) as sock:
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        body = json.dumps({"ok": True, "service": "claude-router", "version": cr.VERSION})
        *heads, rest = data.decode("latin-1").split("\r\n\r\n")
        self.assertEqual((len(heads), rest), (2, body))     # HEAD's answer has none
        for head, expected in zip(heads, ([], ["Connection: close"])):
            lines = head.split("\r\n")
            self.assertEqual(lines[:2], ["HTTP/1.1 200 OK", "Server: claude-router/%s Python/%s"
                                         % (cr.VERSION, sys.version.split()[0])])
            date = email.utils.parsedate_to_datetime(lines[2][len("Date: "):])
            self.assertLess(abs(date.timestamp() - time.time()), 5)
            self.assertEqual(lines[3:], ["Content-Type: application/json",
                                         "Content-Length: %d" % len(body)] + expected)

    def test_a_body_too_big_to_join_its_head_arrives_whole(self):
        big = message_json("x" * (cr.Handler.join_limit * 2))
        upstream = FakeUpstream(self, [json_reply(big)])
        self.start(upstream)
        status, headers, reply = self.post(request(user(text("hi"))))
        self.assertEqual((status, reply), (200, big))
        self.assertEqual(headers["content-length"], str(len(json.dumps(big))))


class RequestFramingTest(RouterTestCase):
    """Issue 11, section 1: every body is consumed or the connection closes; refusals arrive."""

    def test_a_get_whose_body_is_a_request_gets_one_response(self):
        self.start(FakeUpstream(self))
        smuggled = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        sock = self.raw_socket()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(smuggled), smuggled))
        self.assertEqual(json.loads(read_response(sock)[2])["service"], "claude-router")
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_response(sock)     # the models, not the smuggled /status
        self.assertIn("data", json.loads(body))

    def test_pipelined_requests_in_one_write_each_get_their_answer(self):
        # A head taken in one piece leaves the rest where it was: the body, then the next
        # request; line ends of a bare LF count one byte, not two.
        self.start(FakeUpstream(self))
        ok = json.dumps(request(user(text("hi")))).encode()
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/messages HTTP/1.1\nHost: 127.0.0.1\nContent-Length: %d\n\n%s"
                     b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (len(ok), ok))
        # One buffer for the three responses, which a response's read must not close.
        fp = type("KeptOpen", (io.BufferedReader,), {"close": lambda self: None})(
            socket.SocketIO(sock, "rb"))
        shared = type("Shared", (), {"makefile": lambda self, mode: fp})()
        replies = [read_response(shared) for _ in range(3)]
        self.assertEqual([status for status, _, _ in replies], [200, 200, 200])
        self.assertEqual(json.loads(replies[0][2])["content"], [text("ok")])
        self.assertIn("requests", json.loads(replies[1][2]))
        self.assertEqual(json.loads(replies[2][2])["service"], "claude-router")

    def test_a_refusal_before_the_body_reaches_a_client_still_sending_it(self):
        body = b"x" * (8 << 20)
        rows = [("wrong token", {"token": "s3cret"}, b"x-api-key: wrong\r\n", 401),
                ("foreign host", {}, b"Host: evil.example\r\n", 403),
                ("over the limit", {"max_body_bytes": 1000}, b"", 413),
                ("chunked", {}, b"Transfer-Encoding: chunked\r\n", 411)]
        for name, settings, extra, expected in rows:
            with self.subTest(name):
                self.start(FakeUpstream(self), **settings)
                sock = self.raw_socket()
                sock.sendall(b"POST /v1/messages HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n"
                             % (extra, len(body)) + body)
                status, headers, reply = read_response(sock)
                self.assertEnvelope(status, json.loads(reply), expected)
                self.assertEqual(headers["connection"], "close")

    def test_100_continue_comes_only_after_the_access_and_size_checks(self):
        self.start(FakeUpstream(self), token="s3cret", max_body_bytes=100_000)
        ok = json.dumps(request(user(text("hi")))).encode()
        rows = [("wrong token", b"wrong", len(ok), 401), ("too big", b"s3cret", 200_000, 413)]
        for name, token, length, expected in rows:
            with self.subTest(name):
                sock = self.raw_socket()
                sock.sendall(b"POST /v1/messages HTTP/1.1\r\nx-api-key: %s\r\nContent-Length: %d"
                             b"\r\nExpect: 100-continue\r\n\r\n" % (token, length))
                first = b""
                while len(first) < 12:
                    first += sock.recv(12 - len(first)) or b"(closed)"
                self.assertEqual(first, b"HTTP/1.1 %d" % expected)    # no 100 Continue first
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nx-api-key: s3cret\r\nContent-Length: %d"
                     b"\r\nExpect: 100-continue\r\n\r\n" % len(ok))
        continued = recv_until(sock, b"\r\n\r\n")      # before any byte of the body
        self.assertEqual(continued, b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(ok)
        self.assertEqual(read_response(sock)[0], 200)

    def test_a_request_that_stalls_gets_408_and_an_idle_connection_does_not(self):
        self.start(FakeUpstream(self))
        self.router.request_timeout = 0.2
        idle = self.raw_socket()
        ok = json.dumps(request(user(text("hi")))).encode()
        rows = [("headers", b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"),
                ("body", b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(ok), ok[:10])),
                ("request line", b"POST /v1/mess")]
        for name, data in rows:
            with self.subTest(name):
                sock = self.raw_socket()
                sock.sendall(data)
                status, headers, body = read_response(sock)
                self.assertEnvelope(status, json.loads(body), 408)
                self.assertEqual(headers["connection"], "close")
        # idle has waited through three stalls, each longer than request_timeout
        idle.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(ok), ok))
        self.assertEqual(read_response(idle)[0], 200)

    def test_head_pass_through_has_no_body_and_keeps_the_upstreams_length(self):
        self.start(FakeUpstream(self))
        for path in (b"/v1/stream", b"/api/show"):
            with self.subTest(path):
                sock = self.raw_socket()
                sock.sendall(b"HEAD %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                             b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path)
                # One buffer for both responses, as they are pipelined: a "socket" whose
                # makefile is always the same file.
                fp = sock.makefile("rb")
                shared = type("Shared", (), {"makefile": lambda self, mode: fp})()
                resp = http.client.HTTPResponse(shared, method="HEAD")
                resp.begin()
                self.assertEqual((resp.status, resp.getheader("content-length")), (200, "1234"))
                self.assertIsNone(resp.getheader("transfer-encoding"))
                status, _, body = read_response(shared)     # the next starts right there
                self.assertEqual((status, json.loads(body)["service"]), (200, "claude-router"))

    def test_a_body_has_time_by_its_size_and_one_trickled_gets_408_by_its_deadline(self):
        # The body had a timeout per read only: sent a byte every few seconds, up to 64 MB,
        # it held its thread and its connection's slot for as long as the client liked.
        self.start(FakeUpstream(self))
        self.router.request_timeout, self.router.body_time_per_mb = 0.3, 2.0
        ok = json.dumps(request(user(text("x" * (1 << 20))))).encode()
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(ok))
        for piece in range(0, len(ok), len(ok) // 8 + 1):   # 1 MiB in 0.45 s: slow, but on time
            select.select([sock], [], [], 0.05)
            sock.sendall(ok[piece:piece + len(ok) // 8 + 1])
        self.assertEqual(read_response(sock)[0], 200)
        self.router.body_time_per_mb = 0.0
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(ok), ok[:100]))
        started = time.monotonic()
        # select is the pace: a byte every 0.05 s until the router answers (or TIMEOUT).
        while not select.select([sock], [], [], 0.05)[0] and time.monotonic() - started < TIMEOUT:
            sock.sendall(b"x")
        status, headers, body = read_response(sock)
        self.assertEnvelope(status, json.loads(body), 408)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual(headers["connection"], "close")

class BrokenHandler(cr.Handler):
    """The router's Handler with two more routes, each failing the way a bug would."""

    def fail(self):
        raise KeyError("simulated bug")

    def fail_mid_stream(self):
        with cr.Relay.open(self, self.server.upstream_url, "POST", "/v1/messages", b"{}",
                           {"Content-Type": "application/json"}) as relay:
            relay.send(learn=lambda text: {}["simulated bug"])

    routes = {**cr.Handler.routes, ("GET", "/fail"): fail,
              ("GET", "/fail-mid-stream"): fail_mid_stream}


class UnexpectedErrorTest(RouterTestCase):
    """A bug in a route still gets an answer, one log entry, and a bounded record."""

    def start_broken(self, upstream=None):
        router = self.start(upstream)
        router.RequestHandlerClass = BrokenHandler
        self.addCleanup(router.errors.clear)    # runs before the no-errors check
        return router

    def get_until_closed(self, path):
        """GET path on a raw socket; return (status, headers, body) once the router closed it,
        which it does after its handle_error has run."""
        with socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT) as sock:
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path)
            status, headers, body = read_response(sock)
            self.assertEqual(sock.recv(1), b"")
        return status, headers, body

    def test_an_exception_gets_a_500_envelope_and_the_connection_closes(self):
        router = self.start_broken()
        status, headers, body = self.get_until_closed(b"/fail")
        self.assertEnvelope(status, json.loads(body), 500, "api_error")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(headers["x-should-retry"], "false")    # a bug: retrying will not help
        self.assertEqual(router.errors, ["KeyError: 'simulated bug'"])
        entries = [l for l in self.log.lines() if l.startswith("! ")]
        self.assertEqual(len(entries), 1, entries)
        self.assertIn("KeyError", entries[0])
        self.assertIn(", in fail\n", self.log.getvalue())    # the frame that raised

    def test_the_record_of_exceptions_is_bounded(self):
        router = self.start_broken()
        for i in range(cr.ERRORS_KEPT * 3):
            self.assertEqual(self.get_until_closed(b"/fail")[0], 500)
        self.assertEqual(len(router.errors), cr.ERRORS_KEPT)

    def test_an_exception_mid_stream_ends_the_stream_with_an_error_event(self):
        events = text_events("answered, then a bug")
        self.start_broken(FakeUpstream(self, [stream_reply(events)]))
        status, headers, raw = self.get_until_closed(b"/fail-mid-stream")
        self.assertEqual(status, 200)
        self.assertTrue(raw.startswith(sse(*events)), raw)
        name, data = cr.parse_sse_event(raw[len(sse(*events)):])
        self.assertEqual((name, data["error"]["type"]), ("error", "api_error"))
        self.assertEqual(len(self.router.errors), 1)


################ Relay

class StreamingTest(RouterTestCase):

    def test_events_are_relayed_before_the_upstream_finishes(self):
        gate = threading.Event()
        events = text_events("streamed text")
        upstream = FakeUpstream(self, [stream_reply(events, gate=gate, gate_after=1)])
        self.start(upstream)
        conn = self.connect()
        conn.request("POST", "/v1/messages", json.dumps(request(user(text("hi")), stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.getheader("transfer-encoding"), "chunked")
        first = sse(events[0])
        got = b""
        while len(got) < len(first):    # arrives while the upstream waits on the gate
            got += resp.read1(65536)
        self.assertEqual(got, first)
        gate.set()
        self.assertEqual(got + resp.read(), sse(*events))

    def test_a_stream_that_closes_its_connection_is_relayed_whole(self):
        # http.client drops its socket when the response will close the connection;
        # waiting on the upstream must not depend on it (a 500 on every such stream).
        def closing_reply(chunked):
            def reply(handler):
                handler.send_response(200)
                handler.send_header("Content-Type", "text/event-stream")
                handler.send_header("Connection", "close")
                if chunked:
                    handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                for event in events:
                    if chunked:
                        write_chunk(handler, sse(event))
                    else:
                        handler.wfile.write(sse(event))
                if chunked:
                    handler.wfile.write(b"0\r\n\r\n")
                handler.close_connection = True
            return reply

        events = text_events("closing")
        for chunked in (True, False):
            with self.subTest(chunked=chunked):
                self.start(FakeUpstream(self, [closing_reply(chunked)]))
                status, _, body = self.post(request(user(text("hi")), stream=True))
                self.assertEqual((status, body), (200, sse(*events)))

    def test_an_event_split_across_reads_is_held_back_until_complete(self):
        gate = threading.Event()
        events = text_events("split")
        first, second = sse(events[0]), sse(events[1])

        def reply(handler):
            begin_stream(handler)
            write_chunk(handler, first + second[:20])
            gate.wait(TIMEOUT)
            write_chunk(handler, second[20:])
            handler.wfile.write(b"0\r\n\r\n")

        self.start(FakeUpstream(self, [reply]))
        conn = self.connect()
        conn.request("POST", "/v1/messages", json.dumps(request(user(text("hi")), stream=True)))
        resp = conn.getresponse()
        got = b""
        while len(got) < len(first):    # the whole first event, and nothing of the second
            got += resp.read1(65536)
        self.assertEqual(got, first)
        gate.set()
        self.assertEqual(got + resp.read(), first + second)

    def test_http10_client_gets_raw_stream_and_close(self):
        upstream = FakeUpstream(self, [stream_reply(text_events("old client"))])
        self.start(upstream)
        body = json.dumps(request(user(text("a")), stream=True)).encode()
        with socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT) as s:
            s.sendall(b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(payload, sse(*text_events("old client")))

    def test_chunk_framing_is_exact(self):
        events = text_events("framing")
        upstream = FakeUpstream(self, [stream_reply(events)])
        self.start(upstream)
        body = json.dumps(request(user(text("a")), stream=True)).encode()
        with socket.create_connection(("127.0.0.1", self.router.server_port), TIMEOUT) as s:
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n%s" % (len(body), body))
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        payload, chunks = raw.partition(b"\r\n\r\n")[2], []
        while payload:
            size, _, rest = payload.partition(b"\r\n")
            self.assertRegex(size, rb"^[0-9A-F]+$")
            chunk, payload = rest[:int(size, 16)], rest[int(size, 16):]
            self.assertEqual(payload[:2], b"\r\n")
            payload = payload[2:]
            chunks.append(chunk)
        # Whole events in each chunk (a burst at hand goes in one), the last chunk empty.
        self.assertEqual(b"".join(chunks), sse(*events))
        self.assertEqual(chunks[-1], b"")
        self.assertTrue(all(c.endswith(b"\n\n") for c in chunks[:-1]))


class RelayFaultTest(RouterTestCase):
    """A relayed response that breaks, stalls, or loses its client."""

    def test_what_a_retry_cannot_fix_says_so_with_the_servers_words(self):
        # Claude Code 2.1.332 retried a llama-server 500 ("image input is not supported")
        # ten times over three minutes, and a 404 showed its own text, not the server's.
        rows = [(400, {}, 400, "false"), (401, {}, 401, "false"), (404, {}, 502, "false"),
                (413, {}, 413, "false"), (429, {"Retry-After": "3"}, 429, None),
                (500, {}, 500, "false"), (503, {}, 503, None), (529, {}, 529, None)]
        for status, headers, expected, should_retry in rows:
            with self.subTest(status=status):
                body = {"error": {"code": status, "message": "words of %d" % status}}
                reply = lambda h, s=status, b=body, hs=headers: send_json(h, s, b, hs.items())
                self.start(FakeUpstream(self, [reply]))
                got, got_headers, answer = self.post(request(user(text("hi"))))
                self.assertEnvelope(got, answer, expected)
                self.assertEqual(answer["error"]["message"], "words of %d" % status)
                self.assertEqual(got_headers["x-should-retry"], should_retry)
                self.assertEqual(got_headers["retry-after"], headers.get("Retry-After"))

    def test_upstream_stall_mid_stream_ends_with_an_error_event(self):
        stall = threading.Event()
        self.addCleanup(stall.set)
        events = text_events("never finished")
        upstream = FakeUpstream(self, [stream_reply(events, stall=stall, gate_after=3)])
        self.start(upstream, read_timeout=0.2)
        status, _, raw = self.post(request(user(text("look"), image(PNG_A)), stream=True))
        self.assertTrue(raw.startswith(sse(*events[:3])))
        name, data = cr.parse_sse_event(raw[len(sse(*events[:3])):].strip())
        self.assertEqual((name, data["error"]["type"]), ("error", "overloaded_error"))
        # Python 3.9: socket.timeout is not TimeoutError, and a stall read as a break.
        self.assertIn("stalled", data["error"]["message"])
        self.assertEqual(len(self.router.vision.cache), 0)

    def test_upstream_cut_mid_stream_ends_cleanly_and_caches_nothing(self):
        events = text_events("half a description")
        upstream = FakeUpstream(self, [stream_reply(events, cut_after=4)])
        self.start(upstream)
        status, _, raw = self.post(request(user(text("look"), image(PNG_A)), stream=True))
        self.assertTrue(raw.startswith(sse(*events[:4])))
        self.assertIn(b"event: error", raw[len(sse(*events[:4])):])
        self.assertEqual(len(self.router.vision.cache), 0)
        self.assertEqual(self.call("GET", "/")[0], 200)

    def test_upstream_cut_inside_an_event_never_reaches_the_client_half_sent(self):
        events = text_events("cut inside the second event")

        def cut_inside(handler):
            begin_stream(handler)
            write_chunk(handler, sse(events[0]) + sse(events[1])[:30])
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

        rows = [("cut", cut_inside), ("ended", lambda handler: send_json(
            handler, 200, {}, [("Content-Type", "text/event-stream")]))]
        for name, reply in rows:
            with self.subTest(name):
                self.start(FakeUpstream(self, [reply]))
                status, _, raw = self.post(request(user(text("look"), image(PNG_A)), stream=True))
                complete = sse(events[0]) if name == "cut" else b""
                self.assertEqual(raw[:len(complete)], complete)
                event_name, data = cr.parse_sse_event(raw[len(complete):])
                self.assertEqual((event_name, data["error"]["type"]), ("error", "overloaded_error"))
                self.assertEqual(raw.count(b"\n\n"), complete.count(b"\n\n") + 1)
                self.assertEqual(len(self.router.vision.cache), 0)

    def test_events_that_are_not_objects_do_not_tear_a_vision_stream(self):
        events = [text_events("seen")[0], ("content_block_delta", "a string"),
                  ("content_block_delta", [1]), ("content_block_delta", None),
                  ("content_block_delta", {"type": "content_block_delta", "delta": [1]}),
                  ("content_block_delta", {"type": "content_block_delta", "delta": "x"}),
                  *text_events("seen")[1:]]
        deep = b"event: content_block_delta\ndata: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n"

        def reply_with_deep(handler):
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.send_header("Content-Length", str(len(deep + sse(*events))))
            handler.end_headers()
            handler.wfile.write(deep + sse(*events))

        upstream = FakeUpstream(self, [reply_with_deep])
        self.start(upstream)
        status, _, raw = self.post(request(user(text("look"), image(PNG_A)), stream=True))
        self.assertEqual((status, raw), (200, deep + sse(*events)))
        self.assertEqual(self.router.vision.cache.lookup([key(PNG_A)]), {key(PNG_A): "seen"})

    def test_client_disconnect_closes_the_upstream(self):
        gate = threading.Event()
        upstream = FakeUpstream(self)
        upstream.replies.append(stream_reply(text_events("long answer"), gate=gate, gate_after=1,
                                             until_closed=upstream))
        self.start(upstream)
        sock = self.post_raw(request(user(text("go")), stream=True))
        recv_until(sock, b"message_start")
        sock.close()
        gate.set()
        self.assertTrue(upstream.closed.wait(TIMEOUT))
        self.assertIn("client went away", self.log.getvalue())
        self.assertNotIn("Traceback", self.log.getvalue())

    def test_an_event_past_the_bound_ends_the_stream_instead_of_being_held(self):
        # 4 MB without a blank line was held whole and scanned again on every read, and
        # nothing reached the client; now the stream ends at MAX_EVENT_BYTES.
        gate = threading.Event()
        self.addCleanup(gate.set)
        events = text_events("never")

        def endless_event(handler):
            begin_stream(handler)
            write_chunk(handler, sse(events[0]))
            try:
                for i in range(32):     # 2 MB, then the upstream waits with its stream open
                    write_chunk(handler, (b"data: " if i == 0 else b"") + b"x" * 65536)
                gate.wait(TIMEOUT)
                for i in range(100):    # until the router closes the connection
                    write_chunk(handler, b"x" * 65536)
                handler.wfile.write(b"0\r\n\r\n")
            except OSError:
                handler.close_connection = True
                upstream.closed.set()

        upstream = FakeUpstream(self, [endless_event])
        self.start(upstream)
        status, _, raw = self.post(request(user(text("hi")), stream=True))
        gate.set()
        self.assertEqual(status, 200)
        self.assertTrue(raw.startswith(sse(events[0])))
        name, data = cr.parse_sse_event(raw[len(sse(events[0])):].strip())
        self.assertEqual((name, data["error"]["type"]), ("error", "overloaded_error"))
        self.assertTrue(upstream.closed.wait(TIMEOUT))
        self.assertIn("an event of over %d bytes" % cr.MAX_EVENT_BYTES, self.log.getvalue())

    def test_sixty_four_concurrent_streams_arrive_intact(self):
        def echo(handler, body):
            word = body["messages"][-1]["content"][0]["text"]
            stream_reply(text_events(word * 40) * 3)(handler)

        upstream = FakeUpstream(self, default=echo)
        self.start(upstream)
        results = {}
        start = threading.Barrier(64)

        def client(i):
            conn = http.client.HTTPConnection("127.0.0.1", self.router.server_port, timeout=TIMEOUT)
            start.wait(TIMEOUT)
            conn.request("POST", "/v1/messages", json.dumps(request(user(text("w%d." % i)),
                                                                     stream=True)))
            results[i] = conn.getresponse().read()
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        self.assertEqual(len(results), 64)
        for i, raw in results.items():
            self.assertEqual(raw, sse(*text_events("w%d." % i * 40) * 3))


class OverflowTest(RouterTestCase):
    """A prompt too long for the loaded context, in any server's words."""

    def test_context_overflow_becomes_prompt_is_too_long(self):
        llama = {"error": {"code": 400, "message": "request (80030 tokens) exceeds the available "
                           "context size (32768 tokens), try increasing it",
                           "type": "exceed_context_size_error"}}
        upstream = FakeUpstream(self, [json_reply(llama, 400), json_reply({"error": "nope"}, 400)])
        self.start(upstream)
        status, _, reply = self.post(request(user(text("long")), stream=True))
        self.assertEnvelope(status, reply, 400, "invalid_request_error")
        self.assertEqual(reply["error"]["message"], "prompt is too long: 80030 tokens > 32768 maximum")
        status, _, reply = self.post(request(user(text("x"))))
        self.assertEqual((status, reply), (400, cr.anthropic_error(400, "nope")))

    def test_overflow_as_the_first_event_of_a_stream_becomes_prompt_is_too_long(self):
        lmstudio = ("error", {"type": "error", "error": {
            "type": "invalid_request_error", "message": "Trying to keep the first 40000 tokens "
            "when context the overflows. However, the model is loaded with context length of "
            "only 32768 tokens, which is not enough."}})
        other = ("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})
        upstream = FakeUpstream(self, [stream_reply([lmstudio]), stream_reply([other])])
        self.start(upstream)
        status, _, reply = self.post(request(user(text("long")), stream=True))
        self.assertEnvelope(status, reply, 400, "invalid_request_error")
        self.assertEqual(reply["error"]["message"], "prompt is too long: 40000 tokens > 32768 maximum")
        status, _, raw = self.post(request(user(text("x")), stream=True))
        self.assertEqual((status, raw), (200, sse(other)))

    def test_overflow_as_http_500_becomes_prompt_is_too_long(self):
        # LM Studio's Anthropic path answers some overflows with 500 api_error, which Claude
        # Code retries for three minutes (wording: lmstudio-bug-tracker#2339).
        lmstudio = {"type": "error", "error": {"type": "api_error",
                                               "message": "Context size has been exceeded."}}
        crash = {"type": "error", "error": {"type": "api_error", "message": "The model has "
                                            "crashed without additional information."}}
        upstream = FakeUpstream(self, [json_reply(lmstudio, 500), json_reply(crash, 500)])
        self.start(upstream)
        status, _, reply = self.post(request(user(text("long"))))
        self.assertEnvelope(status, reply, 400, "invalid_request_error")
        self.assertTrue(reply["error"]["message"].startswith("prompt is too long: "), reply)
        status, _, reply = self.post(request(user(text("x"))))
        self.assertNotIn("prompt is too long", json.dumps(reply))

    def test_overflow_event_split_across_reads_is_still_seen(self):
        # http.client's read1 returns at most one chunk: the router saw only the start of
        # LM Studio's opening error event and relayed it as a 200 stream. With CR line
        # ends (valid SSE) it read the event as one line and missed it too.
        event = sse(("error", {"type": "error", "error": {
            "type": "invalid_request_error", "message": "Trying to keep the first 40000 tokens "
            "when context the overflows. However, the model is loaded with context length of "
            "only 32768 tokens, which is not enough."}}))

        def split(raw):
            def reply(handler):
                begin_stream(handler)
                cuts = [0, raw.index(b"Trying"), len(raw) - 3, len(raw) - 1, len(raw)]
                for start, end in zip(cuts, cuts[1:]):
                    write_chunk(handler, raw[start:end])
                handler.wfile.write(b"0\r\n\r\n")
            return reply

        for newline in (b"\n", b"\r\n", b"\r"):
            with self.subTest(newline=newline):
                self.start(FakeUpstream(self, [split(event.replace(b"\n", newline))]))
                status, _, reply = self.post(request(user(text("long")), stream=True))
                self.assertEnvelope(status, reply, 400, "invalid_request_error")
                self.assertEqual(reply["error"]["message"],
                                 "prompt is too long: 40000 tokens > 32768 maximum")

    def test_vllm_max_model_len_clamps_max_tokens_and_its_refusal_is_no_overflow(self):
        # vLLM refuses input plus max_tokens over --max-model-len with "'max_tokens' ... is
        # too large" (up to v0.17). Read as an overflow, a 12k-token prompt at 32k context
        # became "prompt is too long": Claude Code compacted, and the compaction failed the
        # same way.
        def vllm(handler, body):
            tokens = len(json.dumps(body)) // 4     # fewer than the router's estimate
            if tokens + body["max_tokens"] <= 32768:
                return json_reply(message_json("fits"))(handler)
            message = ("'max_tokens' or 'max_completion_tokens' is too large: %d. This model's "
                       "maximum context length is 32768 tokens and your request has %d input "
                       "tokens (%d > 32768 - %d)." % (body["max_tokens"], tokens,
                                                      body["max_tokens"], tokens))
            send_json(handler, 400, {"error": {"message": message, "type": "BadRequestError",
                                               "param": None, "code": 400}})

        listing = {"object": "list", "data": [{"id": "CODER", "object": "model",
                                               "owned_by": "vllm", "max_model_len": 32768}]}
        upstream = FakeUpstream(self, listing=listing, default=vllm)
        self.start(upstream).known_models()
        body = request(user(text("x " * 24000)))   # 12k tokens by the fake's count
        status, _, reply = self.post(body)
        self.assertEqual(status, 200, reply)
        self.assertLessEqual(upstream.posts()[-1]["max_tokens"], 32768 - 12000)
        # Where the context is not known, vLLM's refusal reaches Claude Code as it is.
        self.start(FakeUpstream(self, default=vllm))
        status, _, reply = self.post(body)
        self.assertEqual(status, 400)
        self.assertIn("is too large: 32000", reply["error"]["message"])
        self.assertNotIn("prompt is too long", json.dumps(reply))


################ Turn

class RoutingTest(RouterTestCase):

    def test_text_goes_to_the_coder_cleaned(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        status, _, reply = self.post(
            request(user(text("hi")), {"role": "system", "content": "env"}, thinking={"type": "adaptive"}),
            headers={"anthropic-beta": "claude-code-20250219", "x-api-key": "secret-key",
                     "anthropic-version": "2023-06-01"})
        self.assertEqual((status, reply["content"]), (200, [text("ok")]))
        _, path, headers, body = upstream.requests[-1]
        self.assertEqual(path, "/v1/messages")
        self.assertEqual(body, {"model": "CODER", "max_tokens": 32000,
                                "messages": [user(reminder("env"), text("hi"))]})
        lower = {k.lower(): v for k, v in headers.items()}
        self.assertNotIn("anthropic-beta", lower)
        self.assertNotIn("x-api-key", lower)
        self.assertEqual(lower["anthropic-version"], "2023-06-01")
        self.assertIn("→ coder [CODER]", self.log.getvalue())

    def test_an_expect_the_router_answered_does_not_reach_the_upstream(self):
        # The router sends its 100 Continue and then the whole body: passed on, Expect had
        # the model server answer with a 100 of its own for a body already on its way.
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            with self.subTest(path):
                upstream = FakeUpstream(self)
                self.start(upstream)
                body = json.dumps(request(user(text("hi")))).encode()
                sock = self.raw_socket()
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                             b"Expect: 100-continue\r\n\r\n" % (path.encode(), len(body)))
                self.assertEqual(recv_until(sock, b"\r\n\r\n"), b"HTTP/1.1 100 Continue\r\n\r\n")
                sock.sendall(body)
                status, _, _ = read_response(sock)
                self.assertEqual(status, 200)
                headers = {k.lower() for k in upstream.requests[-1][2]}
                self.assertNotIn("expect", headers)

    def test_two_assistant_messages_in_a_row_reach_the_upstream_folded(self):
        # They were merged after folding, so Devstral's template met [text, tool_use, text,
        # tool_use] (issue 14, section 2).
        upstream = FakeUpstream(self, strict=True)
        self.start(upstream)
        second = {"type": "tool_use", "id": "t2", "name": "Grep", "input": {"pattern": "x"}}
        history = [user(text("go")), assistant(text("first"), tool_use("t1")),
                   assistant(text("second"), second),
                   user(tool_result("t1", text("r1")), tool_result("t2", text("r2")))]
        self.assertEqual(self.post(request(*history))[0], 200)
        self.assertEqual(upstream.posts()[-1]["messages"], [
            user(text("go")), assistant(text("first\n\nsecond"), tool_use("t1"), second),
            user(tool_result("t1", text("r1")), tool_result("t2", text("r2")))])

    def test_pasted_image_goes_to_vision_and_json_reply_becomes_its_description(self):
        upstream = FakeUpstream(self, [json_reply(message_json("A red square."))])
        self.start(upstream)
        first = request(user(text("what is this"), image(PNG_A)))
        self.assertEqual(self.post(first)[0], 200)
        self.assertEqual(upstream.posts()[-1]["model"], "VISION")
        self.assertEqual(upstream.posts()[-1]["messages"], [user(text("what is this"), image(PNG_A))])
        second = request(*first["messages"], assistant(text("A red square.")), user(text("bigger?")))
        self.post(second)
        coder = upstream.posts()[-1]
        self.assertEqual(coder["model"], "CODER")
        self.assertEqual(coder["messages"][0], user(text("what is this"),
                                                     text("<<IMAGE DESCRIPTION: A red square.>>")))
        self.assertIn("→ vision [VISION]", self.log.getvalue())
        self.assertIn("cached description for 1 image(s)", self.log.getvalue())

    def test_tool_result_image_goes_to_vision_lifted_and_sse_reply_is_captured(self):
        upstream = FakeUpstream(self, [stream_reply(text_events("A login form with an error."))])
        self.start(upstream)
        history = [user(text("check shot.png")), assistant(text("Reading."), tool_use("t1")),
                   user(tool_result("t1", image(PNG_B)))]
        status, _, raw = self.post(request(*history, stream=True))
        self.assertEqual(raw, sse(*text_events("A login form with an error.")))
        vision = upstream.posts()[-1]
        self.assertEqual((vision["model"], vision["messages"][2:]), ("VISION", [
            user(tool_result("t1", text(cr.LIFTED_IMAGE_TEXT))),
            assistant(text(cr.SYNTHETIC_ASSISTANT_TEXT)),
            user(image(PNG_B), text(cr.SYNTHETIC_USER_TEXT))]))
        self.post(request(*history, assistant(text("A login form with an error.")),
                          user(text("fix it")), stream=True))
        coder = upstream.posts()[-1]
        self.assertEqual(coder["model"], "CODER")
        self.assertEqual(coder["messages"][2], user(tool_result("t1", text(
            "<<IMAGE DESCRIPTION: A login form with an error.>>"))))

    def test_same_image_after_a_restart_goes_to_the_coder(self):
        upstream = FakeUpstream(self, [json_reply(message_json("A cat."))])
        first = self.start(upstream)
        self.post(request(user(image(PNG_C))))
        first.shutdown()
        self.start(upstream)
        self.post(request(user(text("again"), image(PNG_C))))
        self.assertEqual([b["model"] for b in upstream.posts()], ["VISION", "CODER"])
        self.assertEqual(upstream.posts()[-1]["messages"][0]["content"][1],
                         text("<<IMAGE DESCRIPTION: A cat.>>"))

    def test_routers_sharing_a_cache_dir_never_describe_an_image_twice(self):
        upstream = FakeUpstream(self, [json_reply(message_json("A cat."))])
        first = self.start(upstream)
        second = self.start(upstream)       # both running, both loaded an empty cache
        self.post(request(user(image(PNG_C))), conn=self.connect(first))
        self.post(request(user(text("again"), image(PNG_C))), conn=self.connect(second))
        self.assertEqual([b["model"] for b in upstream.posts()], ["VISION", "CODER"])
        self.assertEqual(upstream.posts()[-1]["messages"][0]["content"][1],
                         text("<<IMAGE DESCRIPTION: A cat.>>"))

    def test_unknown_images_of_earlier_turns_become_markers(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        self.post(request(user(image(PNG_A)), assistant(text("?")), user(text("go on"))))
        self.assertEqual(upstream.posts()[-1]["messages"][0],
                         user(text(cr.UNKNOWN_IMAGE_MARKER)))

    def test_vision_request_carries_descriptions_of_older_images(self):
        upstream = FakeUpstream(self, [json_reply(message_json("old one")),
                                       json_reply(message_json("new one"))])
        self.start(upstream)
        self.post(request(user(image(PNG_A))))
        self.post(request(user(image(PNG_A)), assistant(text("old one")), user(image(PNG_B))))
        vision = upstream.posts()[-1]
        self.assertEqual(vision["model"], "VISION")
        self.assertEqual(vision["messages"][0], user(text("<<IMAGE DESCRIPTION: old one>>")))
        self.assertEqual(vision["messages"][2], user(image(PNG_B)))

    def test_cut_vision_reply_stores_nothing(self):
        upstream = FakeUpstream(self, [stream_reply(text_events("cut"), cut_after=3)])
        self.start(upstream)
        self.post(request(user(image(PNG_A)), stream=True))
        self.assertEqual(len(self.router.vision.cache), 0)

    def test_strict_backend_gets_only_what_it_accepts(self):
        upstream = FakeUpstream(self, strict=True)
        self.start(upstream)
        body = request(
            user(text("<system-reminder>r</system-reminder>"), text("read a.png")),
            {"role": "system", "content": [{"type": "text", "text": "env",
                                            "cache_control": {"type": "ephemeral"}}]},
            assistant({"type": "thinking", "thinking": "t", "signature": ""}, text("ok"),
                      tool_use("t1"), text("and"), tool_use("t2", "ToolSearch")),
            user(tool_result("t1", image(PNG_A)),
                 tool_result("t2", {"type": "tool_reference", "tool_name": "WebFetch"})),
            {"role": "user", "content": "continue", "output_config": {"effort": "high"}},
            system=[text("x-anthropic-billing-header: cc_version=1"), text("sys")],
            thinking={"type": "adaptive"}, context_management={}, output_config={},
            metadata={}, stream=False)
        self.router.vision.cache.store({key(PNG_A): "a chart"}, "VISION")
        status, _, reply = self.post(body)
        self.assertEqual(status, 200, reply)


class PrefixReplayTest(RouterTestCase):
    """A growing Claude Code conversation, replayed turn by turn through the router."""

    def test_each_coder_prompt_starts_with_the_last_one_byte_for_byte(self):
        # Folding mid-session system messages into the top-level system made the server
        # re-read two thirds of all prompt characters in an 8-step tool session (issue 10).
        def reply(handler, body):
            if body["model"] == "VISION" and PNG_C in json.dumps(body):
                return json_reply({"error": "cannot read"}, 500)(handler)
            json_reply(message_json("a chart" if body["model"] == "VISION" else "ok"))(handler)

        upstream = FakeUpstream(self, default=reply)
        self.start(upstream)
        tools = [{"name": "Read", "description": "read", "input_schema": {"type": "object"},
                  "cache_control": {"type": "ephemeral"}},
                 {"name": "Bash", "description": "run", "input_schema": {}},
                 {"name": "WebFetch", "input_schema": {}, "defer_loading": True}]

        def system(suffix):
            return [text("x-anthropic-billing-header: cc_version=2.1.332.%s;" % suffix),
                    text("You are Claude Code."),
                    text("<total_tokens>15000000 tokens left</total_tokens>")]

        def countdown(n):
            return system_message("<total_tokens>%d tokens left</total_tokens>" % n)

        thinking = {"type": "thinking", "thinking": "hm", "signature": ""}
        env = {"role": "system", "output_config": {"effort": "high"}, "content": [
            {"type": "text", "text": "cwd: /p", "cache_control": {"type": "ephemeral"}}]}
        first = [user(text("<system-reminder>attribution</system-reminder>"), text("read a.py")),
                 env]
        then = [
            [assistant(thinking, text("Reading."), tool_use("t1")),
             user(tool_result("t1", text("1\tprint()"))), countdown(14990000)],
            [assistant(tool_use("t0")), user(tool_result("t0", read_line("/p/spec.pdf"),
                                                          pdf_document(make_pdf("Spec", "v2")))),
             countdown(14985000)],                                      # a PDF, read once
            [assistant(thinking, tool_use("t2")), user(tool_result("t2", image(PNG_A))),
             countdown(14980000)],                                      # vision describes it
            [assistant(text("It shows a chart.")), user(text("make it bigger"))],
            [assistant(tool_use("t3")), user(tool_result("t3", image(PNG_C))),
             countdown(14970000)],                                      # vision fails
            [assistant(text("I could not see it.")), user(text("go on")),
             system_message("## Exited Auto Mode")],
            [user(text("and also this"))],                              # same user turn grows
            [assistant(text("a"), tool_use("t4"), text("b"), tool_use("t5", "Bash")),
             user(tool_result("t5", text("ok")), tool_result("t4", text("x"))),
             countdown(14960000)],
            "compaction",
            [assistant(thinking, tool_use("t6")), user(tool_result("t6", text("y"))),
             countdown(14950000)],
            [assistant(text("done")), user(text("thanks"), image(PNG_B))],   # vision
            [assistant(text("a chart")), user(text("bye"))],
        ]
        sent = [(first, "abc")]
        history = [first[0], dict(env, content="cwd: /p")]     # later turns: a plain string
        for step in then:
            if step == "compaction":
                history = [{"role": "user", "content": "Summary: a.py read."},
                           system_message("Today's date is 2026-12-02."),
                           assistant(text("Continuing.")), user(text("next")),
                           system_message("cwd: /p")]
            else:
                history = history + step
            sent.append((history, "def" if len(sent) > 8 else "abc"))
        coder = []
        for i, (history, suffix) in enumerate(sent):
            body = request(*cache_newest(history), system=system(suffix), tools=tools,
                           thinking={"type": "adaptive"}, stream=i % 2 == 1)
            status, _, reply_body = self.post(body)
            self.assertIn(status, (200, 500), reply_body)
            if json.loads(upstream.raw[-1][1])["model"] == "CODER":
                coder.append(upstream.raw[-1][1])
                # What the router took as read from earlier turns (RequestParts) changes no
                # byte: a router that read none of them sends the same.
                warm, self.router.request_parts = self.router.request_parts, cr.RequestParts()
                self.assertEqual(self.post(body)[0], 200)
                self.assertEqual(upstream.raw[-1][1], coder[-1])
                self.router.request_parts = warm
        self.assertEqual(len(coder), 11)     # the failed vision turn falls back to the coder
        for previous, current in zip(coder, coder[1:]):
            # Templates render system, tools, then messages: the body keeps that order,
            # so a byte prefix of the body is a prefix of the prompt.
            self.assertLess(current.index(b'"tools": ['), current.index(b'"messages": ['))
            self.assertLess(current.index(b'"system": ['), current.index(b'"tools": ['))
            last = json.loads(previous)["messages"][-1]
            cut = previous.rindex(json.dumps(last).encode())
            if b"Summary: a.py read." in current and b"Summary: a.py read." not in previous:
                cut = previous.index(b'"messages": [') + len(b'"messages": [')
            else:
                grown = json.loads(current)["messages"][len(json.loads(previous)["messages"]) - 1]
                self.assertEqual(grown["content"][:len(last["content"])], last["content"])
            self.assertEqual(current[:cut], previous[:cut])
        self.assertNotIn(b'"system"', b"".join(json.dumps(m["role"]).encode() for c in coder
                                             for m in json.loads(c)["messages"]))


def cache_newest(history):
    """history as Claude Code sends it each turn: cache_control on the newest message's last
    block, on no other message's."""
    out = [dict(m, content=[{k: v for k, v in b.items() if k != "cache_control"}
                            for b in m["content"]]) if isinstance(m["content"], list) else m
           for m in history]
    if isinstance(out[-1]["content"], list):
        out[-1]["content"][-1] = {**out[-1]["content"][-1], "cache_control": {"type": "ephemeral"}}
    return out


TOOLS = [{"name": "Read", "description": "read a file", "input_schema": {"type": "object"}}]
TITLE_SYSTEM = [text("You are naming a coding session. Return JSON with a single \"title\" field.")]


def lmstudio_listing(coder_loaded=True):
    """LM Studio's /api/v1/models with the coder loaded or not, and the vision model loaded."""
    return {"models": [{"key": "CODER", "loaded_instances": [{"id": "CODER"}] if coder_loaded
                        else []},
                       {"key": "VISION", "capabilities": {"vision": True},
                        "loaded_instances": [{"id": "VISION"}]}]}


def first_turn(prompt="hi", environment="cwd: /p"):
    """A first turn as Claude Code sends it, in its key order: its environment and a prompt,
    system text, tools."""
    return {"model": "claude-opus-5-5", "messages": [system_message(environment), user(text(prompt))],
            "system": [text("You are Claude Code.")], "tools": TOOLS, "max_tokens": 32000}


class RequestClassTest(RouterTestCase):
    """Claude Code's hint headers: books per request class, the route line, side requests."""

    def route_lines(self):
        return [l for l in self.log.lines() if l.startswith("→")]

    def test_hint_headers_are_not_forwarded(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        hints = {"X-Claude-Code-Request-Class": "main", "X-Claude-Code-Compaction": "auto",
                 "X-Claude-Code-Context-Compacted": "true", "X-Claude-1p-Request-Class": "main",
                 "X-Claude-Code-Prompt-Id": "p1", "X-Claude-Code-Prev-Tool-Durations": "Bash=37"}
        self.post(first_turn(), headers=hints)
        self.call("POST", "/v1/other", {"a": 1}, headers=hints)
        for method, path, headers, _ in upstream.requests:
            with self.subTest(path):
                self.assertEqual({h.lower() for h in headers} & {h.lower() for h in hints}, set())

    def test_each_request_class_keeps_its_own_books(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        turn = first_turn()
        grown = {**turn, "messages": turn["messages"] + [assistant(text("ok")), user(text("go"))]}
        title = request(user(text("hi")), system=TITLE_SYSTEM)
        main = {"X-Claude-Code-Session-Id": "s1", "X-Claude-Code-Request-Class": "main"}
        rows = [
            ("main", turn, main, "first turn"),
            ("title", title, {**main, "X-Claude-Code-Request-Class": "auxiliary"},
             "first turn, auxiliary: session title"),
            ("main again", grown, main, "100.0% as last turn"),
            ("compaction", grown, {**main, "X-Claude-Code-Request-Class": "compaction",
                                   "X-Claude-Code-Compaction": "manual"},
             "first turn, compaction: manual compaction"),
            ("compacted", turn, {**main, "X-Claude-Code-Context-Compacted": "true"},
             "as last turn, the first turn after a compaction"),
            ("main system changed", {**grown, "system": [text("Other.")]}, main,
             "0.0% as last turn, changed from system on"),
            # Without hint headers, by system text.
            ("plain main", turn, {"X-Claude-Code-Session-Id": "s2"}, "first turn"),
            ("plain title", title, {"X-Claude-Code-Session-Id": "s2"}, "first turn"),
            ("plain main again", grown, {"X-Claude-Code-Session-Id": "s2"}, "100.0% as last turn"),
        ]
        for name, body, headers, said in rows:
            with self.subTest(name):
                self.post(body, headers=headers)
                self.assertTrue(self.route_lines()[-1].endswith(said), self.route_lines()[-1])

    def test_side_requests_go_to_the_side_model_when_one_is_set(self):
        upstream, side = FakeUpstream(self), FakeUpstream(self)
        self.start(upstream, side_model="SIDE", side_upstream_url=side.url)
        title = request(user(text("hi")), system=TITLE_SYSTEM)
        self.post(title, headers={"X-Claude-Code-Request-Class": "auxiliary"})
        self.post(title)                                        # no tools, no hint headers
        self.post(first_turn(), headers={"X-Claude-Code-Request-Class": "main"})
        self.post(first_turn())
        self.assertEqual([b["model"] for b in side.posts()], ["SIDE", "SIDE"])
        self.assertEqual([b["model"] for b in upstream.posts()], ["CODER", "CODER"])
        self.assertTrue(self.route_lines()[0].startswith("→ side [SIDE]"))
        _, _, status = self.call("GET", "/status")
        self.assertEqual((status["routes"]["side"], status["side"]),
                         (2, {"model": "SIDE", "upstream": side.url}))

    def test_side_requests_go_to_the_coder_without_a_side_model(self):
        upstream = FakeUpstream(self)
        self.start(upstream)
        self.post(request(user(text("hi")), system=TITLE_SYSTEM),
                  headers={"X-Claude-Code-Request-Class": "auxiliary"})
        self.assertEqual(upstream.posts()[0]["model"], "CODER")


################ Warm-up

class WarmUpTest(RouterTestCase):
    """The coder's prompt head read ahead of the user, kept on disk, and never in the way."""

    router_settings = {"warm": True}

    def warm_ups(self, upstream):
        return [b for b in upstream.posts() if b.get("max_tokens") == 1]

    def turn(self, body, headers=None):
        """Post a turn and wait until the router counts it done (its outcome line)."""
        done = self.log.when("← 200")
        self.post(body, headers=headers)
        self.assertTrue(done.wait(TIMEOUT))

    def held(self, arrived, closed):
        """A reply that answers nothing and sets closed once the router closes the request."""
        def reply(handler):
            arrived.set()
            if sees_close(handler.connection):
                closed.set()
            handler.close_connection = True
        return reply

    def test_the_head_kept_survives_a_restart_and_is_sent_as_the_turn_sent_it(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        self.start(upstream)
        self.post(first_turn("first"), headers={"X-Claude-Code-Session-Id": "s1"})
        path = os.path.join(self.cache_dir, "heads.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        written = os.stat(path).st_ino
        self.post(first_turn("another"), headers={"X-Claude-Code-Session-Id": "s2"})
        self.assertEqual(os.stat(path).st_ino, written)     # the same head: not rewritten
        router = self.start(upstream)                       # a restart on the same cache dir
        self.assertTrue(router.warm("router start"))
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        turn, warm = upstream.raw[0][1], upstream.raw[-1][1]
        self.assertEqual(json.loads(warm)["messages"], [user(reminder("cwd: /p"), text("."))])
        self.assertEqual((json.loads(warm)["max_tokens"], json.loads(warm)["stream"]), (1, False))
        # Byte for byte as the turn sent it, through the environment reminder.
        end = turn.index(json.dumps(reminder("cwd: /p")).encode()) + len(
            json.dumps(reminder("cwd: /p")))
        self.assertEqual(warm[:end], turn[:end])
        self.assertIn("warm-up: coder prefix 5 tokens read in", self.log.getvalue())
        _, _, status = self.call("GET", "/status")
        self.assertEqual({k: status["warm_up"][k] for k in ("running", "reason", "tokens", "outcome")},
                         {"running": False, "reason": "router start", "tokens": 5, "outcome": "done"})

    def test_a_damaged_head_file_is_ignored_with_one_warning(self):
        path = os.path.join(self.cache_dir, "heads.json")
        with open(path, "w") as f:
            f.write('{"heads": [{"model": "CODER", "upstr')     # torn by a crash
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        router = self.start(upstream)
        self.assertEqual(self.log.getvalue().count("warm-up: ignored"), 1)
        self.assertFalse(router.warm("router start"))
        self.post(first_turn())
        with open(path) as f:
            self.assertEqual(len(json.load(f)["heads"]), 1)
        self.assertEqual(self.warm_ups(upstream), [])

    def test_routers_sharing_the_cache_dir_keep_each_others_heads(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        first, second = self.start(upstream), self.start(upstream, coder_model="OTHER")
        self.post(first_turn(), conn=self.connect(first))
        self.post(first_turn(), conn=self.connect(second))
        with open(os.path.join(self.cache_dir, "heads.json")) as f:
            self.assertEqual([h["model"] for h in json.load(f)["heads"]], ["CODER", "OTHER"])

    def test_a_warm_up_that_meets_a_bug_still_ends_and_the_next_one_runs(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        router = self.start(upstream)
        self.turn(first_turn())
        traced = self.log.when("KeyError")
        self.assertTrue(router.warm("test", {"model": "CODER"}))   # no messages: a KeyError
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        self.assertTrue(traced.wait(TIMEOUT))                        # loud, as bugs are
        self.assertEqual(router.warmer.status()["outcome"], "failed: the router failed on it (a bug)")
        self.assertTrue(router.warm("test"))
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        self.assertEqual(len(self.warm_ups(upstream)), 1)

    def test_no_warm_up_while_a_turn_is_in_flight(self):
        arrived, gate = threading.Event(), threading.Event()

        def held(handler):
            arrived.set()
            gate.wait(TIMEOUT)
            json_reply(message_json("ok"))(handler)
        upstream = FakeUpstream(self, [json_reply(message_json("ok")), held], listing=LLAMA_LISTING)
        router = self.start(upstream)
        self.turn(first_turn())
        conn = self.connect()
        conn.request("POST", "/v1/messages", json.dumps(first_turn("second")),
                     {"Content-Type": "application/json"})
        self.assertTrue(arrived.wait(TIMEOUT))
        self.assertFalse(router.warm("test"))
        answered = self.log.when("← 200")
        gate.set()
        self.assertEqual(conn.getresponse().status, 200)
        self.assertTrue(answered.wait(TIMEOUT))
        self.assertEqual(self.warm_ups(upstream), [])
        self.assertTrue(router.warm("test"))         # once it is answered
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        self.assertEqual(len(self.warm_ups(upstream)), 1)

    def test_no_warm_up_of_a_coder_the_server_has_not_loaded(self):
        upstream = FakeUpstream(self, listing=lmstudio_listing(coder_loaded=False))
        router = self.start(upstream)
        self.turn(first_turn())
        self.assertFalse(router.warm("router start"))
        router.refresh_models()
        self.assertEqual(self.warm_ups(upstream), [])
        upstream.listing = lmstudio_listing(coder_loaded=True)     # the user loaded it
        router.refresh_models()
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        self.assertEqual(len(self.warm_ups(upstream)), 1)
        self.assertIn("(the coder was loaded)", self.log.getvalue())

    def test_a_restarted_llama_server_gets_a_warm_up(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        upstream.props = {"media_marker": "<__media_a__>", "build_info": "b1", "model_path": "/m"}
        router = self.start(upstream)
        self.turn(first_turn())
        router.refresh_models()
        self.assertEqual(self.warm_ups(upstream), [])
        upstream.props = {**upstream.props, "media_marker": "<__media_b__>"}   # drawn anew
        router.refresh_models()
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        # After a turn, its prompt goes whole: were it still cached, the head with another
        # end would push it out of a one-slot server's cache.
        turn, warm = upstream.posts()
        self.assertEqual(warm, {**turn, "max_tokens": 1, "stream": False})
        self.assertIn("warm-up: coder prompt 5 tokens read", self.log.getvalue())
        self.assertIn("(the model server restarted)", self.log.getvalue())

    def test_a_turn_arriving_during_a_warm_up_is_answered_without_waiting_for_it(self):
        arrived, closed = threading.Event(), threading.Event()
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        router = self.start(upstream)
        self.turn(first_turn())
        upstream.replies.append(self.held(arrived, closed))   # never answers by itself

        def one_slot(handler):
            # A one-slot server takes the turn once the warm-up's task is gone.
            if closed.wait(TIMEOUT):
                json_reply(message_json("ok"))(handler)
        upstream.replies.append(one_slot)
        self.assertTrue(router.warm("router start"))
        self.assertTrue(arrived.wait(TIMEOUT))
        status, _, reply = self.post(first_turn("now"))
        self.assertEqual((status, reply["content"]), (200, [text("ok")]))
        self.assertTrue(closed.wait(TIMEOUT))                   # the warm-up's request was closed
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        self.assertEqual(router.warmer.status()["outcome"], "cancelled: a turn arrived")
        self.assertIn("warm-up: coder prompt cancelled after", self.log.getvalue())

    def test_a_request_for_another_server_leaves_the_warm_up_running(self):
        # Every routed request cancelled the warm-up, wherever it went: Claude Code's session
        # title, which comes with the first prompt, threw away minutes of reading on the
        # coder's server when it went to a side server of its own.
        arrived, closed = threading.Event(), threading.Event()
        upstream, side = FakeUpstream(self, listing=LLAMA_LISTING), FakeUpstream(self)
        router = self.start(upstream, side_model="SIDE", side_upstream_url=side.url)
        self.turn(first_turn())
        upstream.replies.append(self.held(arrived, closed))   # never answers by itself
        self.assertTrue(router.warm("router start"))
        self.assertTrue(arrived.wait(TIMEOUT))
        self.turn(request(user(text("hi")), system=TITLE_SYSTEM),
                  headers={"X-Claude-Code-Request-Class": "auxiliary"})
        self.assertEqual([b["model"] for b in side.posts()], ["SIDE"])
        self.assertEqual((router.warmer.status()["running"], router.warmer.cancelled), (True, None))
        self.assertFalse(closed.is_set())
        self.post(first_turn("now"))                            # one for the coder's server
        self.assertTrue(closed.wait(TIMEOUT))
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        self.assertEqual(router.warmer.status()["outcome"], "cancelled: a turn arrived")

    def test_after_a_vision_turn_on_one_server_the_last_coder_prompt_is_sent_again(self):
        upstream = FakeUpstream(self, listing=lmstudio_listing())
        self.start(upstream)
        session = {"X-Claude-Code-Session-Id": "s1"}
        turn = first_turn("look")
        self.post(turn, headers=session)
        warmed = self.log.when("warm-up: coder prompt")
        grown = {**turn, "messages": turn["messages"] + [
            assistant(text("ok")), user(image(), text("what is this?"))]}
        self.post(grown, headers=session)
        self.assertTrue(warmed.wait(TIMEOUT))
        coder, vision, warm = upstream.posts()
        self.assertEqual((vision["model"], warm["model"]), ("VISION", "CODER"))
        self.assertEqual(warm, {**coder, "max_tokens": 1, "stream": False})
        self.assertIn("(after a vision turn)", self.log.getvalue())

    def test_off_by_default_and_no_heads_file_when_off(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        router = self.start(upstream, warm=False)
        self.post(first_turn())
        self.assertFalse(router.warm("router start"))
        self.assertFalse(os.path.exists(os.path.join(self.cache_dir, "heads.json")))
        self.assertFalse(cr.parse_settings(["--no-warm"], {}).warm)
        self.assertFalse(cr.parse_settings([], {"CLAUDE_ROUTER_WARM": "0"}).warm)
        self.assertTrue(cr.parse_settings([], {}).warm)

    def test_a_head_file_or_a_warm_up_reply_nested_past_the_parsers_limit_stops_nothing(self):
        # A RecursionError, which neither the head file's reader nor the warm-up caught: the
        # first stopped the router at startup, the second left a warm-up running for ever
        # (issue 14, section 3).
        path = os.path.join(self.cache_dir, "heads.json")
        with open(path, "w") as f:
            f.write('{"heads": ' + "[" * 100_000 + "]" * 100_000 + "}")
        nested = b"[" * 100_000 + b"]" * 100_000
        upstream = FakeUpstream(self, [json_reply(message_json("ok")),
                                       raw_reply(b"200 OK\r\nContent-Type: application/json", nested)],
                                listing=LLAMA_LISTING)
        router = self.start(upstream)
        self.assertEqual(self.log.getvalue().count("warm-up: ignored"), 1)
        self.turn(first_turn())     # counted done: a warm-up may start
        self.assertTrue(router.warm("router start"))
        self.assertTrue(router.warmer.idle.wait(TIMEOUT))
        self.assertFalse(router.warmer.status()["running"])


################ Server

class ActivityTest(RouterTestCase):
    """What the log and /status say about the requests the router has answered."""

    LLAMA_IMAGE_ERROR = {"error": {"code": 500, "message": "image input is not supported - hint: "
                                   "if this is unexpected, you may need to provide the mmproj",
                                   "type": "server_error"}}

    def test_each_routed_request_logs_its_status_seconds_and_the_upstreams_message(self):
        upstream = FakeUpstream(self, [json_reply(self.LLAMA_IMAGE_ERROR, 500)])
        self.start(upstream)
        conn = self.connect()
        self.post(request(user(text("hi"))), conn=conn)
        self.post(request(user(text("hi"))), conn=conn)
        self.post({"messages": []}, conn=conn)
        self.call("GET", "/", conn=conn)    # one connection, one thread: the lines are written
        lines = self.log.lines()
        outcomes = [l for l in lines if l.startswith("← ")]
        self.assertEqual(len(outcomes), 3, lines)
        self.assertRegex(outcomes[0], r"^← 500 in \d+\.\d\d s: image input is not supported - "
                                      r"hint: if this is unexpected, you may need to provide the mmproj$")
        self.assertRegex(outcomes[1], r"^← 200 in \d+\.\d\d s$")
        self.assertRegex(outcomes[2], r"^← 400 in \d+\.\d\d s: messages: ")
        routed = [i for i, l in enumerate(lines) if l.startswith("→ coder [CODER]")]
        self.assertEqual(lines.index(outcomes[1]) - 2, routed[1])     # a usage line between

    def test_status_says_what_is_in_flight_what_came_last_and_what_failed(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        upstream = FakeUpstream(self, [stream_reply(text_events("slow"), gate=gate),
                                       json_reply(self.LLAMA_IMAGE_ERROR, 500)])
        self.start(upstream)
        conn = self.connect()
        conn.request("POST", "/v1/messages", json.dumps(request(user(text("go")), stream=True)))
        resp = conn.getresponse()
        self.assertIn(b"message_start", resp.read1(65536))
        status = self.call("GET", "/status")[2]
        self.assertEqual(status["in_flight"], 1)
        self.assertEqual({k: status["last_request"][k] for k in ("route", "model", "status")},
                         {"route": "coder", "model": "CODER", "status": None})
        gate.set()
        resp.read()
        self.post(request(user(image(PNG_A))), conn=conn)
        status = self.call("GET", "/status", conn=conn)[2]  # same connection: after the count
        self.assertEqual((status["in_flight"], status["routes"]),   # the coder answered for
                         (0, {"coder": 2, "vision": 1, "describe": 0}))  # the failed vision model
        self.assertEqual({k: status["last_request"][k] for k in ("route", "status")},
                         {"route": "coder", "status": 200})
        error = status["last_upstream_error"]
        self.assertEqual((error["message"], error["status"]),
                         (self.LLAMA_IMAGE_ERROR["error"]["message"], 500))
        time_pattern = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}$"
        self.assertRegex(error["time"], time_pattern)
        self.assertRegex(status["last_request"]["time"], time_pattern)
        self.assertIsInstance(status["uptime_s"], int)
        self.assertEqual(status["startup"]["upstream_reachable"], None)     # no check was run

    def test_every_log_line_has_a_time_and_each_line_of_a_request_its_id(self):
        # issue 16: lines of concurrent requests interleaved and could not be paired.
        gate = threading.Event()
        self.addCleanup(gate.set)
        upstream = FakeUpstream(self, [stream_reply(text_events("slow"), gate=gate)])
        self.start(upstream)
        slow = self.connect()
        slow.request("POST", "/v1/messages", json.dumps(request(user(text("slow")), stream=True)))
        resp = slow.getresponse()
        self.assertIn(b"message_start", resp.read1(65536))
        self.call("GET", "/status")                 # logs nothing, so it takes no id
        quick_done = self.log.when("← 200")         # its last line follows its answer
        self.post(request(user(text("quick"))))     # begins and ends inside the slow one
        self.assertTrue(quick_done.wait(TIMEOUT))
        gate.set()
        resp.read()
        self.call("GET", "/", conn=slow)    # one connection, one thread: its lines are written
        lines = self.log.getvalue().splitlines()
        for line in lines:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d #\d+ ")
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))   # local time
            self.assertLess(abs(stamp - time.time()), 60)
        ids = {}
        for line in lines:
            ids.setdefault(line.split()[2], []).append(cr_line(line))
        one = ["→ coder [CODER] 0.1 KB, first turn", "usage [CODER]: 5 prompt tokens, 0 of them "
                                                     "from the server's cache", "← 200 in s"]
        self.assertEqual(ids, {"#1": one, "#2": one})
        self.assertEqual(lines[0].split()[2], lines[-1].split()[2])   # slow's, around quick's
        self.assertNotEqual(lines[1].split()[2], lines[0].split()[2])


class StartupCheckTest(RouterTestCase):

    def test_a_port_in_use_is_an_oserror_that_main_can_explain(self):
        # The connection cap's state was set after binding, so on a port in use
        # server_close raised AttributeError, and main() printed a traceback instead of
        # "cannot listen on ...: Address already in use".
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with self.assertRaises(OSError):
                cr.Server(("127.0.0.1", taken.getsockname()[1]), cache_dir=self.cache_dir)

    def test_llama_server_without_mmproj_is_warned_about_and_status_says_so(self):
        router = self.start(FakeUpstream(self, listing=LLAMA_LISTING))
        lines = router.check_upstream()
        self.assertEqual(lines[:2], [
            "coder CODER (served by qwen2.5-coder-0.5b, the server's only model): loaded, "
            "32768-token context, text only",
            "vision VISION (served by qwen2.5-coder-0.5b, the server's only model): loaded, "
            "32768-token context, text only"])
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[2].startswith("! vision model qwen2.5-coder-0.5b cannot see images"))
        self.assertIn("llama-server with --mmproj", lines[2])
        status = self.call("GET", "/status")[2]
        self.assertEqual((status["vision"]["vision"], status["vision"]["server"],
                          status["coder"]["context_length"]), (False, "llama.cpp", 32768))
        self.assertEqual(status["startup"], {"upstream_reachable": True, "problems": [l[2:] for l in lines[2:]]})

    def test_llama_server_with_mmproj_has_nothing_to_say(self):
        router = self.start(FakeUpstream(self, listing=llama_listing(vision=True)))
        lines = router.check_upstream()
        self.assertEqual([l for l in lines if l.startswith("!")], [])
        self.assertTrue(lines[1].endswith("sees images"), lines)

    def test_missing_model_lists_what_the_server_has(self):
        router = self.start(FakeUpstream(self, listing={"models": [
            {"key": "qwen/other", "loaded_instances": [{"id": "qwen/other"}]},
            {"key": "VISION", "capabilities": {"vision": True},
             "loaded_instances": [{"id": "VISION", "config": {"context_length": 32768}}]}]}))
        lines = router.check_upstream()
        self.assertIn("coder CODER: not on the server", lines)
        self.assertIn("vision VISION: loaded, 32768-token context, sees images", lines)
        self.assertIn("! coder model CODER is not on the lmstudio server, which has: VISION, "
                      "qwen/other. Fix: lms get CODER, or set --coder-model to one of those", lines)

    def test_unreachable_upstream_is_said_and_kept_for_status(self):
        port = refused_port(self)
        router = self.start("http://127.0.0.1:%d" % port)
        lines = router.check_upstream()
        self.assertEqual(lines, ["! upstream http://127.0.0.1:%d is not reachable yet; requests "
                                 "get 529 until it is" % port])
        self.assertEqual(router.status()["startup"]["upstream_reachable"], False)

    def test_a_slow_model_listing_never_delays_a_client_request(self):
        # issue 11: the model-list refresh ran inside the request that found the list stale,
        # so a listing that never answered held that request for the whole listing timeout.
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        self.start(upstream, models_ttl=0)      # every request finds the list stale
        gate = threading.Event()
        self.addCleanup(gate.set)
        upstream.listing_gate = gate
        conn = self.connect()
        for _ in range(2):      # the second goes on a new connection, not behind the refresh
            status, headers, reply = self.post(request(user(text("hi"))), conn=conn)
            self.assertEqual((status, reply["content"]), (200, [text("ok")]))
        self.assertEqual(headers["Connection"], "close")
        self.assertEqual(self.call("GET", "/status")[2]["coder"]["context_length"], 32768)
        gate.set()

    def test_preload_loads_only_the_missing_model(self):
        upstream = FakeUpstream(self, listing={"models": [
            {"key": "CODER", "loaded_instances": []},
            {"key": "VISION", "capabilities": {"vision": True},
             "loaded_instances": [{"id": "VISION", "config": {"context_length": 32768}}]}]})
        router = self.start(upstream)
        router.known_models()
        self.assertEqual(router.preload(), ["preload CODER: loaded"])
        self.assertEqual(upstream.posts("/api/v1/models/load"), [{"model": "CODER"}])

    def test_a_server_that_wants_a_key_is_said_at_startup(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        upstream.key = "k"
        for key, said in (("", "needs a key (--upstream-key or CLAUDE_ROUTER_UPSTREAM_KEY)"),
                          ("wrong", "needs another key (--upstream-key)")):
            with self.subTest(key=key):
                lines = self.start(upstream, upstream_key=key).check_upstream()
                self.assertEqual(lines, ["! upstream %s refused the model list: it %s"
                                         % (upstream.url, said)])


################ Status line and stopping

class StatusLineTest(RouterTestCase):
    """python3 claude_router.py --statusline, run for real as Claude Code runs it; where a
    test asks for several lines and only their words matter, statusline() in this process
    (each Python start costs a loaded machine about half a second)."""

    def statusline(self, port, token="", as_module=False):
        """Run --statusline for port, as a script; as_module, imported (as claude-local has
        Claude Code run it), one Python start with no compile of the file."""
        script = os.path.join(os.path.dirname(os.path.abspath(cr.__file__)), "claude_router.py")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CLAUDE_ROUTER_PORT": str(port),
               "CLAUDE_ROUTER_TOKEN": token, "CLAUDE_ROUTER_CACHE_DIR": self.cache_dir}
        run = ["-m", "claude_router"] if as_module else [script]
        return subprocess.run([sys.executable, *run, "--statusline"], env=env, input="{}",
                              cwd=os.path.dirname(script) if as_module else None,
                              capture_output=True, text=True, timeout=TIMEOUT)

    def test_status_line_from_a_status_document(self):
        base = {"coder": {"model": "qwen/coder"}, "in_flight": 0}
        rows = [("nothing yet", {}, "router: coder qwen/coder"),
                ("after a coder turn", {"last_request": {"route": "coder", "model": "qwen/coder",
                                                         "status": 200, "seconds": 2.64},
                                        "prompt_cache": {"qwen/coder": {"last_turn": {
                                            "input_tokens": 13, "cache_read_input_tokens": 11656}}}},
                 "router: coder qwen/coder · last: coder 2.6 s · prompt: 11.7k cached, 13 new"),
                ("a failed vision turn", {"last_request": {"route": "vision", "model": "dev/v",
                                                           "status": 500, "seconds": 0.2}},
                 "router: coder qwen/coder · last: vision dev/v (500) 0.2 s"),
                ("a server that reports no cache", {"last_request": {"route": "coder",
                                                                     "model": "qwen/coder"},
                                                    "prompt_cache": {"qwen/coder": {"last_turn": {
                                                        "input_tokens": 950}}}},
                 "router: coder qwen/coder · last: coder · prompt: 950 tokens"),
                ("working", {"in_flight": 2, "last_request": {"route": "coder"}, "turns": [
                    {"seconds": 3.9}, {"seconds": 12.7}]},
                 "router: coder qwen/coder · working 12 s"),
                ("a router from before turns", {"in_flight": 1, "last_request": {"route": "coder"}},
                 "router: coder qwen/coder · working"),
                ("the client hung up, the router has not seen it yet", {
                    "in_flight": 1, "last_request": {"id": 7, "route": "coder", "seconds": None},
                    "turns": [{"id": 7, "seconds": 40.2, "client_left": True}]},
                 "router: coder qwen/coder · last: coder interrupted"),
                ("the client hung up", {"last_request": {"id": 7, "route": "coder", "status": None,
                                                         "seconds": 0.94, "left": True},
                                        "turns": []},
                 "router: coder qwen/coder · last: coder interrupted after 0.9 s"),
                ("warming", {"warm_up": {"running": True}, "turns": [],
                             "last_request": {"route": "coder", "status": 200, "seconds": 2.0}},
                 "router: coder qwen/coder · warming"),
                ("served by llama-server's one model", {"coder": {"model": "c", "served_by": "q05"}},
                 "router: coder q05"),
                ("startup problems", {"startup": {"problems": [
                    "upstream http://h:1 is not reachable yet; requests get 529 until it is",
                    "vision model v cannot see images. Fix: ..."]}},
                 "router: coder qwen/coder · ! upstream http://h:1 is not reachable yet (+1 more)")]
        for name, status, line in rows:
            with self.subTest(name):
                self.assertEqual(cr.status_line({**base, **status}), line)
        self.assertEqual(cr.status_line({"coder": "junk", "last_request": [], "prompt_cache": 5}),
                         "router: coder ?")

    def test_a_status_document_of_odd_values_is_read_as_far_as_it_can_be(self):
        # What answers on the port may be another router's version, or not a router: an
        # Infinity or NaN of seconds (json.loads takes both) and a list as the last
        # model were an OverflowError, a ValueError and a TypeError, so Claude Code showed
        # a traceback for a status line.
        base = {"coder": {"model": "c"}}
        rows = [("infinite seconds", {"turns": [{"seconds": float("inf")}]}, "router: coder c"),
                ("NaN seconds", {"turns": [{"seconds": float("nan")}], "last_request": {
                    "route": "coder", "seconds": float("nan")}}, "router: coder c · last: coder"),
                ("a list as the model", {"last_request": {"route": "vision", "model": ["v"]},
                                         "prompt_cache": {"v": {}}},
                 "router: coder c · last: vision ['v']"),
                ("a list as the route", {"last_request": {"route": ["coder"]}}, "router: coder c"),
                ("seconds past any turn", {"turns": [{"seconds": 1e300}]}, "router: coder c"),
                ("a list as the last request", {"last_request": [1]}, "router: coder c"),
                ("a string as the last request", {"last_request": "coder"}, "router: coder c"),
                ("a list as the last turn's figures", {
                    "last_request": {"route": "coder", "model": "c"},
                    "prompt_cache": {"c": {"last_turn": [1]}}}, "router: coder c · last: coder"),
                ("a number as the problems", {"startup": {"problems": 5}}, "router: coder c"),
                ("a string as the problems", {"startup": {"problems": "abc"}}, "router: coder c")]
        for name, status, line in rows:
            with self.subTest(name):
                self.assertEqual(cr.status_line({**base, **status}), line)

    def test_reads_the_running_router(self):
        upstream = FakeUpstream(self, listing=LLAMA_LISTING)
        router = self.start(upstream, token="t0k")
        conn = self.connect()
        self.post(request(user(text("hi"))), headers={"x-api-key": "t0k"}, conn=conn)
        self.call("GET", "/", headers={"x-api-key": "t0k"}, conn=conn)    # the request is counted
        done = self.statusline(router.server_port, "t0k", as_module=True)
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertRegex(done.stdout, r"^router: coder qwen2.5-coder-0.5b · last: coder \d+\.\d s · "
                                      r"prompt: 5 tokens\n$")
        self.assertIn("set CLAUDE_ROUTER_TOKEN", self.statusline(router.server_port).stdout)
        self.assertEqual(os.listdir(self.cache_dir), [])

    def test_working_while_a_turn_is_in_flight_and_not_once_its_client_hangs_up(self):
        # issue 16: the status line never said working during a cold turn, then stayed on it
        # after Esc; and a turn the client left read as one that had succeeded.
        arrived = threading.Event()
        stall = threading.Event()
        self.addCleanup(stall.set)

        def silent(handler):        # a model reading a long prompt: nothing comes back yet
            arrived.set()
            handler.close_connection = True
            stall.wait(TIMEOUT)
        upstream = FakeUpstream(self, [silent])
        router = self.start(upstream)
        sock = self.post_raw(request(user(text("go")), stream=True))
        self.assertTrue(arrived.wait(TIMEOUT))
        environ = {"CLAUDE_ROUTER_PORT": str(router.server_port)}
        self.assertRegex(cr.statusline(environ), r"^router: coder CODER · working \d+ s$")
        ended = self.log.when("← no answer in")
        sock.close()                # Esc
        self.assertNotIn("working", cr.statusline(environ))
        self.assertTrue(ended.wait(TIMEOUT))
        self.assertRegex(cr.statusline(environ),
                         r"^router: coder CODER · last: coder interrupted after \d+\.\d s$")

    def test_with_no_router_it_says_so_and_exits_0(self):
        port = refused_port(self)
        done = self.statusline(port)
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, "router: none on :%d\n" % port, ""))

    def test_a_router_that_trickles_its_answer_is_given_up_on_within_a_second(self):
        # Each byte came before the per-read timeout, so the status line waited for as long
        # as the answer trickled in; the README promises a second (issue 14, section 4).
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        done = threading.Event()
        self.addCleanup(done.set)

        def trickle():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                while not done.wait(0.05):      # the pace: a byte every 0.05 s, for the test
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        return
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        port = listener.getsockname()[1]
        started = time.monotonic()
        self.assertEqual(cr.statusline({"CLAUDE_ROUTER_PORT": str(port)}), "router: none on :%d" % port)
        self.assertLess(time.monotonic() - started, 2.5)       # it took 5 s (the trickle's end)
        self.assertLessEqual(cr.STATUSLINE_TIMEOUT, 1.0)


class StopTest(RouterTestCase):
    """python3 claude_router.py --stop, against routers run as their own processes."""

    def script(self):
        return os.path.join(os.path.dirname(os.path.abspath(cr.__file__)), "claude_router.py")

    def stop(self, port, token="", as_module=False):
        """Run the router's --stop for port, as a script; as_module, as -m claude_router (one
        Python start that reads the compiled module, where a script is compiled each run)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CLAUDE_ROUTER_PORT": str(port),
               "CLAUDE_ROUTER_TOKEN": token, "HOME": self.cache_dir}
        run = ["-m", "claude_router"] if as_module else [self.script()]
        return subprocess.run([sys.executable, *run, "--stop"], env=env,
                              cwd=os.path.dirname(self.script()) if as_module else None,
                              capture_output=True, text=True, timeout=cr.STOP_TIMEOUT + TIMEOUT)

    def test_a_copy_under_another_name_serves_and_ends_on_sigterm(self):
        # Run as a script, the router starts itself again as a module, by its file's path:
        # "import claude_router" found no router named otherwise, and exited at start.
        self.check_copy_serves("my-router.py")

    def test_a_copy_named_without_py_serves(self):
        # ~/bin/claude-router: a name with no .py found no loader and exited at start; and
        # the interpreter's options, which the re-start keeps, come before its -c.
        self.check_copy_serves("claude-router", ["-X", "utf8", "-W", "ignore"])

    def check_copy_serves(self, name, options=()):
        """Run a copy of the router named name; check it serves and --stop ends it with 0."""
        copy = os.path.join(self.cache_dir, name)
        shutil.copy(self.script(), copy)
        proc, port = router_process(self, script=copy, options=options)
        # --stop finds it by its re-start as a module: it signalled only a file named
        # claude_router.py, and said a copy at ~/bin/claude-router was "not a claude_router.py"
        self.assertEqual(cr.stop_router(port, ""), (cr.STOPPED, "stopped the router on :%d (pid "
                         "%d; upstream http://127.0.0.1:9, coder %s)" % (port, proc.pid,
                                                                         cr.CODER_MODEL)))
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertIn("bye", proc.stderr.read())

    def test_a_program_merely_named_claude_router_is_not_signalled(self):
        # It answers /status as a router would, naming its own pid.
        program = os.path.join(self.cache_dir, "claude-router")
        with open(program, "w") as f:
            f.write("import http.server, json, os\n"
                    "class H(http.server.BaseHTTPRequestHandler):\n"
                    "    def do_GET(self):\n"
                    "        body = json.dumps({'pid': os.getpid(), 'coder': {}}).encode()\n"
                    "        self.send_response(200)\n"
                    "        self.send_header('Content-Length', str(len(body)))\n"
                    "        self.end_headers()\n"
                    "        self.wfile.write(body)\n"
                    "    def log_message(self, *args):\n"
                    "        pass\n"
                    "server = http.server.HTTPServer(('127.0.0.1', 0), H)\n"
                    "print(server.server_address[1], flush=True)\n"
                    "server.serve_forever()\n")
        proc = subprocess.Popen([sys.executable, program], stdout=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait, TIMEOUT)
        self.addCleanup(proc.kill)
        port = int(proc.stdout.readline())
        self.assertEqual(cr.stop_router(port, ""), (cr.LEFT_RUNNING, (
            "the router on :%d says it is process %d, which is not a claude-router here "
            "(another machine, container or user?); not stopped" % (port, proc.pid))))
        self.assertIsNone(proc.poll())

    def test_a_router_that_stops_answering_after_sigterm_is_not_taken_for_stopped(self):
        # A /status that timed out after SIGTERM counted as "stopped": a router stopped with
        # Ctrl-Z (SIGTERM waits for it to go on) holds its port, answers nothing, and runs on.
        proc, port = router_process(self, as_module=True)
        status, document = cr.fetch_status(port, "", TIMEOUT)
        os.kill(proc.pid, signal.SIGSTOP)       # (the cleanup's SIGKILL ends it stopped too)
        self.assertEqual(cr.stop_answering(port, "", status, document, wait=0.2), (
            cr.LEFT_RUNNING, "sent SIGTERM to the router on :%d (pid %d), but it is still there"
            % (port, proc.pid)))
        os.kill(proc.pid, signal.SIGCONT)       # the SIGTERM it was sent ends it now
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_the_start_as_a_module_keeps_the_interpreters_options(self):
        # Started again as a module, the router lost -X, -W, -I and -O: a router run with
        # -W error or -I ran without them.
        options = ["-I", "-X", "claude_router_test=1", "-W", "error::ResourceWarning"]
        proc, port = router_process(self, options=options)
        self.assertEqual(cr.fetch_status(port, "", TIMEOUT)[0], 200)
        args = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(proc.pid)],
                              capture_output=True, text=True, timeout=TIMEOUT).stdout
        self.assertIn(" ".join([sys.executable, *options, "-c"]), args)
        self.assertIn("claude_router.py --port 0 --upstream", args)     # as it was given
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_stops_the_router_on_the_port_which_exits_0(self):
        # Not port 0: the port let go is asked again, and no other server may take it meanwhile.
        proc, port = router_process(self, unused_port())
        done = self.stop(port)
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout, "claude-router: stopped the router on :%d (pid %d; upstream "
                                      "http://127.0.0.1:9, coder %s)\n" % (port, proc.pid,
                                                                          cr.CODER_MODEL))
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertIn("bye", proc.stderr.read())
        done = self.stop(port)
        self.assertEqual((done.returncode, done.stderr), (1, "claude-router: no router answers on "
                                                             ":%d; nothing to stop\n" % port))

    def test_what_is_not_ours_is_left_running_with_a_clear_message(self):
        upstream = FakeUpstream(self)
        in_process = self.start(upstream)      # its /status names this test's own process
        guarded = self.start(upstream, token="sekret")
        rows = [(upstream.server.server_address[1], "", cr.NOTHING_TO_STOP,
                 "what answers on :%d is not claude-router (HTTP 404 to /status); not stopped"),
                (in_process.server_port, "", cr.LEFT_RUNNING, "the router on :%d says it is "
                 "process %d, which is not a claude-router here (another machine, container or "
                 "user?); not stopped"),
                (guarded.server_port, "", cr.LEFT_RUNNING, "the router on :%d wants its token: "
                                                           "set CLAUDE_ROUTER_TOKEN to its --token"),
                (guarded.server_port, "sekret", cr.LEFT_RUNNING, "the router on :%d says it is "
                 "process %d, which is not a claude-router here (another machine, container or "
                 "user?); not stopped")]
        for port, token, code, said in rows:
            with self.subTest(said=said):
                done = self.stop(port, token, as_module=True)
                self.assertEqual((done.returncode, done.stdout), (code, ""))
                expected = said % ((port, os.getpid()) if "process" in said else port)
                self.assertEqual(done.stderr, "claude-router: %s\n" % expected)
        self.assertEqual(self.call("GET", "/status", conn=self.connect(in_process))[0], 200)


    def test_a_port_held_by_what_never_answers_is_not_nothing_to_stop(self):
        # A router stopped with Ctrl-Z before --stop looks: its /status timed out, and --stop
        # said "no router answers; nothing to stop" of a port still held.
        listener = socket.create_server(("127.0.0.1", 0))      # listens, never answers
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        self.assertEqual(cr.stop_router(port, "", look=0.2), (cr.LEFT_RUNNING, (
            "what holds :%d gave no answer to /status in time (a router stopped with Ctrl-Z, "
            "or too busy?); not stopped" % port)))
        listener.close()
        self.assertEqual(cr.stop_router(port, "", look=0.2), (
            cr.NOTHING_TO_STOP, "no router answers on :%d; nothing to stop" % port))

    def test_a_router_that_answers_later_than_the_status_lines_second_is_still_found(self):
        # Under load a router's /status came after the status line's second: --stop said
        # "nothing to stop" and left it running, and claude-local started a second router.
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        document = json.dumps({"pid": os.getpid(), "coder": {"model": "CODER"}}).encode()

        def answer_late():
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                conn.recv(65536)
                # Past the status line's deadline, unless the client hangs up before.
                hung_up, _, _ = select.select([conn], [], [], cr.STATUSLINE_TIMEOUT + 0.2)
                if not hung_up:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(document), document))
        thread = threading.Thread(target=answer_late, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        port = listener.getsockname()[1]
        self.assertEqual(cr.stop_router(port, ""), (cr.LEFT_RUNNING, (
            "the router on :%d says it is process %d, which is not a claude-router here "
            "(another machine, container or user?); not stopped" % (port, os.getpid()))))
        self.assertGreaterEqual(cr.STATUS_TIMEOUT, 2 * cr.STATUSLINE_TIMEOUT)


################ Main

class SettingsTest(unittest.TestCase):

    def parse(self, argv, environ=None):
        return cr.parse_settings(argv, environ or {})

    def test_precedence_flag_over_environment_over_constant(self):
        self.assertEqual(self.parse([]).port, cr.PORT)
        self.assertEqual(self.parse([], {"CLAUDE_ROUTER_PORT": "4000"}).port, 4000)
        self.assertEqual(self.parse(["--port", "5000"], {"CLAUDE_ROUTER_PORT": "4000"}).port, 5000)
        env = {"CLAUDE_ROUTER_CODER_MODEL": "c", "CLAUDE_ROUTER_VISION_MODEL": "v",
               "CLAUDE_ROUTER_UPSTREAM": "http://127.0.0.1:9/", "CLAUDE_ROUTER_CACHE_DIR": "/d",
               "CLAUDE_ROUTER_VISION_MODE": "describe", "CLAUDE_ROUTER_VERBOSE": "1"}
        args = self.parse([], env)
        self.assertEqual((args.coder_model, args.vision_model, args.upstream, args.cache_dir,
                          args.vision_mode, args.verbose),
                         ("c", "v", "http://127.0.0.1:9", "/d", "describe", True))

    def test_bad_values_exit_with_one_line(self):
        rows = [(["--port", "x"], {}), ([], {"CLAUDE_ROUTER_PORT": "http"}),
                (["--upstream", "ftp://h"], {}), ([], {"CLAUDE_ROUTER_UPSTREAM": "localhost:1234"}),
                ([], {"CLAUDE_ROUTER_VERBOSE": "maybe"}), ([], {"CLAUDE_ROUTER_VISION_MODE": "x"}),
                (["--host", "0.0.0.0"], {}), ([], {"CLAUDE_ROUTER_UPSTREAM_KEY": "s3cr et"}),
                (["--upstream-key", "k\r\nX-Evil: 1"], {}),
                ([], {"CLAUDE_ROUTER_TOKEN": "p\u00e4sswort"}), (["--token", "two words"], {})]
        for argv, environ in rows:
            with self.subTest(argv=argv, environ=environ):
                err = io.StringIO()
                with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stderr(err):
                    self.parse(argv, environ)
                message = str(ctx.exception.code) + err.getvalue()
                self.assertTrue(message.startswith("claude-router: "), message)
                self.assertEqual(message.strip().count("\n"), 0, message)
                self.assertNotIn("s3cr", message)

    def test_other_hosts_need_a_token(self):
        self.assertEqual(self.parse(["--host", "0.0.0.0", "--token", "t"]).token, "t")


class LauncherTest(RouterTestCase):
    """claude-local, run for real with a stand-in `claude` that prints what it was given."""

    # The stand-in's one request, sent as Claude Code would, to where claude-local points it.
    ASK = ("import http.client, json, os, urllib.parse\n"
           "url = urllib.parse.urlsplit(os.environ['ANTHROPIC_BASE_URL'])\n"
           "conn = http.client.HTTPConnection(url.hostname, url.port, timeout=%d)\n"
           "conn.request('POST', '/v1/messages', json.dumps({'model': 'claude-x', 'max_tokens': 9,"
           " 'messages': [{'role': 'user', 'content': 'hi'}]}), {'x-api-key': "
           "os.environ['ANTHROPIC_AUTH_TOKEN'], 'Content-Type': 'application/json'})\n"
           "print('reply:', conn.getresponse().status)\n" % TIMEOUT)

    def run_launcher(self, port, path_dirs, extra_env=None, args=("-p", "say hi"), cwd=None,
                     asks=False, launcher=None):
        """Run claude-local with a stand-in claude that prints its environment and arguments
        (and, when asks, sends one request); with the settings of self.router, if one runs."""
        bin_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, bin_dir, True)
        with open(os.path.join(bin_dir, "claude"), "w") as f:
            f.write("#!/bin/sh\nenv | grep -E '^(ANTHROPIC|CLAUDE_CODE)' | sort\necho \"args: $*\"\n")
            if asks:
                f.write("exec '%s' -c \"%s\"\n" % (sys.executable, self.ASK))
        os.chmod(os.path.join(bin_dir, "claude"), 0o755)
        router = getattr(self, "router", None)
        env = {"PATH": ":".join(([bin_dir] if "claude" in path_dirs else []) + ["/usr/bin", "/bin",
                                os.path.dirname(os.path.realpath(sys.executable))]),
               "HOME": self.cache_dir, "CLAUDE_ROUTER_PORT": str(port),
               "CLAUDE_ROUTER_CACHE_DIR": self.cache_dir, "ANTHROPIC_API_KEY": "sk-real-key",
               # No spare ports unless a test wants them: --stop stops any claude-router on
               # a spare port, which may be another suite's, and runs a process for each.
               "CLAUDE_LOCAL_PORTS": "0",
               **({"CLAUDE_ROUTER_UPSTREAM": router.upstream_url,
                   "CLAUDE_ROUTER_CODER_MODEL": router.coder_model,
                   "CLAUDE_ROUTER_VISION_MODEL": router.vision_model or "none"} if router else {}),
               **(extra_env or {})}
        launcher = launcher or os.path.join(os.path.dirname(os.path.abspath(cr.__file__)),
                                            "claude-local")
        proc = self.popen_in_group(["bash", launcher, *args], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=cwd or self.cache_dir)
        out, err = proc.communicate(timeout=TIMEOUT * 3)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def popen_in_group(self, command, **given):
        """Start command in a process group of its own, which the test kills when it ends.

        The router claude-local starts (nohup, in the background) stays in that group after
        claude-local exits: killing the group ends it even when the test failed before it
        learned the router's pid, so no test leaves a router running."""
        proc = subprocess.Popen(command, start_new_session=True, text=True, **given)
        def kill_group():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=TIMEOUT)
        self.addCleanup(kill_group)
        return proc

    def settings_given(self, done):
        """The JSON claude-local passed to claude with --settings, or None; and the other args
        (past the permission mode it passes when the user chose none)."""
        args = [l for l in done.stdout.splitlines() if l.startswith("args: ")][0][6:]
        args = args[len("--permission-mode default "):] \
            if args.startswith("--permission-mode default ") else args
        if not args.startswith("--settings "):
            return None, args
        settings, end = json.JSONDecoder().raw_decode(args[len("--settings "):])
        return settings, args[len("--settings ") + end:].strip()

    def test_reuses_a_running_router_and_sets_the_environment(self):
        upstream = FakeUpstream(self, listing={"data": [{"id": "CODER", "meta": {"n_ctx": 16384}}]})
        router = self.start(upstream)
        done = self.run_launcher(router.server_port, ["claude"])
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout.splitlines()[:-1], [
            "ANTHROPIC_AUTH_TOKEN=lmstudio",
            "ANTHROPIC_BASE_URL=http://127.0.0.1:%d" % router.server_port,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            "CLAUDE_CODE_GATEWAY_HINT_HEADERS=1",
            "CLAUDE_CODE_MAX_CONTEXT_TOKENS=16384",
            "CLAUDE_CODE_TOTAL_TOKENS_REMINDER=off"])
        settings, rest = self.settings_given(done)
        self.assertEqual(rest, "-p say hi")
        self.assertEqual(settings["statusLine"]["type"], "command")
        # Claude Code re-runs it only when its messages change, unless told to every N seconds.
        self.assertEqual(settings["statusLine"]["refreshInterval"], 2)
        line = subprocess.run(settings["statusLine"]["command"], shell=True, capture_output=True,
                              text=True, timeout=TIMEOUT, env={
                                  "PATH": os.environ["PATH"],
                                  "CLAUDE_ROUTER_PORT": str(router.server_port)})
        self.assertEqual(line.stdout, "router: coder CODER\n")

    def test_a_router_that_wants_another_token_is_named_not_started_again(self):
        router = self.start(FakeUpstream(self), token="sekret")
        done = self.run_launcher(router.server_port, ["claude"])
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertEqual(done.stderr, "claude-local: the router on :%d wants its token: set "
                                      "CLAUDE_ROUTER_TOKEN to its --token\n" % router.server_port)
        done = self.run_launcher(router.server_port, ["claude"], {"CLAUDE_ROUTER_TOKEN": "sekret"})
        self.assertEqual((done.returncode, done.stderr), (0, ""))

    def test_a_status_line_of_the_users_own_is_left_alone(self):
        router = self.start(FakeUpstream(self))
        project = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, project, True)
        rows = [(".claude/settings.json", self.cache_dir), (".claude/settings.json", project),
                (".claude/settings.local.json", project)]
        for path, where in rows:
            with self.subTest(path=path, where=where):
                os.makedirs(os.path.join(where, ".claude"), exist_ok=True)
                with open(os.path.join(where, path), "w") as f:
                    json.dump({"statusLine": {"type": "command", "command": "mine"}}, f)
                done = self.run_launcher(router.server_port, ["claude"], cwd=project)
                self.assertEqual(self.settings_given(done), (None, "-p say hi"))
                os.remove(os.path.join(where, path))
        done = self.run_launcher(router.server_port, ["claude"], args=("--settings", "{}"))
        self.assertIn("args: --permission-mode default --settings {}\n", done.stdout)  # theirs only

    def test_a_router_it_starts_tells_its_problems_and_log_before_claude_starts(self):
        dead = refused_port(self)
        port = unused_port()
        done = self.run_launcher(port, ["claude"],
                                 {"CLAUDE_ROUTER_UPSTREAM": "http://127.0.0.1:%d" % dead})
        status = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            "http://127.0.0.1:%d/status" % port, timeout=TIMEOUT).read())
        os.kill(status["pid"], signal.SIGTERM)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr.splitlines(), [
            "claude-local: the router found problems (its log: %s/router.log):" % self.cache_dir,
            "  upstream http://127.0.0.1:%d is not reachable yet; requests get 529 until it is"
            % dead])
        self.assertIn("args: ", done.stdout)

    def test_users_context_and_reminder_settings_win(self):
        router = self.start(FakeUpstream(self, listing={"data": [{"id": "CODER", "meta": {"n_ctx": 8}}]}))
        done = self.run_launcher(router.server_port, ["claude"],
                                 {"CLAUDE_CODE_MAX_CONTEXT_TOKENS": "99",
                                  "CLAUDE_CODE_TOTAL_TOKENS_REMINDER": "padded-countdown",
                                  "CLAUDE_CODE_GATEWAY_HINT_HEADERS": "0"})
        self.assertIn("CLAUDE_CODE_GATEWAY_HINT_HEADERS=0", done.stdout)
        self.assertIn("CLAUDE_CODE_MAX_CONTEXT_TOKENS=99", done.stdout)
        self.assertIn("CLAUDE_CODE_TOTAL_TOKENS_REMINDER=padded-countdown", done.stdout)

    def test_starts_a_router_when_none_answers(self):
        upstream = FakeUpstream(self)
        port = unused_port()
        done = self.run_launcher(port, ["claude"], {"CLAUDE_ROUTER_UPSTREAM": upstream.url})
        status = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            "http://127.0.0.1:%d/status" % port, timeout=TIMEOUT).read())
        os.kill(status["pid"], signal.SIGTERM)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("ANTHROPIC_BASE_URL=http://127.0.0.1:%d" % port, done.stdout)
        self.assertEqual(status["upstream"], upstream.url)
        with open(os.path.join(self.cache_dir, "router.log")) as f:
            self.assertIn("claude-router on :%d" % port, f.read())

    def test_an_interactive_user_reads_the_problems_before_claude_clears_the_screen_once(self):
        port = unused_port()
        bin_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, bin_dir, True)
        with open(os.path.join(bin_dir, "claude"), "w") as f:
            f.write("#!/bin/sh\necho claude started\n")
        os.chmod(os.path.join(bin_dir, "claude"), 0o755)
        env = {"PATH": bin_dir + ":" + os.environ["PATH"], "HOME": self.cache_dir,
               "CLAUDE_ROUTER_PORT": str(port), "CLAUDE_ROUTER_CACHE_DIR": self.cache_dir,
               "CLAUDE_ROUTER_UPSTREAM": "http://127.0.0.1:9", "CLAUDE_LOCAL_PORTS": "0"}
        launcher = os.path.join(os.path.dirname(os.path.abspath(cr.__file__)), "claude-local")
        for run in ("first", "again"):
            master, slave = pty.openpty()
            self.addCleanup(os.close, master)
            proc = self.popen_in_group(["bash", launcher], stdin=slave, stderr=slave,
                                       stdout=subprocess.PIPE, env=env, cwd=self.cache_dir)
            os.close(slave)
            shown = b""
            while b"Press Enter" not in shown and b"not reachable yet" not in shown:
                ready, _, _ = select.select([master], [], [], TIMEOUT * 3)   # it starts a router
                self.assertTrue(ready, shown)
                shown += os.read(master, 4096)
            if run == "first":
                while b"Press Enter" not in shown:
                    ready, _, _ = select.select([master], [], [], TIMEOUT)
                    self.assertTrue(ready, shown)
                    shown += os.read(master, 4096)
                self.assertIsNone(proc.poll())         # claude waits for the user
                os.write(master, b"\n")
            self.assertEqual(proc.communicate(timeout=TIMEOUT)[0], "claude started\n")
            stop = subprocess.run(["bash", launcher, "--stop"], env=env, capture_output=True,
                                  text=True, timeout=cr.STOP_TIMEOUT + TIMEOUT)
            # Once in about 60 loaded runs the router was "still there" 10 s after SIGTERM;
            # its log says whether it got as far as "bye".
            with open(os.path.join(self.cache_dir, "router.log")) as f:
                self.assertEqual(stop.returncode, 0, stop.stderr + "router.log:\n" + f.read())
        self.assertNotIn(b"Press Enter", shown)     # a problem it was paused for once

    def status_of(self, port):
        """The /status document of the router on port."""
        return json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            "http://127.0.0.1:%d/status" % port, timeout=TIMEOUT).read())

    def test_a_router_with_other_settings_is_not_reused_and_the_users_settings_run(self):
        # issue 16: a router started with the defaults answered on the port, claude-local
        # reused it without a word, and every request failed on the wrong upstream.
        theirs = FakeUpstream(self)
        router = self.start(theirs)
        mine = FakeUpstream(self)
        port = router.server_port
        wanted = {"CLAUDE_ROUTER_UPSTREAM": mine.url, "CLAUDE_ROUTER_CODER_MODEL": "MINE",
                  "CLAUDE_ROUTER_SIDE_MODEL": "SIDE"}
        # As many spares as by default: loopback connections hold runs of ports next to one
        # another, and with 3 all were taken once ("no free port").
        wanted["CLAUDE_LOCAL_PORTS"] = "10"
        done = self.run_launcher(port, ["claude"], wanted, asks=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        # The next free port: port + 1, unless something else holds that one.
        spare = int(re.search(r"ANTHROPIC_BASE_URL=http://127.0.0.1:(\d+)", done.stdout)[1])
        started = self.status_of(spare)
        self.assertEqual((started["upstream"], started["coder"]["model"]), (mine.url, "MINE"))
        self.assertEqual(done.stderr.splitlines(), [
            "claude-local: the router on :%d runs with other settings than yours:" % port,
            "  upstream %s (yours: %s)" % (theirs.url, mine.url),
            "  vision upstream %s (yours: %s)" % (theirs.url, mine.url),
            "  coder model CODER (yours: MINE)",
            "  side model none (yours: SIDE on %s)" % mine.url,
            "claude-local: This session starts a router with yours on :%d (its log: %s/router-%d"
            ".log)." % (spare, self.cache_dir, spare),
            "claude-local: To have yours on :%d, stop that one first: claude-local --stop" % port])
        self.assertIn("reply: 200\n", done.stdout)
        # A request without tools is a side request, so it goes to the side model the user named.
        self.assertEqual(([b["model"] for b in mine.posts()], theirs.posts()), (["SIDE"], []))
        again = self.run_launcher(port, ["claude"], wanted, asks=True)      # reused, and said
        self.assertIn("claude-local: This session uses the router with yours already on :%d.\n"
                      % spare, again.stderr)
        self.assertEqual(([b["model"] for b in mine.posts()], theirs.posts()), (["SIDE"] * 2, []))
        stop = self.run_launcher(port, ["claude"], {"CLAUDE_LOCAL_PORTS": "10"}, args=("--stop",))
        # The one on :port is this test, not a router process: left running, and said.
        self.assertEqual(stop.returncode, cr.LEFT_RUNNING)
        self.assertIn("not a claude-router here", stop.stderr)
        self.assertEqual(stop.stdout, "claude-local: stopped the router on :%d (pid %d; upstream "
                                      "%s, coder MINE)\n" % (spare, started["pid"], mine.url))

    def test_stop_looks_at_each_port_once_and_its_status_says_what_happened(self):
        # It exited 1 when no router was on the base port, even after stopping a spare's.
        # A base port held refused, with the one after it free; both below the kernel's own
        # picks, so nothing takes the free one before the router does.
        base = refused_port(self, unused_port(2))
        proc, _ = router_process(self, base + 1, as_module=True)
        spares = {"CLAUDE_LOCAL_PORTS": "1"}
        stop = self.run_launcher(base, [], spares, args=("--stop",))
        self.assertEqual((stop.returncode, stop.stderr), (cr.STOPPED, ""))
        self.assertEqual(stop.stdout, "claude-local: stopped the router on :%d (pid %d; upstream "
                         "http://127.0.0.1:9, coder %s)\n" % (base + 1, proc.pid, cr.CODER_MODEL))
        self.assertEqual(proc.wait(TIMEOUT), 0)
        stop = self.run_launcher(base, [], spares, args=("--stop",))
        self.assertEqual((stop.returncode, stop.stdout, stop.stderr), (
            cr.NOTHING_TO_STOP, "", "claude-local: no router answers on :%d-%d; nothing to stop\n"
            % (base, base + 1)))

    def serve_status(self, document):
        """A server answering GET /status with document, as another program (or another
        version) on the port may; its port."""
        class Handler(NoLog, http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                send_json(self, 200, document)
        server = FakeServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return server.server_address[1]

    def test_a_context_length_that_is_no_number_is_not_passed_to_claude(self):
        # claude-local read /status with hand-written lookups that took any value: a string
        # became CLAUDE_CODE_MAX_CONTEXT_TOKENS.
        upstream = "http://127.0.0.1:9"
        port = self.serve_status({
            "pid": 1, "upstream": upstream, "vision_upstream": upstream,
            "vision_mode": cr.VISION_MODE, "vision": {"model": "VISION"},
            "coder": {"model": "CODER", "context_length": "99; rm -rf ~"}})
        done = self.run_launcher(port, ["claude"], {
            "CLAUDE_ROUTER_UPSTREAM": upstream, "CLAUDE_ROUTER_CODER_MODEL": "CODER",
            "CLAUDE_ROUTER_VISION_MODEL": "VISION"})
        self.assertEqual((done.returncode, done.stderr), (0, ""))      # reused
        self.assertIn("ANTHROPIC_BASE_URL=http://127.0.0.1:%d\n" % port, done.stdout)
        self.assertNotIn("CLAUDE_CODE_MAX_CONTEXT_TOKENS", done.stdout)

    def test_what_answers_on_the_port_is_shown_escaped(self):
        # The settings another server's /status named reached the terminal as they came:
        # an id can carry sequences that clear the screen or write the clipboard.
        port = self.serve_status({"pid": 1, "upstream": "\x1b]52;c;aGk=\x07http://x",
                                  "coder": {"model": "\x1b[2J\x9bCODER"}})
        mine = FakeUpstream(self)
        done = self.run_launcher(port, ["claude"], {
            "CLAUDE_ROUTER_UPSTREAM": mine.url, "CLAUDE_ROUTER_CODER_MODEL": "CODER",
            "CLAUDE_LOCAL_PORTS": "10"})
        self.assertEqual(done.returncode, 0, done.stderr)
        spare = int(re.search(r"ANTHROPIC_BASE_URL=http://127.0.0.1:(\d+)", done.stdout)[1])
        os.kill(self.status_of(spare)["pid"], signal.SIGTERM)
        self.assertEqual(done.stderr.splitlines()[:4], [
            "claude-local: the router on :%d runs with other settings than yours:" % port,
            "  upstream \\x1b]52;c;aGk=\\x07http://x (yours: %s)" % mine.url,
            "  vision upstream None (yours: %s)" % mine.url,
            "  coder model \\x1b[2J\\x9bCODER (yours: CODER)"])
        self.assertFalse(re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", done.stderr), done.stderr)

    def test_a_router_with_the_same_settings_is_reused_without_a_word(self):
        for vision_model, env in (("VISION", "VISION"), ("", "none"), ("", "")):
            with self.subTest(vision_model=vision_model, env=env):
                upstream = FakeUpstream(self)
                router = self.start(upstream, vision_model=vision_model)
                done = self.run_launcher(router.server_port, ["claude"],
                                         {"CLAUDE_ROUTER_VISION_MODEL": env}, asks=True)
                self.assertEqual((done.returncode, done.stderr), (0, ""))
                self.assertIn("reply: 200\n", done.stdout)
                self.assertEqual(len(upstream.posts()), 1)

    def test_asks_before_acting_unless_the_user_chose_a_permission_mode(self):
        # Auto mode's check runs on Anthropic's server, which no local router can answer.
        router = self.start(FakeUpstream(self))
        project = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, project, True)
        mode = {"permissions": {"defaultMode": "acceptEdits"}}
        rows = [("nobody chose", {}, (), None, True),
                ("a flag", {}, ("--permission-mode", "plan"), None, False),
                ("a flag with =", {}, ("--permission-mode=auto",), None, False),
                ("skip permissions", {}, ("--dangerously-skip-permissions",), None, False),
                ("allow skipping", {}, ("--allow-dangerously-skip-permissions",), None, False),
                ("user settings", {}, (), (self.cache_dir, ".claude/settings.json"), False),
                ("CLAUDE_CONFIG_DIR", {"CLAUDE_CONFIG_DIR": project}, (),
                 (project, "settings.json"), False),
                ("project settings", {}, (), (project, ".claude/settings.json"), False),
                ("local settings", {}, (), (project, ".claude/settings.local.json"), False),
                ("--settings", {}, ("--settings", json.dumps(mode)), None, False),
                ("the auto mode check's switch", {"CLAUDE_CODE_AUTO_MODE_SERVER": "0"}, (), None,
                 False),
                ("other settings", {}, (), (project, ".claude/settings.json"), True)]
        for name, env, args, where, passed in rows:
            with self.subTest(name):
                if where:
                    os.makedirs(os.path.dirname(os.path.join(*where)), exist_ok=True)
                    with open(os.path.join(*where), "w") as f:
                        json.dump(mode if passed is False else {"permissions": {}}, f)
                done = self.run_launcher(router.server_port, ["claude"], env,
                                         args=(*args, "-p", "hi"), cwd=project)
                given = [l for l in done.stdout.splitlines() if l.startswith("args: ")][0]
                self.assertEqual(given.startswith("args: --permission-mode default "), passed, given)
                self.assertTrue(given.endswith(" ".join((*args, "-p", "hi"))), given)
                if where:
                    os.remove(os.path.join(*where))

    def test_a_router_that_never_answers_is_waited_for_claude_local_wait_seconds(self):
        # Each look at the port starts Python, here slowly as on a loaded machine: counted in
        # tries, 10 s of them took 25 s. Counted here are the looks, not the seconds, which
        # a loaded machine stretches.
        here = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, here, True)
        launcher = os.path.join(here, "claude-local")
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(cr.__file__)), "claude-local"),
                    launcher)
        with open(os.path.join(here, "claude_router.py"), "w") as f:
            # The router's code for claude-local's questions, each noted and slow; run, a
            # router that takes connections and never answers one (claude-local looks only
            # at a port that takes them).
            f.write("import importlib.util, os, socket, sys, time\n"
                    "if len(sys.argv) > 2:\n"
                    "    with open(os.path.join(os.path.dirname(__file__), 'asked'), 'a') as f:\n"
                    "        f.write(sys.argv[2] + '\\n')\n"
                    "time.sleep(0.5)\n"
                    "spec = importlib.util.spec_from_file_location('real_router', %r)\n"
                    "real = importlib.util.module_from_spec(spec)\n"
                    "spec.loader.exec_module(real)\n"
                    "globals().update({k: v for k, v in vars(real).items() if k[:2] != '__'})\n"
                    "def main():\n"
                    "    server = socket.create_server(('127.0.0.1', int(os.environ["
                    "'CLAUDE_ROUTER_PORT'])))\n"
                    "    server.settimeout(%d)\n"
                    "    while True:\n"
                    "        server.accept()[0].close()\n"
                    % (os.path.abspath(cr.__file__), TIMEOUT * 3))
        port = unused_port()
        started = time.monotonic()
        done = self.run_launcher(port, ["claude"], {"CLAUDE_LOCAL_WAIT": "1"}, launcher=launcher)
        waited = time.monotonic() - started
        self.assertEqual(done.returncode, 1)
        self.assertIn("the router did not start", done.stderr)
        with open(os.path.join(here, "asked")) as f:
            asked = f.read().split()
        # Within the second, 2 looks of 0.5 s at most, then the last one; counted in tries, 10.
        self.assertEqual((asked[0], set(asked[1:])), ("plan", {"status"}))
        self.assertLessEqual(len(asked), 4, asked)
        self.assertLess(waited, TIMEOUT * 2)

    def test_says_so_when_claude_is_missing(self):
        done = self.run_launcher(9, [])
        self.assertEqual(done.returncode, 127)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1)
        self.assertIn("'claude' is not on PATH", done.stderr)


if __name__ == "__main__":
    unittest.main()
