#!/usr/bin/env python3
"""claude-router: a one-file proxy that lets Claude Code use local models in LM Studio.

Claude Code sends every turn to ANTHROPIC_BASE_URL. The router listens there and
forwards each turn to an Anthropic-compatible local server (LM Studio, llama.cpp's
llama-server, Ollama, vLLM), choosing the model per turn: a turn that brings an
image the router has not seen goes to the vision model, whose answer is cached as
that image's description; every other turn goes to the coder model, with images
replaced by their cached descriptions; a PDF reaches the coder as its text. On the
way it repairs what strict local chat templates reject.

Run:   python3 claude_router.py            (then: claude-local, or point
       ANTHROPIC_BASE_URL at http://127.0.0.1:3000)
Test:  python3 -m unittest
Status line for Claude Code: python3 claude_router.py --statusline
Stop the router on CLAUDE_ROUTER_PORT: python3 claude_router.py --stop

Environment (each is the default of the flag of the same name; see --help):
  CLAUDE_ROUTER_HOST, CLAUDE_ROUTER_PORT       where to listen (127.0.0.1:3000)
  CLAUDE_ROUTER_UPSTREAM                       the model server (http://127.0.0.1:1234)
  CLAUDE_ROUTER_VISION_UPSTREAM                the vision model's server (default: upstream)
  CLAUDE_ROUTER_CODER_MODEL, _VISION_MODEL     model ids as the server lists them (vision none: text only)
  CLAUDE_ROUTER_VISION_MODE                    answer (the default) or describe
  CLAUDE_ROUTER_CACHE_DIR                      where descriptions, PDF texts and prompt heads are kept
  CLAUDE_ROUTER_TOKEN                          required of clients when set
  CLAUDE_ROUTER_UPSTREAM_KEY                   sent to the model server(s) as a Bearer key
  CLAUDE_ROUTER_PRELOAD, CLAUDE_ROUTER_VERBOSE 1 to load missing models / log requests
  CLAUDE_ROUTER_WARM                           0 not to warm the coder's prompt cache ahead
  CLAUDE_ROUTER_SIDE_MODEL, _SIDE_UPSTREAM     where side requests (titles) go (the coder)

Design and settings: README.md beside this file.
"""

import argparse
import array
import base64
import concurrent.futures
import contextlib
import copy
import ctypes
import fcntl
import functools
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import itertools
import json
import marshal
import math
import os
import re
import select
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
import traceback
import unicodedata
import urllib.parse
import zlib

VERSION = "1.0.0"

################ Configuration

# Where to listen and where the models are.
HOST = "127.0.0.1"                          # loopback only unless a token is set
PORT = 3000                                 # what ANTHROPIC_BASE_URL points at
UPSTREAM_URL = "http://127.0.0.1:1234"      # LM Studio's default server
VISION_UPSTREAM_URL = ""                    # empty: the vision model lives on UPSTREAM_URL

# Models, as the server lists them (`lms ps`).
CODER_MODEL = "qwen/qwen3-coder-next"
VISION_MODEL = "mistralai/devstral-small-2-2512"   # "none" (or ""): text only, no vision model

# How the vision model is used. "answer": it answers the turn and its reply becomes the
# image's description (the seed). "describe": it is asked only to describe each new image,
# then the coder answers the turn with those descriptions in place.
VISION_MODE = "answer"
VISION_MODES = ("answer", "describe")
DESCRIBE_PROMPT = (
    "You describe images for a coding assistant that cannot see them. Describe the image "
    "faithfully and in detail: copy all visible text verbatim (code, error messages, "
    "labels, terminal output), then the layout, UI state, colours that carry meaning, "
    "and anything that looks wrong. Do not answer questions or give advice; only "
    "describe what is shown.")
DESCRIBE_MAX_TOKENS = 1024                  # tokens per image description
DESCRIBE_CONTEXT_CHARS = 500                # chars of the user's text sent as context
DESCRIBE_CONCURRENCY = 2                    # images of one turn described at once

# The description cache.
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "claude-router")
CACHE_FILE = "descriptions.jsonl"           # one JSON object per line, append-only
CACHE_LOCK_FILE = "descriptions.lock"       # flock()ed by every router sharing the dir
CACHE_MAX_ENTRIES = 10_000                  # oldest are evicted past this
CACHE_REWRITE_FACTOR = 2                    # rewrite the file when it holds this many x max

# Warming the coder's prompt cache before the user asks (the Warm-up banner).
WARM = True                                 # warm the coder at start and after its cache is lost
HEADS_FILE = "heads.json"                   # coder prompt heads kept for that, in the cache dir
HEADS_KEPT = 16                             # (model, upstream) pairs whose head is kept

# Side requests (session titles and other auxiliary requests): empty sends them to the coder.
SIDE_MODEL = ""                             # the model for them; empty: the coder model
SIDE_UPSTREAM_URL = ""                      # its server; empty: UPSTREAM_URL

# Documents (the PDFs Claude Code's Read tool sends): read by the router once, kept by content.
DOCUMENT_CACHE_FILE = "documents.jsonl"     # their texts, beside the descriptions, same care
DOCUMENT_CACHE_MAX_ENTRIES = 100            # documents kept; the oldest are evicted past this
DOCUMENT_MAX_CHARS = 1_000_000              # chars of one document kept; the rest is noted as cut
DOCUMENT_CONTEXT_SHARE = 0.5                # share of the coder's context one document may fill
DOCUMENT_DEFAULT_CONTEXT = 32768            # tokens assumed while the coder's context is unknown
DOCUMENT_IMAGES_KEPT = 8                    # scanned documents whose page images stay in memory
DOCUMENT_READER = "claude-router pdf"       # the "model" field of a document cache line

# What a PDF may cost us. A few kilobytes of Flate can inflate to gigabytes, so every
# stream is decompressed against a budget, and a document that overruns it gets a marker.
PDF_MAX_STREAM_BYTES = 32 * 1024 * 1024     # bytes one stream may inflate to
PDF_MAX_INFLATE = 256 * 1024 * 1024         # bytes all streams of a document may inflate to
PDF_MAX_PREDICTED = 8 * 1024 * 1024         # bytes of one stream a predictor is undone on
PDF_MAX_PAGES = 2000                        # pages read; the rest are left out, and said so
PDF_MAX_UNREAD = 100_000                    # pages past those counted, for the note
PDF_MAX_DEPTH = 12                          # nested forms, chains of references, page tree levels
PDF_MAX_PAGE_IMAGES = 4                     # images kept from a page without text
PDF_MAX_IMAGES = 32                         # images kept from a whole document
PDF_MAX_FORMS = 2000                        # form XObjects run per page (a form may draw forms)
PDF_MAX_CMAP_ENTRIES = 200_000              # codes one CMap or W array may define
PDF_MAX_FONT_CODES = 1_000_000              # codes all fonts of a document may define
PDF_MAX_CONTENT = 24 * 1024 * 1024          # bytes of content streams run, forms run again included
PDF_RUN_COST = 4096                         # bytes of that a content stream costs at least
PDF_SPACE_GAP = 0.12                        # gap, in font sizes, read as a word space
PDF_LINE_GAP = 0.5                          # baseline shift, in font sizes, read as a new line

# Limits and timeouts.
MAX_BODY_BYTES = 64 * 1024 * 1024           # requests; Claude Code sends MBs with screenshots
MAX_ERROR_BODY_BYTES = 1024 * 1024          # upstream error bodies we read to inspect
CONNECT_TIMEOUT = 5.0                       # s to connect to the upstream
READ_TIMEOUT = 600.0                        # s between upstream bytes (Claude Code waits 600)
WARM_UP_TIMEOUT = 3600.0                    # s a warm-up waits for its one token (nobody waits on it)
STATUSLINE_TIMEOUT = 1.0                    # s --statusline waits for the router's /status, in all
STATUS_TIMEOUT = 5.0                        # s --stop and claude-local wait for /status
STOP_TIMEOUT = 10.0                         # s --stop waits for the router to let go of its port
STOPPED, NOTHING_TO_STOP, LEFT_RUNNING = 0, 1, 2    # --stop's exit statuses
IDLE_TIMEOUT = 900.0                        # s a client keep-alive connection may idle
REQUEST_TIMEOUT = 30.0                      # s for a whole request head, and at least for a body: 408
BODY_TIME_PER_MB = 4.0                      # s more a request body may take per MiB (256 KiB/s)
MAX_CONNECTIONS = 128                       # client connections at once; then idle ones close, or 503
LINGER_TIMEOUT = 10.0                       # s we drop what a refused client still sends
MAX_HEAD_LINE = 65536                       # bytes of the request line or a header line
MAX_HEADERS = 100                           # header lines per request
MODELS_TTL = 30.0                           # s between looks at the upstream's model list
LISTING_TTL = 5.0                           # s: GET /v1/models has the list looked at again
RELAY_BUFFER = 65536                        # bytes per upstream read
STREAM_HEAD_BYTES = 65536                   # most bytes read to find a stream's first event
MAX_EVENT_BYTES = 1024 * 1024               # one upstream SSE event; past it the stream ends
ENCODED_PARTS_BYTES = 4 * 1024 * 1024       # prompt parts kept encoded between turns
REQUEST_PARTS_CHARS = 2 * 1024 * 1024       # request text kept read, and VALUE_CHARS a value
MEMORY_MAX_ENTRIES = 256                    # conversations, and images, remembered between turns
ERRORS_KEPT = 20                            # unexpected handler exceptions remembered, as text
REUSE_NOTE_BELOW = 0.9                      # name the first changed part when less is sent again
VISION_RETRY_AFTER = 600.0                  # s before an image the vision model failed on is retried
HANGUP_CHECK = 0.5                          # s between looks at a client waiting for a description
DESCRIPTION_WAIT = 600.0                    # s a turn waits for a description another one is making
FAILURE_REASON_CHARS = 60                   # chars of the upstream's reason in a failed image's marker
REPEAT_MAX_UNITS = 64                       # longest loop, in sentences, trimmed off a description
LISTED_IDS = 12                             # model ids named when a configured one is missing
ERROR_TEXT_CHARS = 300                      # chars of an upstream's error message kept and logged
MAX_JSON_DEPTH = 100                        # lists and objects nested in a request body

# Token estimates (no tokenizer here): they err high, so clamps and counts stay safe.
BYTES_PER_TOKEN = 3                         # JSON bytes per token, rounded down
IMAGE_TOKENS = 1600                         # Anthropic's cost of a full-size image
MIN_OUTPUT_TOKENS = 1024                    # never clamp max_tokens below this
SMALL_VISION_CONTEXT = 8192                 # warn when the vision model has less

# Marker strings the coder sees in place of images (the seed's).
DESCRIPTION_MARKER = "<<IMAGE DESCRIPTION: %s>>"
UNKNOWN_IMAGE_MARKER = "<<IMAGE: binary image file>>"
FAILED_IMAGE_MARKER = "<<IMAGE: could not be read by the vision model: %s>>"
CUT_OFF_NOTE = "(description cut off)"
SAME_DESCRIPTION_MARKER = "<<IMAGE DESCRIPTION: described together with an earlier image above>>"
LIFTED_IMAGE_TEXT = "(image shown in the next user message)"
SYNTHETIC_ASSISTANT_TEXT = "Please show me the image(s) from the tool result."
SYNTHETIC_USER_TEXT = "Here are the image(s) from the tool result above."
INJECTED_TEXTS = (LIFTED_IMAGE_TEXT, SYNTHETIC_ASSISTANT_TEXT, SYNTHETIC_USER_TEXT)
MARKER_PATTERN = r"<<IMAGE( DESCRIPTION)?: .*?>>"

# What the coder sees in place of a document block.
DOCUMENT_MARKER = "<<DOCUMENT TEXT: %s>>"
FAILED_DOCUMENT_MARKER = "<<DOCUMENT: %s could not be read: %s>>"
CUT_DOCUMENT_MARKER = "<<DOCUMENT CUT: %s of its %s chars left out%s, to fit %s>>"
UNREAD_PAGES_MARKER = "<<DOCUMENT CUT: its last %s pages not read: the router reads %s at most>>"
PAGE_HEADER = "--- page %d ---"
SCANNED_PAGE_HEADER = "--- page %d: no text layer; its image follows ---"
BLANK_PAGE_HEADER = "--- page %d: no text, and no image the router can read ---"
URL_DOCUMENT_REASON = "the router fetches nothing from the internet (%s)"
FILE_DOCUMENT_REASON = "the router cannot fetch uploaded files (%s)"
PAGE_CONTEXT = ("This image is page %d of the PDF %s, which has no text layer. Copy its text "
                "verbatim, in reading order.")


################ Errors and logging

# What the client and the log are told, in one shape each.

# Anthropic's error type for each status we send.
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 411: "invalid_request_error",
    413: "request_too_large", 500: "api_error", 502: "api_error",
    504: "timeout_error", 529: "overloaded_error"}

# What a socket timeout raises: socket.timeout became an alias of TimeoutError only in
# Python 3.10 (bpo-42413); before that a read timeout is an OSError that is no TimeoutError.
TIMEOUT_ERRORS = (TimeoutError, socket.timeout)

CONTROL_ESCAPES = {c: "\\x%02x" % c for c in (*range(32), *range(127, 160))}   # C0, DEL, C1


class ProxyError(Exception):
    """An error to answer with Anthropic's envelope; its message is safe to show."""

    def __init__(self, status, message, kind=None):
        super().__init__(message)
        self.status = status
        self.error_type = kind or error_type(status)


class ClientGone(Exception):
    """The client hung up while the router waited for the upstream: nobody to answer.

    Not an OSError on purpose, so no upstream error handler can take it for a
    failure of the model server."""


CLIENT_LEFT = "the client went away"        # the outcome of a request whose client hung up


def error_type(status):
    """Anthropic's error type for an HTTP status."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error(status, message, kind=None):
    """Return Anthropic's error envelope for status."""
    return {"type": "error", "error": {"type": kind or error_type(status), "message": message}}


# The id of the request the current thread serves, for its log lines: handler threads
# serve one request at a time, and the threads that describe images work for one.
LOG_CONTEXT = threading.local()


def log(line):
    """Write one line to stderr: the local time to the second, the id of the request this
    thread serves (so lines of concurrent requests can be told apart), then line."""
    request = request_id()
    sys.stderr.write("%s %s%s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "#%s " % request if request else "", line))
    sys.stderr.flush()


def escape_log(text):
    """Return text with control characters escaped, safe for one log line."""
    return str(text).translate(CONTROL_ESCAPES)


def readable_time(seconds):
    """A time.time() value as local time a person reads, with its UTC offset."""
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(seconds))


def short_size(n):
    """A byte count in a few characters: 950 B, 2.3 KB, 1.2 MB."""
    for size, unit in ((1 << 20, "MB"), (1 << 10, "KB")):
        if n >= size:
            return "%.1f %s" % (n / size, unit)
    return "%d B" % n


def set_log_request(ids, request=None):
    """This thread serves a new request now: its id is request, or, drawn from ids the
    first time it is asked for, so requests that log nothing (the status line's) use none."""
    LOG_CONTEXT.ids, LOG_CONTEXT.request = ids, request


def request_id():
    """The id of the request this thread serves (drawn now if it has none yet), or None."""
    if getattr(LOG_CONTEXT, "request", None) is None and getattr(LOG_CONTEXT, "ids", None):
        LOG_CONTEXT.request = next(LOG_CONTEXT.ids)
    return getattr(LOG_CONTEXT, "request", None)


def outcome_line(status, seconds, message=None):
    """The log line that ends a routed request: its status, how long it took, what went wrong."""
    line = "← %s in %.2f s" % (status or "no answer", seconds)
    return line + ": " + escape_log(message)[:ERROR_TEXT_CHARS] if message else line


def short_count(n):
    """A token count in a few characters: 950, 11.7k, 1.2M."""
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if n >= size:
            return "%.1f%s" % (n / size, unit)
    return str(n)


################ Reading requests

# The HTTP head of a request, checked before any body is read (RFC 9112): its grammar,
# who may ask (access), its path; then how long its body is and reading that many bytes.
# What the body says is checked next (Reading requests: validation).

# The HTTP/1.1 request head we accept (RFC 9112 3, 5; RFC 3986 3.3, 3.4): a token method,
# an origin-form target of URI characters, a 1.x version; header lines of a token name, a
# colon, and a value without control characters other than tab. Nothing else is read as
# HTTP: no obs-fold, NUL, bare CR, absolute-form target or space before the colon.
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
URI_CHARS = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})"
REQUEST_LINE = re.compile(rb"(%s) (/%s*)((?:\?(?:%s|\?)*)?) HTTP/1\.([0-9])\r?\n"
                          % (TOKEN, URI_CHARS, URI_CHARS))
HEADER_LINE = re.compile(rb"%s:[\t\x20-\x7e\x80-\xff]*\r?\n" % TOKEN)
# Header lines, then the blank line that ends a head. Neither pattern matches across a
# line end, so each match of a line is all of that line.
HEADER_BLOCK = re.compile(rb"(?:%s)*\r?\n" % HEADER_LINE.pattern)
UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def split_head(data):
    """Return (the request line's match, its header lines, the head's length in bytes) when
    data begins with a whole request head that the careful line-by-line reading would take
    as it is: every line in the grammar, at most MAX_HEADERS header lines, then the blank
    line, and all of it no longer than one line may be (MAX_HEAD_LINE). None for anything
    else, which that reading decides."""
    match = REQUEST_LINE.match(data)
    fields = match and HEADER_BLOCK.match(data, match.end())
    if not fields or fields.end() > MAX_HEAD_LINE:
        return None
    lines = data[match.end():fields.end()].split(b"\n")[:-2]     # less the blank line
    return (match, lines, fields.end()) if len(lines) <= MAX_HEADERS else None


class HeadLines:
    """A request head read a line at a time under one deadline: the careful reading, for a
    head split_head does not take whole (not all in yet, or one to refuse, saying why).

    read() returns the head; read_line() reads one line of it. requestline is the request
    line as read, for the log, once read() has it."""

    def __init__(self, rfile, sock, seconds):
        self.rfile, self.sock = rfile, sock     # the client's buffered reader and its socket
        self.deadline = time.monotonic() + seconds
        self.requestline = ""

    def read(self):
        """Return (the request line's match, the header lines). Raise ProxyError for a
        malformed line (400), a request line or header fields too large (414, 431), or a
        head not all in by the deadline (408)."""
        line = self.read_line()
        self.requestline = line.rstrip(b"\r\n").decode("latin-1")
        match = REQUEST_LINE.fullmatch(line)
        if not match:
            raise ProxyError(414 if len(line) > MAX_HEAD_LINE else 400, "malformed request line")
        lines = []
        while (field := self.read_line()) not in (b"\r\n", b"\n"):
            if len(field) > MAX_HEAD_LINE or len(lines) == MAX_HEADERS:
                raise ProxyError(431, "request header fields too large")
            if not HEADER_LINE.fullmatch(field):
                raise ProxyError(400, "header line %d is malformed (a fold, a control "
                                      "character, or no name)" % (len(lines) + 1))
            lines.append(field)
        return match, lines

    def read_line(self):
        """One line of the request head (at most MAX_HEAD_LINE + 1 bytes); 408 once the head
        has taken until the deadline (time.monotonic()), however slowly its bytes trickle in.

        A socket timeout bounds each wait for bytes, so readline() under one would let a
        head sent a byte at a time hold its thread forever: each read gets what is left."""
        line = bytearray()
        try:
            while not line.endswith(b"\n") and len(line) <= MAX_HEAD_LINE:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                self.sock.settimeout(left)
                data = self.rfile.peek(1)      # what is buffered, else one read of the socket
                if not data:
                    break
                room = MAX_HEAD_LINE + 1 - len(line)
                line += self.rfile.read(min(data.find(b"\n", 0, room) + 1 or len(data), room))
        except TIMEOUT_ERRORS:
            raise ProxyError(408, "the request's head did not arrive in time") from None
        if not line.endswith(b"\n") and len(line) <= MAX_HEAD_LINE:
            raise ProxyError(400, "the request ended inside its head")
        return bytes(line)


class HeaderFields(http.client.HTTPMessage):
    """A request's header lines (each a HEADER_LINE) as the http.client.HTTPMessage that
    http.client.parse_headers makes of them, without its email parser, a third of the
    time a head took: a name is what comes before the first colon; its value, what comes
    after, less leading blanks and the line end (the compat32 policy's header_source_parse).

    Read-only: get, get_all and in look names up in an index made here, where email's
    Message lowers every name it holds on each lookup, and a turn makes a dozen."""

    def __init__(self, lines=()):
        super().__init__()
        self.by_name = {}       # lower-case name: [its values, in order]
        for line in lines:
            name, _, value = line.decode("latin-1").partition(":")
            value = value.lstrip(" \t").rstrip("\r\n")
            self.set_raw(name, value)
            self.by_name.setdefault(name.lower(), []).append(value)

    def get(self, name, failobj=None):
        values = self.by_name.get(name.lower())
        return values[0] if values else failobj

    def get_all(self, name, failobj=None):
        return list(self.by_name.get(name.lower(), ())) or failobj

    def __contains__(self, name):
        return name.lower() in self.by_name


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
MAX_HOST_CHARS = 300    # a name of 253 (RFC 1035 2.3.4), an address, brackets, a port, blanks


def is_loopback_host(host):
    """True when host (a Host header value or address) names this machine's loopback.

    A longer value than MAX_HOST_CHARS names nothing, and is not kept: the answers kept
    are of header values, up to 64 KiB each, and 64 of them held 4 MiB."""
    return len(host) <= MAX_HOST_CHARS and is_loopback_name(host)


@functools.lru_cache(maxsize=64)    # clients send the same Host each time; ipaddress is slow
def is_loopback_name(host):
    """is_loopback_host(host), for a host of at most MAX_HOST_CHARS characters."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_access(headers, token, own_host):
    """Raise ProxyError for a client that may not use the router (headers: its request's).

    Without a token, a Host that is neither loopback nor our own name means a
    DNS-rebinding page: 403 (a token is what such a page cannot send, so with one,
    LAN clients may name this machine as they like). An Origin that is not loopback
    is a browser tab of some web site: 403."""
    host = headers.get("host", "")
    if not token and host and not is_loopback_host(host) and host.rsplit(":", 1)[0] != own_host:
        raise ProxyError(403, "host %s is not allowed" % escape_log(host[:100]))
    origin = headers.get("origin")
    if origin and not is_loopback_host(urllib.parse.urlsplit(origin).netloc or "-"):
        raise ProxyError(403, "cross-origin requests are not allowed")
    if token:
        given = headers.get("x-api-key") or ""
        bearer = headers.get("authorization") or ""
        if not given and bearer[:7].lower() == "bearer ":
            given = bearer[7:].strip()
        if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):
            raise ProxyError(401, "missing or wrong token (x-api-key or Authorization: Bearer)")


def normalize_path(path):
    """Return path normalised (RFC 3986 6.2.2), or None when it has an encoded slash or backslash.

    Unreserved characters are decoded, so %2e is a dot; then dot segments are resolved
    and empty ones dropped. What the router routes is then what the upstream sees."""
    def decode(match):
        char = chr(int(match[0][1:], 16))
        return char if char in UNRESERVED else match[0]

    path = re.sub(r"%[0-9A-Fa-f]{2}", decode, path)
    if re.search(r"%(2[Ff]|5[Cc])", path):
        return None
    segments = []
    for segment in path.split("/"):
        if segment == "..":
            segments = segments[:-1]
        elif segment not in ("", "."):
            segments.append(segment)
    tail = "/" if segments and path.endswith(("/", "/.", "/..")) else ""
    return "/" + "/".join(segments) + tail


def body_length(headers, method, limit):
    """Return the length of a request's body; raise ProxyError when it cannot be framed safely.

    Only one plain Content-Length frames a body here (RFC 9112 6.1-6.3): a Transfer-Encoding,
    or lengths that disagree or are not ASCII digits, could be read otherwise by whatever
    stands in front of the router, and the rest of the body smuggled in as a request."""
    if "transfer-encoding" in headers:
        raise ProxyError(411, "request bodies need Content-Length; Transfer-Encoding is not "
                              "supported")
    values = {v.strip(" \t") for v in headers.get_all("content-length") or ()}
    if not values:
        if method == "POST":
            raise ProxyError(411, "Content-Length is required")
        return 0
    value = values.pop()
    if values or not re.fullmatch("[0-9]+", value):
        raise ProxyError(400, "Content-Length must be one number")
    digits = value.lstrip("0") or "0"
    if len(digits) > 15 or int(digits) > limit:
        raise ProxyError(413, "request body of %s bytes is over the %d byte limit"
                         % (digits[:20], limit))
    return int(digits)


def read_exactly(rfile, sock, length, seconds):
    """Return the next length bytes of rfile, sock's reader, as a bytearray (fewer if the
    client closes first); raise socket.timeout once they have taken seconds to arrive.

    A socket timeout bounds each wait for bytes only, so a body sent a byte every few
    seconds held its thread and its connection's slot for as long as the client liked."""
    data = bytearray(length)
    with memoryview(data) as view:
        got = read_until(sock, length, seconds, lambda got: rfile.readinto1(view[got:]))
    return data if got == length else data[:got]


def read_until(sock, length, seconds, read):
    """Call read(bytes got so far), which returns how many bytes one read of sock brought,
    until length have come or the client closes; return how many came. Raise
    socket.timeout once they have taken seconds to arrive."""
    deadline = time.monotonic() + seconds
    got = 0
    while got < length:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)
        more = read(got)
        if not more:
            break
        got += more
    return got


# Claude Code's gateway hint headers (sent with CLAUDE_CODE_GATEWAY_HINT_HEADERS=1, which
# claude-local sets): what kind of request this is. They are for the router only and never
# go upstream (a server could take them for part of the request, and they change per turn).
CLASS_HEADER = "x-claude-code-request-class"        # main, subagent, compaction, auxiliary...
COMPACTION_HEADER = "x-claude-code-compaction"      # manual, auto or reactive: a summary request
COMPACTED_HEADER = "x-claude-code-context-compacted"    # the first main turn after a compaction
HINT_HEADERS = frozenset({
    CLASS_HEADER, COMPACTION_HEADER, COMPACTED_HEADER, "x-claude-1p-request-class",
    "x-claude-code-prompt-id", "x-claude-code-prev-tool-durations"})


def request_class(headers):
    """The request's class as Claude Code's hint header names it, lower case; "" without one."""
    return headers.get(CLASS_HEADER, "").strip().lower()[:40]


def is_side_request(headers, body):
    """True for a side request (a session title, a check): auxiliary by its hint header, or,
    without one, a request that offers no tools (every main, subagent and compaction
    turn of Claude Code does)."""
    klass = request_class(headers)
    return klass == "auxiliary" if klass else "tools" not in body


################ Reading requests: validation

# A request's body as JSON, read under limits (no NaN, no number beyond range, bounded
# nesting), then every field the later transforms index into, checked by tables: a
# malformed request becomes one 400 naming the bad field instead of a traceback.

def reject_constant(name):
    """json.loads hook: NaN and Infinity are not JSON, and no upstream would take them."""
    raise ValueError(name)


def read_float(text):
    """json.loads hook: a number beyond double range (1e400) would go upstream as Infinity."""
    number = float(text)
    if not math.isfinite(number):
        raise ProxyError(400, "the number %s is out of range" % text[:20])
    return number


def read_int(text):
    """json.loads hook: an integer beyond 64 bits is no number a model server reads."""
    number = int(text) if len(text) <= 20 else None     # int() of a long text is slow
    if number is None or not -2 ** 63 <= number < 2 ** 63:
        raise ProxyError(400, "the number %s... is out of range" % text[:20])
    return number


def json_depth(value):
    """How deeply parsed JSON value's lists and objects nest (a scalar: 0)."""
    return json_shape(value)[0]


def json_shape(value):
    """Return (json_depth(value), how many values parsed JSON value holds, itself included),
    in one walk without recursion."""
    deepest, count, level = 0, 1, [value] if isinstance(value, (dict, list)) else []
    while level:
        deepest += 1
        count += sum(map(len, level))
        # type() is: json.loads makes no subclasses, and it is twice isinstance's speed here
        level = [v for item in level for v in (item.values() if type(item) is dict else item)
                 if type(v) is dict or type(v) is list]
    return deepest, count


def parse_json_body(text):
    """The request body parsed from text, under the limits every request is read with;
    raise ProxyError (400) for what is not JSON a model server reads."""
    try:
        body = json.loads(text, parse_constant=reject_constant, parse_float=read_float,
                          parse_int=read_int)
    except (ValueError, RecursionError):
        raise ProxyError(400, "request body is not valid JSON (or not UTF-8)") from None
    # Python 3.9-3.11 parse nesting up to about the recursion limit, then fail on it in
    # json.dumps or any recursive walk further on: bound it while the answer is a 400.
    if json_depth(body) > MAX_JSON_DEPTH:
        raise ProxyError(400, "request body nests lists and objects more than %d deep"
                         % MAX_JSON_DEPTH)
    return body


ROLES = frozenset({"user", "assistant", "system"})
TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
NUMBER = (int, float)
TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "true or false",
              int: "an integer", float: "a number"}

# The fields each object must or may have, and their JSON types: {name: (types, required)}.
# A block's or tool_choice's own fields are looked up by its type; a block of a type not
# named here goes on as sent, for the upstream to judge.
REQUEST_SHAPE = {
    "messages": ((list,), True), "model": ((str,), False), "system": ((str, list), False),
    "max_tokens": ((int,), False), "stream": ((bool,), False), "temperature": (NUMBER, False),
    "top_p": (NUMBER, False), "top_k": ((int,), False), "stop_sequences": ((list,), False),
    "tools": ((list,), False), "tool_choice": ((dict,), False)}
MESSAGE_SHAPE = {"role": ((str,), True), "content": ((str, list), False)}
TOOL_SHAPE = {"name": ((str,), True), "description": ((str,), False),
              "input_schema": ((dict,), False), "type": ((str,), False)}
TYPED_SHAPES = {
    None: {"type": ((str,), True)},
    "text": {"text": ((str,), True)},
    "image": {"source": ((dict,), True)},
    "tool_use": {"id": ((str,), True), "name": ((str,), True), "input": ((dict,), True)},
    "tool_result": {"tool_use_id": ((str,), True), "content": ((str, list), False),
                    "is_error": ((bool,), False)},
    "thinking": {"thinking": ((str,), True)},
    "redacted_thinking": {"data": ((str,), True)},
    "tool_reference": {"tool_name": ((str,), True)},
    "tool": {"name": ((str,), True)},       # a tool_choice naming its tool
}


def check_fields(obj, shape, where):
    """Raise ProxyError naming the first field of obj that shape wants and obj lacks or mistypes.

    where is obj's path in the request ("messages.3.content.0"; "" for the body)."""
    if type(obj) is not dict:
        raise ProxyError(400, "%s: must be an object" % (where or "the request body"))
    for name, (types, required) in shape.items():
        if name not in obj:
            if required:
                raise ProxyError(400, "%s: is required" % field_path(where, name))
        elif type(obj[name]) not in types:   # type, not isinstance: True is no integer here
            raise ProxyError(400, "%s: must be %s" % (
                field_path(where, name),
                "a number" if float in types else " or ".join(map(TYPE_NAMES.get, types))))


def field_path(where, name):
    """The path of field name of the object at where ("" for the body)."""
    return "%s.%s" % (where, name) if where else name


def check_typed(obj, where):
    """Raise ProxyError unless obj (a content block or a tool_choice) has its type's fields."""
    if type(obj) is not dict or type(obj.get("type")) is not str:
        check_fields(obj, TYPED_SHAPES[None], where)    # raises, naming what is wrong
    check_fields(obj, TYPED_SHAPES.get(obj["type"], {}), where)


def validate_request(body, checked=frozenset()):
    """Raise ProxyError unless body has the shape of a messages request.

    Every field a transform reads is checked here, by the tables above, before any
    transform runs: a wrong type is one 400 naming the field, never a traceback.
    A message, system or tools whose id() is in checked passed these checks as part
    of an earlier request (RequestParts): each is checked alone, so it passes again."""
    check_fields(body, REQUEST_SHAPE, "")
    if not body["messages"]:
        raise ProxyError(400, "messages: must not be empty")
    for i, message in enumerate(body["messages"]):
        if id(message) not in checked:
            validate_message(message, "messages.%d" % i)
    if id(body.get("system")) not in checked:
        for i, block in enumerate(content_blocks(body.get("system", ""))):
            check_typed(block, "system.%d" % i)
            if block["type"] != "text":
                raise ProxyError(400, "system.%d.type: must be text" % i)
    if id(body.get("tools")) not in checked:
        for i, tool in enumerate(body.get("tools", [])):
            check_fields(tool, TOOL_SHAPE, "tools.%d" % i)
    if "tool_choice" in body:
        check_typed(body["tool_choice"], "tool_choice")
        if body["tool_choice"]["type"] not in TOOL_CHOICES:
            raise ProxyError(400, "tool_choice.type: must be auto, any, tool or none")
    if not all(type(s) is str for s in body.get("stop_sequences", [])):
        raise ProxyError(400, "stop_sequences: must be a list of strings")
    if body.get("max_tokens", 1) <= 0:
        raise ProxyError(400, "max_tokens: must be a positive integer")


def validate_message(message, where):
    """Raise ProxyError unless message, at where, is a message the transforms can handle."""
    check_fields(message, MESSAGE_SHAPE, where)
    if message["role"] not in ROLES:
        raise ProxyError(400, "%s.role: must be user, assistant or system" % where)
    for j, block in enumerate(content_blocks(message.get("content", ""))):
        validate_block(block, "%s.content.%d" % (where, j))


def validate_block(block, where, nested=False):
    """Raise ProxyError unless block is a content block the transforms can handle."""
    check_typed(block, where)
    kind = block["type"]
    if type(block.get("source")) is dict:      # an image's or a document's: typed too
        check_fields(block["source"], TYPED_SHAPES[None], where + ".source")
    if kind == "image":
        problem = image_source_problem(block["source"])
        if problem:
            raise ProxyError(400, "%s.source: %s" % (where, problem))
    if kind == "document":
        problem = document_problem(block)
        if problem:
            raise ProxyError(400, "%s.%s" % (where, problem))
    if kind == "tool_result":
        if nested:
            raise ProxyError(400, "%s: a tool_result cannot hold a tool_result" % where)
        for j, item in enumerate(content_blocks(block.get("content", ""))):
            validate_block(item, "%s.content.%d" % (where, j), nested=True)


# Document sources (Anthropic's messages API), with the media type each must have.
DOCUMENT_SOURCES = {"base64": "application/pdf", "text": "text/plain", "content": None,
                    "url": None, "file": None}


def document_problem(block):
    """Why a document block is not one we can read or mark, naming its field, or None.

    Its text replaces it before anything is sent on, but a malformed one is refused
    here like a malformed image, so no transform ever meets it."""
    for field in ("title", "context"):
        if not isinstance(block.get(field, ""), (str, type(None))):
            return "%s: must be a string" % field
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") not in DOCUMENT_SOURCES:
        return "source: a document source must be an object of type %s" % ", ".join(
            DOCUMENT_SOURCES)
    kind = source["type"]
    if kind in ("base64", "text") and source.get("media_type") != DOCUMENT_SOURCES[kind]:
        return "source.media_type: a %s document must be %s" % (kind, DOCUMENT_SOURCES[kind])
    if kind == "base64" and not (isinstance(source.get("data"), str) and source["data"]
                                 and is_base64(source["data"])):
        return "source.data: must be strict base64"
    if kind == "text" and not isinstance(source.get("data"), str):
        return "source.data: must be a string"
    if kind == "content":
        return content_source_problem(source.get("content"))
    if kind == "url" and not (isinstance(source.get("url"), str) and is_http_url(source["url"])):
        return "source.url: must be an http(s) URL"
    if kind == "file" and not isinstance(source.get("file_id"), str):
        return "source.file_id: must be a string"
    return None


def content_source_problem(content):
    """Why the content of a content document is not a string or text and image blocks, or None."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return "source.content: must be a string or a list of text and image blocks"
    for i, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            continue
        problem = image_source_problem(item.get("source")) if kind == "image" else \
            "must be a text or an image block"
        if problem:
            return "source.content.%d: %s" % (i, problem)
    return None


def image_source_problem(source):
    """Why source is not an image source we can send on, or None.

    Every image is checked, whatever turn it is in: base64 data is spliced into the
    upstream body unescaped (encode_message), so only strict base64 may get there."""
    if not isinstance(source, dict) or source.get("type") not in ("base64", "url"):
        return "an image source must be an object of type base64 or url"
    if source["type"] == "url":
        url = source.get("url")
        return None if isinstance(url, str) and is_http_url(url) else "url must be an http(s) URL"
    if not isinstance(source.get("media_type"), str) or not source["media_type"]:
        return "a base64 image needs a media_type"
    data = source.get("data")
    return None if isinstance(data, str) and data and is_base64(data) else \
        "data must be strict base64"


def is_http_url(url):
    """True for an absolute http or https URL with a host and no whitespace or controls."""
    if not url.isprintable() or " " in url:     # isprintable: no other space or control
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def is_base64(data):
    """True when data is strict base64: alphabet only, padding only at the end.

    bytes.translate checks a multi-MB screenshot about five times faster than
    decoding it, a slice at a time (encoded_slices)."""
    if not data.isascii() or len(data) % 4:
        return False
    end = len(data) - (data.endswith("=") + data.endswith("=="))
    return not any(part.translate(None, BASE64_ALPHABET) for part in encoded_slices(data, end))


TEXT_SLICE = 256 * 1024     # characters of a long string encoded at a time


def encoded_slices(text, end=None):
    """Yield text[:end] encoded as UTF-8, TEXT_SLICE characters at a time.

    A multi-MB screenshot is never copied whole (its copies came on top of the body's
    memory), and each slice is checked, hashed or sent while in the processor's cache:
    translate takes 0.8 ms for 2 MB in slices, 1.4 ms whole."""
    end = len(text) if end is None else end
    if end <= TEXT_SLICE:
        yield text[:end].encode()
        return
    for start in range(0, end, TEXT_SLICE):
        yield text[start:min(start + TEXT_SLICE, end)].encode()


def read_typed(obj, name, kind, default=None):
    """obj[name] when obj is an object and that value has the JSON type kind, else default.

    What a model server lists is read only through this: a field of another type (a
    string context_length, a list as a key) is as good as absent, never a crash."""
    value = obj.get(name) if type(obj) is dict else None
    return value if type(value) is kind else default


################ Reading requests: what is new

# Claude Code sends the whole conversation every turn: the system text, the tools and every
# earlier message again, byte for byte, with one or two new messages at the end. A JSON
# object or list ends where its own brackets close, so where the text at a value's start
# begins with the text of a value read there recently, it is that value, whole: parsed,
# bounded, checked and cleaned already. Only what is new is read.

SKIP_BLANKS = json.decoder.WHITESPACE.match     # the blanks json.loads allows between tokens
NEXT_VALUE = re.compile(r"[ \t\n\r]*,[ \t\n\r]*").match     # a comma between two values
READ_FIELDS = ("system", "tools")               # top-level values kept between turns
PLACE_CANDIDATES = 4                            # parts kept per place: main turns, subagents...
# What each value of a kept part counts for, in characters, beside its text: as read and
# cleaned it is an object or two, ~450 bytes for a 13-character {"type":"x"}, where Claude
# Code's text takes ~8 bytes a character. Kept by their text alone, 2 MiB of tiny values
# held ~70 MiB.
VALUE_CHARS = 24
# A request with more messages, or more top-level fields, is json.loads's to read: read one
# by one, 300,000 tiny messages (9 MB) took 2.2 s of CPU and 250 MB where json.loads takes
# 0.3 s and 110 MB (no more than ~20,000 parts could be kept anyway), and 600,000 fields
# 2.0 s where it takes 0.7.
READ_MESSAGES_MAX = 20000
READ_KEYS_MAX = 1000


class ReadPart:
    """An object or a list of a request body, as read: its place (("field", name) or
    ("message", index)), its JSON text (None when too long to keep), the value and how
    deeply it nests, what keeping it costs (its text and VALUE_CHARS per value); once its
    request passed validate_request, its cleaned form, and once a turn sent that on as it
    is, its encoding (part_encoding)."""

    __slots__ = ("place", "span", "value", "depth", "cost", "checked", "clean", "encoded")

    def __init__(self, place, span, value):
        self.place, self.span, self.value = place, span, value
        self.depth, values = json_shape(value)
        self.cost = len(span or "") + VALUE_CHARS * values
        self.checked, self.clean, self.encoded = False, None, None


class RequestParts:
    """The parts of recent requests (ReadPart), by place: bounded by their cost, one lock.

    read() parses a request body as parse_json_body does, taking the system text, the
    tools and each message from a recent request's parts where the text there is
    theirs; remember() keeps a request's parts once it passed the checks, so nothing
    unchecked is ever taken as checked; read_object(), read_messages() and read_value()
    are read()'s steps. A kept value is shared by every request that sends it again:
    no transform changes its input (PartsMutationTest)."""

    def __init__(self, max_chars=REQUEST_PARTS_CHARS):
        self.lock = threading.Lock()    # guards places, size and the counters
        self.max_chars = max_chars      # bound of the kept parts' cost; oldest places go first
        self.max_messages = READ_MESSAGES_MAX   # a request with more is read by json.loads
        self.max_keys = READ_KEYS_MAX           # and one with more top-level fields
        # place -> [ReadPart], newest first. remember() replaces the dict and its lists whole
        # and never changes them, so a read takes them without the lock.
        self.places = {}
        self.size = 0
        self.reused = self.parsed = 0   # parts taken from recent requests, and parts read anew

    def read(self, text):
        """Return (body, parts): text parsed as parse_json_body(text) would, or its ProxyError
        raised; parts are the body's ReadParts by id() of their values."""
        decoder = json.JSONDecoder(parse_constant=reject_constant, parse_float=read_float,
                                   parse_int=read_int)
        try:
            found = self.read_object(text, decoder.scan_once, self.places)
        except (ValueError, StopIteration, ProxyError, RecursionError):
            found = None
        # Anything else (not an object, no messages list, a key given twice, an error, deep
        # nesting, too many messages or fields) is json.loads's to read, so that each error
        # and its wording stay its own.
        if found is None or found[1] > MAX_JSON_DEPTH:
            return parse_json_body(text), {}
        body, _, parts = found
        reused = sum(part.checked for part in parts.values())
        with self.lock:
            self.reused += reused
            self.parsed += len(parts) - reused
        return body, parts

    def read_object(self, text, scan, places):
        """Return (body, its depth, parts) of text, a JSON object with a messages list; None
        for any other text."""
        body, depth, parts = {}, 0, {}
        idx = SKIP_BLANKS(text, 0).end()
        if not text.startswith("{", idx):
            return None
        idx = SKIP_BLANKS(text, idx + 1).end()
        while text.startswith('"', idx) and len(body) < self.max_keys:
            key, idx = json.decoder.scanstring(text, idx + 1)
            idx = SKIP_BLANKS(text, idx).end()
            if key in body or not text.startswith(":", idx):
                return None
            idx = SKIP_BLANKS(text, idx + 1).end()
            if key == "messages":
                body[key], idx, deep = self.read_messages(text, idx, scan, places, parts)
            else:
                place = ("field", key) if key in READ_FIELDS else None
                body[key], idx, deep = self.read_value(text, idx, place, scan, places, parts)
            depth = max(depth, deep)
            comma = NEXT_VALUE(text, idx)
            if comma is None:
                idx = SKIP_BLANKS(text, idx).end()
                whole = text.startswith("}", idx) and SKIP_BLANKS(text, idx + 1).end() == len(text)
                return (body, depth + 1, parts) if whole and "messages" in body else None
            idx = comma.end()
        return None

    def read_messages(self, text, idx, scan, places, parts):
        """Return (the list of messages at text[idx], the index past it, its depth)."""
        if not text.startswith("[", idx):
            raise ValueError("messages is no list")
        messages, depth = [], 0
        idx = SKIP_BLANKS(text, idx + 1).end()
        if text.startswith("]", idx):
            return messages, idx + 1, 1
        while True:
            if len(messages) == self.max_messages:
                raise ValueError("too many messages to read one by one")
            message, idx, deep = self.read_value(text, idx, ("message", len(messages)), scan,
                                                 places, parts)
            messages.append(message)
            depth = max(depth, deep)
            comma = NEXT_VALUE(text, idx)
            if comma is None:
                break
            idx = comma.end()
        idx = SKIP_BLANKS(text, idx).end()
        if not text.startswith("]", idx):
            raise ValueError("expecting , or ]")
        return messages, idx + 1, depth + 1

    def read_value(self, text, idx, place, scan, places, parts):
        """Return (the value at text[idx], the index past it, its depth): a recent part of
        place's whose text is there, else parsed (an object or a list as a new ReadPart)."""
        for part in places.get(place, ()):
            if text.startswith(part.span, idx):     # one memcmp; the value ends where it ends
                parts[id(part.value)] = part
                return part.value, idx + len(part.span), part.depth
        value, end = scan(text, idx)
        if place is None or type(value) not in (dict, list):
            return value, end, json_depth(value)
        # An 8 MB screenshot is not kept: it would double its request's memory.
        part = ReadPart(place, text[idx:end] if end - idx <= self.max_chars // 8 else None, value)
        parts[id(value)] = part
        return value, end, part.depth

    def remember(self, parts):
        """Keep parts (of a request that passed the checks) as their places' newest."""
        with self.lock:
            places = dict(self.places)
            for part in parts.values():
                if part.checked and part.span is not None and part.cost <= self.max_chars // 8:
                    self.keep(places, part)
            while self.size > self.max_chars:
                self.size -= sum(part.cost for part in places.pop(next(iter(places))))
            self.places = places

    def keep(self, places, part):
        """Make part its place's newest in places, and its place the newest (the lock held)."""
        kept = places.pop(part.place, ())
        if not kept or kept[0] is not part:
            if all(old is not part for old in kept):
                self.size += part.cost
            kept = [part] + [old for old in kept if old is not part]
            self.size -= sum(old.cost for old in kept[PLACE_CANDIDATES:])
            kept = kept[:PLACE_CANDIDATES]
        places[part.place] = kept


################ Big request bodies

# A body of screenshots is mostly base64. Read whole, an 8 MB one was held as bytes and as
# text, then as text and as parsed strings: 16 MiB at a time, and json.loads scanned and
# copied every byte. Read as a SplitBody, each long base64 string is taken out of the
# text as it arrives and held once, as the string it becomes; json.loads reads the rest.

SPLIT_BODY_BYTES = 1024 * 1024      # a request body bigger is read as a SplitBody
SPLIT_READ_BYTES = 256 * 1024       # bytes per read of one
SPLIT_FEED_BYTES = 64 * 1024        # smaller reads are gathered to this before they are fed
BASE64_RUN = 4096                   # a string of this many base64 characters or more is cut out
BASE64_CHARS = BASE64_ALPHABET + b"="
BASE64_STRING_START = re.compile(rb'"[A-Za-z0-9+/=]{%d}' % BASE64_RUN)


def read_split(rfile, sock, length, seconds):
    """Return the next length bytes of rfile, sock's reader, as a SplitBody, as read_exactly
    reads them (fewer if the client closes first)."""
    body, held = SplitBody(), bytearray()

    def read(got):
        """Read once; feed body what came, gathered to SPLIT_FEED_BYTES or more."""
        data = rfile.read1(min(length - got, SPLIT_READ_BYTES))
        size = len(data)
        # A client that sends a few bytes at a time makes reads of a few bytes: fed
        # each, the body held an object per read (14 times a 4 MB text body's size in
        # 3-byte reads) and searched its tail again on every one.
        last = not size or got + size == length
        if held or (size < SPLIT_FEED_BYTES and not last):
            held.extend(data)
            if len(held) < SPLIT_FEED_BYTES and not last:
                return size
            data = bytes(held)
            held.clear()
        body.feed(data)
        return size
    read_until(sock, length, seconds, read)
    return body


class SplitBody:
    """A big request body as it is read: its text, each string of BASE64_RUN or more base64
    characters in it replaced by a marker, and those strings.

    feed() takes the bytes as they come (read_string() reads on in a string); parse()
    returns the body as parsing the whole text would, and whole() the bytes as sent.

    Taking strings out never changes how the rest parses: a marker, like the base64
    it stands for, holds no quote, backslash or control character, so every string,
    key and error of the text stays where it was. A cut-out string can still be part
    of a longer one (after an escaped quote) or a key: then its marker is not a whole
    string value of the parsed text, and parse() parses the whole text instead."""

    def __init__(self):
        self.marker = os.urandom(16).hex()  # + the string's number; no client can send it
        self.parts = []             # the text's bytes as read, markers in place of strings
        self.strings = []           # the strings cut out, in order
        self.string = None          # bytes of a string being read, or None
        self.tail = b""             # the end of the last bytes fed, if a string may begin there
        self.size = 0               # bytes fed

    def __len__(self):
        return self.size

    def feed(self, data):
        """Take the body's next bytes; return how many."""
        size, pos = len(data), 0
        self.size += size
        if self.tail:
            data, self.tail = self.tail + data, b""
        while pos < len(data):
            if self.string is not None:
                pos = self.read_string(data, pos)
                continue
            found = BASE64_STRING_START.search(data, pos)
            if found is None:
                # A string may begin in the last BASE64_RUN bytes: only from their last quote.
                quote = data.rfind(b'"', max(pos, len(data) - BASE64_RUN))
                cut = len(data) if quote < 0 else quote
                self.parts.append(data[pos:cut])
                self.tail = data[cut:]
                break
            self.parts.append(data[pos:found.start() + 1])
            self.string = [data[found.start() + 1:found.end()]]
            pos = found.end()
        return size

    def read_string(self, data, pos):
        """Read on from data[pos] in the string being cut out; return where the text goes on."""
        quote = data.find(b'"', pos)
        piece = data[pos:] if quote < 0 else data[pos:quote]
        if piece.translate(None, BASE64_CHARS):     # not all base64: it stays in the text
            self.parts += self.string
            self.string = None
            return pos
        self.string.append(piece)
        if quote < 0:
            return len(data)
        self.parts.append(b"%s%d" % (self.marker.encode(), len(self.strings)))
        joined, self.string = b"".join(self.string), None     # its pieces go first
        self.strings.append(joined.decode("ascii"))
        return quote

    def text(self):
        """The body's text as read, markers in place of the strings cut out."""
        if self.string is not None:     # the body ended inside it
            self.parts += self.string
            self.string = None
        self.parts.append(self.tail)
        self.tail = b""
        return b"".join(self.parts)

    def whole(self):
        """The body's bytes as sent."""
        pieces = re.split(b"%s([0-9]+)" % self.marker.encode(), self.text())
        pieces[1::2] = [self.strings[int(n)].encode("ascii") for n in pieces[1::2]]
        return b"".join(pieces)

    def parse(self, read):
        """Return read(text) of the body's text, a (body, parts) pair (RequestParts.read),
        with each string cut out back in its place; parts holds none that had one."""
        text = self.text().decode("utf-8")
        body, parts = read(text)
        if self.strings and not self.put_back(body):
            return read(self.whole().decode("utf-8"))
        return body, {k: part for k, part in parts.items()
                      if part.span is None or self.marker not in part.span}

    def put_back(self, body):
        """Put each string cut out back in body in place of its marker; False if a marker is
        not a whole string value there (a key, or in a longer string)."""
        markers = {"%s%d" % (self.marker, i): s for i, s in enumerate(self.strings)}
        found, level = 0, [body] if type(body) in (dict, list) else []
        while level:
            inner = []
            for value in level:
                for key, item in (value.items() if type(value) is dict else enumerate(value)):
                    if type(item) is str:
                        if item in markers:
                            value[key] = markers[item]
                            found += 1
                    elif type(item) is dict or type(item) is list:
                        inner.append(item)
            level = inner
        return found == len(markers)


################ Request transforms

# What every request loses or has repaired before a local server sees it.
#
# The prefix rule. A local server reuses its cache only for the unchanged head of the
# prompt, and every template renders the system text first, then the tools, then the
# messages. So the system text and the tools stay as the client sent them for the whole
# conversation, and how a message is rendered depends only on that message and the
# ones before it, never on later ones or on whether it is the last. The one exception
# is the system messages before the first assistant message: they go to the start of
# the first user message, and they all come with the first request and never change.
# test_claude_router's PrefixReplayTest replays a growing conversation to hold us to it.

# Request fields a local server understands; everything else Claude Code sends
# (thinking, context_management, output_config, metadata, safeguards, ...) is dropped.
REQUEST_FIELDS = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice"})
COUNT_TOKENS_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice"})
HEAD_FIELDS = ("model", "system", "tools", "tool_choice")   # sent before the messages
TOOL_FIELDS = ("name", "description", "input_schema")
BILLING_PREFIX = "x-anthropic-billing-header"


def text_block(text):
    """A text content block."""
    return {"type": "text", "text": text}


def content_blocks(content):
    """Content as a list of blocks (a string becomes one text block)."""
    if isinstance(content, str):
        return [text_block(content)] if content else []
    return list(content or [])


def content_text(content):
    """The text of content (string or blocks), text blocks joined by blank lines."""
    if isinstance(content, str):
        return content
    return "\n\n".join(b["text"] for b in content or [] if b.get("type") == "text")


def clean_request(body, fields=REQUEST_FIELDS, parts=None):
    """Return body with system messages folded and everything a local server rejects removed.

    parts: the body's ReadParts by id() of their values (RequestParts), which keep
    the cleaned system, tools and messages (a system message: as system_reminder's),
    so what an earlier request sent too is not cleaned again."""
    body = fold_system_messages(body, parts)
    # The head first, in the order templates render it, so the JSON sent is as
    # prefix-stable as the prompt it becomes.
    clean = {k: body[k] for k in HEAD_FIELDS if k in body and k in fields}
    clean.update((k, v) for k, v in body.items() if k in fields and k not in clean)
    if "system" in clean:
        system = cleaned(clean["system"], clean_system, parts)
        if system:
            clean["system"] = system
        else:
            del clean["system"]
    clean["messages"] = [m for m in (cleaned(m, clean_message, parts) for m in body["messages"])
                         if m is not None]
    if "tools" in clean:
        clean["tools"] = cleaned(clean["tools"], clean_tools, parts)
        if not clean["tools"]:
            del clean["tools"]
    if "tools" not in clean:
        clean.pop("tool_choice", None)
    return clean


def cleaned(value, clean, parts=None):
    """clean(value), made once per ReadPart: kept with value's part in parts, if it has one."""
    part = parts.get(id(value)) if parts else None
    if part is None:
        return clean(value)
    if not part.checked:
        part.clean, part.checked = clean(value), True
    return part.clean


def checked_request(body, fields=REQUEST_FIELDS, parts=None):
    """Return body validated and cleaned; raise ProxyError when it is malformed, or when
    no message is left to send (each was empty, or only thinking): never messages: [].

    parts: the body's ReadParts by id() of their values (RequestParts.read); those of
    an earlier request that passed are neither checked nor cleaned again."""
    validate_request(body, {key for key, part in (parts or {}).items() if part.checked})
    clean = clean_request(body, fields, parts)
    if not clean["messages"]:
        raise ProxyError(400, "messages: none is left to send once empty messages and "
                              "thinking blocks are dropped")
    return clean


def system_reminder(message):
    """A role "system" message as user text wrapped in <system-reminder>, or None if empty.

    One text block, whether the content came as a string or as blocks: Claude Code
    sends its environment message as blocks first and as a string afterwards."""
    texts = [b["text"] for b in content_blocks(message.get("content"))
             if b.get("type") == "text" and b["text"]]
    if not texts:
        return None
    return {"role": "user", "content": [
        text_block("<system-reminder>\n%s\n</system-reminder>" % "\n\n".join(texts))]}


def fold_system_messages(body, parts=None):
    """Return body with role "system" messages turned into user text, so messages hold none.

    LM Studio before 0.4.15, llmster, Ollama and older vLLM reject them in messages.
    Those before the first assistant message (Claude Code's environment; after a
    compaction, its date line) open the first user message; every later one stays in
    place (Claude Code adds them mid-session: mode changes, token countdowns) and the
    alternation repair merges it with its neighbours. Moving them into the top-level
    system would change the head of the prompt each time one appears. parts: as
    clean_request's."""
    messages = body["messages"]
    if not any(m["role"] == "system" for m in messages):
        return body
    first_reply = next((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                       len(messages))
    early = [r for r in (cleaned(m, system_reminder, parts) for m in messages[:first_reply]
                         if m["role"] == "system") if r]
    out = []
    for i, message in enumerate(messages):
        if message["role"] == "system":
            message = cleaned(message, system_reminder, parts) if i > first_reply else None
        elif message["role"] == "user" and early:
            out += early
            early = []
        if message:
            out.append(message)
    return {**body, "messages": out + early}


def strip_billing_header(system):
    """Return system without Claude Code's billing block.

    Its cc_version suffix changes every conversation and compaction, so leaving it in
    makes the server re-read the whole prompt instead of reusing its prefix cache."""
    if isinstance(system, str):
        return "" if system.startswith(BILLING_PREFIX) else system
    return [b for b in system if not b.get("text", "").startswith(BILLING_PREFIX)]


def clean_system(system):
    """Return the system text without the billing block, its blocks with only their text."""
    system = strip_billing_header(system)
    if isinstance(system, list):
        system = [{"type": "text", "text": b["text"]} for b in system]
    return system


def clean_block(block):
    """Return block as a local server accepts it, or None to drop it."""
    kind = block["type"]
    if kind in ("thinking", "redacted_thinking"):
        return None
    if kind == "tool_reference":
        return text_block("Tool loaded: %s" % block.get("tool_name", "?"))
    block = {k: v for k, v in block.items() if k != "cache_control"}
    if kind == "tool_result" and isinstance(block.get("content"), list):
        block["content"] = [b for b in map(clean_block, block["content"]) if b is not None]
    return block


def clean_message(message):
    """Return message with only role and cleaned content (always blocks), or None when
    nothing is left.

    Claude Code sends some messages as a string on one turn and as blocks on the next
    (the first user message of a --bare follow-up): one form keeps the bytes sent for
    that message, and so the prompt's head, the same."""
    content = [b for b in map(clean_block, content_blocks(message.get("content", ""))) if b]
    if not content:
        return None
    return {"role": message["role"], "content": content}


def clean_tools(tools):
    """Client tools with only the fields a local server knows; server tools dropped."""
    return [{k: t[k] for k in TOOL_FIELDS if k in t} for t in tools
            if "input_schema" in t and t.get("type", "custom") == "custom"]


def normalize_assistant_messages(messages):
    """Return messages with each assistant turn's text folded before its tool_use blocks.

    Devstral's template rejects [text, tool_use, text, tool_use]; it takes one text
    then the tool calls."""
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] != "assistant" or not isinstance(content, list) or not any(
                b.get("type") == "tool_use" for b in content):
            out.append(message)
            continue
        texts = [b["text"] for b in content if b.get("type") == "text" and b["text"]]
        rest = [b for b in content if b.get("type") != "text"]
        folded = [text_block("\n\n".join(texts))] if texts else []
        # One that is folded already stays the same object, so its encoding is found by it
        # (part_encoding). == is exact here: text blocks hold strings, the rest are content's.
        out.append(message if folded + rest == content else {**message, "content": folded + rest})
    return out


def fix_message_alternation(messages):
    """Return messages with consecutive same-role messages merged into one.

    In a merged user message tool_result blocks go first, as Anthropic's API wants.
    Each run is merged once, so a run of n messages costs n, not n squared."""
    out = []
    for role, run in itertools.groupby(messages, lambda m: m["role"]):
        run = list(run)
        if len(run) == 1:
            out.append(run[0])
            continue
        blocks = [b for m in run for b in content_blocks(m["content"])]
        if role == "user":
            blocks = ([b for b in blocks if b.get("type") == "tool_result"]
                      + [b for b in blocks if b.get("type") != "tool_result"])
        out.append({**run[0], "content": blocks})
    return out

# Images: descriptions in place of images for the coder; images lifted out of tool results
# for the vision model.


def is_image(block):
    """True for an image content block."""
    return isinstance(block, dict) and block.get("type") == "image"


def image_data(block):
    """The string that identifies an image: its base64 text, or its URL."""
    source = block["source"]
    return source["url"] if source.get("type") == "url" else source["data"]


def content_keys(messages, data_of):
    """Return {data string: sha256 hex} for every block of messages whose data_of(block) is
    not None, each hashed once."""
    keys = {}
    for message in messages:
        for block in iter_blocks(message):
            data = data_of(block)
            if data is not None and data not in keys:
                digest = hashlib.sha256()
                for part in encoded_slices(data):
                    digest.update(part)
                keys[data] = digest.hexdigest()
    return keys


def image_keys(messages):
    """Return {image data string: sha256 hex} for every image in messages, each hashed once."""
    return content_keys(messages, lambda block: image_data(block) if is_image(block) else None)


def iter_blocks(message):
    """Yield the content blocks of message, including those inside tool_result blocks."""
    content = message.get("content")
    if not isinstance(content, list):
        return
    for block in content:
        yield block
        if isinstance(block, dict) and block.get("type") == "tool_result" \
                and isinstance(block.get("content"), list):
            yield from block["content"]


def current_turn_start(messages):
    """Index of the first message after the last assistant message (the user's turn)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i + 1
    return 0


def new_image_keys(messages, keys, descriptions):
    """Keys of the images in the current user turn that have no description, in order."""
    found = {}      # a dict: in order, and a look-up is not a scan of the list
    for message in messages[current_turn_start(messages):]:
        if message.get("role") != "user":
            continue
        for block in iter_blocks(message):
            if is_image(block):
                key = keys[image_data(block)]
                if key not in descriptions:
                    found[key] = True
    return list(found)


def route_request(body, keys, descriptions, vision_model, coder_model, new_keys, failures=None):
    """Return (route, model, messages) for a cleaned request.

    route is "vision" when new_keys (images with no description in the user's turn)
    is not empty: those travel as pixels, every other image as its description, or
    as a marker saying why the vision model could not read it (failures)."""
    messages = body["messages"]
    if new_keys:
        messages, substituted = substitute_images_with_descriptions(
            messages, keys, descriptions, frozenset(new_keys), failures)
        messages = rewrite_for_vision(messages)
        route, model = "vision", vision_model
    else:
        messages, substituted = substitute_images_with_descriptions(
            messages, keys, descriptions, (), failures)
        route, model = "coder", coder_model
    # Merged first: two assistant messages in a row become one, whose text is then folded
    # before its tool calls as a single message's is.
    messages = normalize_assistant_messages(fix_message_alternation(messages))
    return route, model, messages, substituted


def splice_blocks(blocks, wanted, replace):
    """Return blocks with the list replace(block, before) in place of each block wanted(block)
    picks, tool_results included; before is the block before it in its list, or None.

    Module-level on purpose: a nested function that calls itself is a reference cycle,
    and it kept every request's images (and the keys dict) alive until the cyclic GC
    happened to run: +8 MB of memory per screenshot request."""
    out, before = [], None
    for block in blocks:
        if wanted(block):
            out += replace(block, before)
        elif block.get("type") == "tool_result" and isinstance(block.get("content"), list) \
                and any(wanted(b) for b in block["content"]):
            out.append({**block, "content": splice_blocks(block["content"], wanted, replace)})
        else:
            out.append(block)
        before = block
    return out


def map_blocks(messages, wanted, replace):
    """Return messages with splice_blocks' blocks in place of each block wanted picks."""
    return [{**m, "content": splice_blocks(m["content"], wanted, replace)}
            if isinstance(m["content"], list) and any(wanted(b) for b in iter_blocks(m)) else m
            for m in messages]


def map_image_blocks(messages, replace):
    """Return messages with replace(block) in place of each image block, tool_results included."""
    return map_blocks(messages, is_image, lambda block, _: [replace(block)])


def substitute_images_with_descriptions(messages, keys, descriptions, keep=(), failures=None):
    """Return (messages, substituted): images replaced by description markers.

    Images whose key is in keep stay. An image without a description becomes the
    failed-image marker with the reason in failures, else the unknown-image marker. A description already used for an earlier image (several
    images described by one reply) is not repeated. Only earlier messages decide how
    a message reads, so the coder's prompt prefix stays byte-identical turn to turn."""
    if not keys:
        return messages, 0      # keys has every image of the request: there is none
    seen = set()
    substituted = 0

    def replace(block):
        nonlocal substituted
        key = keys[image_data(block)]
        if key in keep:
            return block
        text = descriptions.get(key)
        if text is None and key in (failures or {}):
            return text_block(FAILED_IMAGE_MARKER % failures[key])
        if text is None:
            return text_block(UNKNOWN_IMAGE_MARKER)
        substituted += 1
        if text in seen:
            return text_block(SAME_DESCRIPTION_MARKER)
        seen.add(text)
        return text_block(DESCRIPTION_MARKER % text)

    messages = map_image_blocks(messages, replace)
    return messages, substituted


def lift_tool_result_images(block):
    """Return (tool_result without images, its images)."""
    inner = block.get("content")
    if not isinstance(inner, list) or not any(is_image(b) for b in inner):
        return block, []
    images = [b for b in inner if is_image(b)]
    rest = [b for b in inner if not is_image(b)] + [text_block(LIFTED_IMAGE_TEXT)]
    return {**block, "content": rest}, images


def rewrite_for_vision(messages):
    """Return messages with images moved out of tool_result blocks.

    LM Studio accepts only text inside tool_result. The tool_result keeps a text
    stand-in, then a synthetic assistant turn asks for the images and a user turn
    shows them, with the rest of that user message after them, so roles alternate
    and every tool_use still meets its tool_result in the next message."""
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] != "user" or not isinstance(content, list):
            out.append(message)
            continue
        results, images, others = [], [], []
        for block in content:
            if block.get("type") == "tool_result":
                block, lifted = lift_tool_result_images(block)
                results.append(block)
                images += lifted
            else:
                others.append(block)
        if not images:
            out.append(message)
            continue
        out.append({"role": "user", "content": results})
        out.append({"role": "assistant", "content": [text_block(SYNTHETIC_ASSISTANT_TEXT)]})
        out.append({"role": "user",
                    "content": images + (others or [text_block(SYNTHETIC_USER_TEXT)])})
    return out


################ Description cache

# What the router learns of an image or a PDF, kept by content hash across turns and
# restarts: the document reader (below) and the vision model's descriptions keep theirs
# here, so it comes before both.

def drop_oldest(entries, bound):
    """Drop the oldest entries of a dict (its insertion order) past bound. Caller holds its lock.

    One pass picks them all: next(iter()) per entry would rescan the holes the earlier
    deletions left at the dict's front, n squared for a turn that brings n new images."""
    for key in list(itertools.islice(entries, max(len(entries) - bound, 0))):
        del entries[key]


def put_newest(entries, items, bound):
    """Put each (key, value) of items in the dict entries as its newest, then drop the oldest
    past bound. Caller holds its lock."""
    for key, value in items:
        entries.pop(key, None)
        entries[key] = value
    drop_oldest(entries, bound)


class DescriptionCache:
    """Image descriptions by image hash: a bounded dict, kept in a JSON-lines file.

    The file is append-only; a torn or corrupt line is skipped. When it holds
    CACHE_REWRITE_FACTOR times the bound, it is rewritten through a temporary file.
    Every write happens under flock() of a lock file, so routers sharing the
    directory neither interleave lines nor drop each other's entries; a lookup that
    misses reads what the others appended since, so none describes an image again.

    load() reads the file at startup; lookup() and store() are what turns use, __len__
    and status() what /status shows. Below them: refresh() reads what was appended
    since (read_records, keeping what is_value accepts); store() appends under
    file_lock(), start_on_new_line() after a torn write, and rewrite() when the file
    has grown; warn() says a file problem once."""

    file_name = CACHE_FILE
    field = "description"           # the field of a record that holds what is kept
    what = "description cache"      # its name in the log

    def __init__(self, directory, max_entries=CACHE_MAX_ENTRIES):
        self.directory = directory
        self.path = os.path.join(directory, self.file_name) if directory else None
        self.max_entries = max_entries
        self.entries = {}              # image hash -> description (a value), oldest first
        self.lock = threading.Lock()   # guards entries, lines, file, offset, hits, misses, warned
        self.lines = 0                 # lines in the file, to know when to rewrite
        self.file = None               # (st_dev, st_ino) of the file read so far
        self.offset = 0                # bytes of it read: where its next line starts
        self.hits = self.misses = 0
        self.warned = set()

    def warn(self, what, error):
        """Log a cache problem once per kind."""
        with self.lock:
            if what in self.warned:
                return
            self.warned.add(what)
        log("! %s: %s (%s); what it holds stays in memory" % (self.what, what, error))

    def read_records(self, f, start):
        """Return ([(hash, description, line)], lines, bad lines, end) for the complete
        lines of f from byte start; end is where the first incomplete one begins.

        A line without its newline is still being written by another router (or was
        torn by a crash, and the next writer starts a fresh line after it)."""
        records, lines, bad, end = [], 0, 0, start
        f.seek(start)
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            lines += 1
            end += len(raw)
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):     # deep nesting is a RecursionError
                record = None
            key = read_typed(record, "hash", str)
            text = record.get(self.field) if key is not None else None
            if key is None or not self.is_value(text):
                bad += 1
                continue
            records.append((key, text, raw))
        return records, lines, bad, end

    def is_value(self, value):
        """True when value, read from the file, is what this cache keeps: a description."""
        return isinstance(value, str)

    def refresh(self):
        """Read the lines appended to the file since the last look, or all of it when it
        was replaced (a rewrite); return how many unreadable lines were skipped."""
        with self.lock:
            seen, offset = self.file, self.offset
        try:
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == seen and info.st_size == offset:
                return 0        # the common case: nothing new, one stat()
            with open(self.path, "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):
                    return 0
                file = (info.st_dev, info.st_ino)
                # Read on from offset only in the same file, and only where a line ended.
                same = file == seen and 0 < offset <= info.st_size \
                    and os.pread(f.fileno(), 1, offset - 1) == b"\n"
                records, lines, bad, end = self.read_records(f, offset if same else 0)
        except FileNotFoundError:
            return 0
        with self.lock:
            put_newest(self.entries, ((key, text) for key, text, _ in records), self.max_entries)
            if (self.file, self.offset) == (seen, offset):  # no other thread read on meanwhile
                self.lines = self.lines + lines if same else lines
                self.file, self.offset = file, end
        return bad

    def load(self):
        """Read the file into memory; return how many descriptions it holds."""
        if not self.path:
            return 0
        try:
            bad = self.refresh()
        except OSError as e:
            self.warn("cannot read %s" % self.path, e)
            return 0
        if bad:
            log("! %s: skipped %d unreadable line(s) in %s" % (self.what, bad, self.path))
        return len(self)

    def lookup(self, keys):
        """Return {key: description} for the keys that have one, counting hits and misses.

        On a miss, first read what other routers sharing the file appended since."""
        keys = set(keys)
        with self.lock:
            missing = self.path and not keys <= self.entries.keys()
        if missing:
            try:
                bad = self.refresh()
            except OSError as e:
                self.warn("cannot read %s" % self.path, e)
            else:
                if bad:     # appended since by another router, or damaged on the disk
                    log("! %s: skipped %d unreadable line(s) in %s" % (self.what, bad, self.path))
        with self.lock:
            found = {k: self.entries[k] for k in keys if k in self.entries}
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def __len__(self):
        with self.lock:
            return len(self.entries)

    def status(self):
        """The cache's part of /status."""
        with self.lock:
            return {"entries": len(self.entries), "hits": self.hits, "misses": self.misses,
                    "file": self.path}

    def store(self, descriptions, model, on_disk=True):
        """Remember {key: description} and append them to the file before returning
        (on_disk False: in memory only)."""
        if not descriptions:
            return
        with self.lock:
            put_newest(self.entries, descriptions.items(), self.max_entries)
        if not self.path or not on_disk:
            return
        now = round(time.time(), 3)
        # ASCII JSON: a model's text may hold a lone surrogate ("\ud800" in its JSON),
        # which has no UTF-8 form; escaped, every line still reads back as it was.
        data = b"".join(json.dumps({"hash": k, self.field: v, "model": model,
                                    "time": now}).encode() + b"\n"
                        for k, v in descriptions.items())
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with self.file_lock():
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    self.start_on_new_line(fd)
                    written = os.write(fd, data)
                    if written != len(data):
                        raise OSError("short write (%d of %d bytes)" % (written, len(data)))
                finally:
                    os.close(fd)
                self.refresh()      # counts the lines, ours and any another router added
                with self.lock:
                    due = self.lines >= self.max_entries * CACHE_REWRITE_FACTOR
                if due:
                    self.rewrite()
        except OSError as e:
            self.warn("cannot write %s" % self.path, e)

    def start_on_new_line(self, fd):
        """After a torn write (disk full, crash) begin on a fresh line, not glued to it."""
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")

    @contextlib.contextmanager
    def file_lock(self):
        """Hold an exclusive flock() on the lock file for a with block."""
        fd = os.open(os.path.join(self.directory, CACHE_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)    # which releases the flock()

    def rewrite(self):
        """Rewrite the file with its newest max_entries lines, as they were written (model
        and time too), private like the file itself. Caller holds the file lock."""
        with open(self.path, "rb") as f:
            records = self.read_records(f, 0)[0]
        newest = {}
        for key, _, raw in records:
            newest.pop(key, None)
            newest[key] = raw
        keep = list(newest.values())[-self.max_entries:]
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)    # a stale temporary file keeps its own mode otherwise
            f.writelines(keep)
            f.flush()
            os.fsync(fd)
            info = os.fstat(fd)
        os.replace(temporary, self.path)
        with self.lock:
            self.lines = len(keep)
            self.file, self.offset = (info.st_dev, info.st_ino), info.st_size


################ Documents: PDF syntax

# Tokens and operators (ISO 32000-1 7.2, 7.3): what turns a PDF's bytes into objects and a
# content stream into operators.

class DocumentError(Exception):
    """A PDF we cannot read; str(error) says why in a few words, fit for a marker."""


class Keyword(str):
    """An operator or other bare word of PDF syntax; names are plain str, strings bytes."""
    __slots__ = ()


class Stream:
    """A stream object: its dictionary and where its raw bytes lie in the file."""
    __slots__ = ("dict", "start", "end", "num", "gen")

    def __init__(self, stream_dict, start, end, num, gen):
        """Remember the stream's dictionary, its byte span and the object that holds it."""
        self.dict, self.start, self.end, self.num, self.gen = stream_dict, start, end, num, gen


# ISO 32000-1 7.2: whitespace, delimiters and regular characters. One regex finds the next
# token; its group number says the kind. A literal string with nested parentheses is
# the one token a regex cannot match, so its opening "(" alone is group 7, read by hand.
# A number has at most 64 digits on either side of its point (real ones have a dozen): with
# "\d+\.?\d*", a run of digits followed by a letter was split between \d+ and \d* every way
# there is before the word matched it, time quadratic in its length (8,000 digits took
# 0.9 s, 200,000 would take ten minutes), and int() of 200,000 digits is quadratic before
# Python 3.11 and an error since. A longer run is a bare word, as a malformed token.
WS = rb"[\x00\t\n\x0c\r ]"                      # PDF's whitespace (ISO 32000-1 7.2.2)
REGULAR = rb"[^\x00\t\n\x0c\r ()<>\[\]{}/%]"     # neither whitespace nor a delimiter
TOKEN_RE = re.compile(
    WS + rb"+|%[^\r\n]*"
    rb"|([+-]?(?:\d{1,64}(?:\.\d{0,64})?|\.\d{1,64}))(?!" + REGULAR + rb")"
    rb"|/(" + REGULAR + rb"*)"
    rb"|\(([^()\\]*(?:\\.[^()\\]*)*)\)"
    rb"|<([0-9A-Fa-f\x00\t\n\x0c\r ]*)>"
    rb"|(<<|>>|\[|\])"
    rb"|(" + REGULAR + rb"+)"
    rb"|(\()|.", re.S)
ESCAPE_RE = re.compile(rb"\\(?:([0-7]{1,3})|(\r\n|\r|\n)|(.))", re.S)
ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}
NAME_ESCAPE_RE = re.compile(rb"#([0-9A-Fa-f]{2})")
INLINE_IMAGE_END_RE = re.compile(WS + rb"EI(?!" + REGULAR + rb")")

# Every content stream operator, made once, so that a page's thousands of operators
# cost a dict lookup each instead of a new object.
KEYWORDS = {word.encode(): Keyword(word) for word in (
    "b B b* B* BDC BI BMC BT BX c cm CS cs d d0 d1 Do DP EI EMC ET EX f F f* G g gs h i ID "
    "j J K k l m M MP n q Q re RG rg ri s S SC sc SCN scn sh T* Tc Td TD Tf Tj TJ TL Tm Tr "
    "Ts Tw Tz v w W W* y ' \" obj endobj stream endstream R [ ] << >> startxref xref "
    "trailer begincmap endcmap usecmap begincodespacerange endcodespacerange beginbfchar "
    "endbfchar beginbfrange endbfrange begincidrange endcidrange begincidchar endcidchar "
    "def dict begin end findresource defineresource pop").split()}
KEYWORDS.update({b"true": True, b"false": False, b"null": None})
NOT_A_KEYWORD = object()


def unescape_string(raw):
    """Return the bytes of a literal string's body, its backslash escapes undone."""
    if b"\\" not in raw:
        return raw
    def unescape(m):
        """One escape's bytes."""
        if m.group(1):
            return bytes([int(m.group(1), 8) & 255])
        return b"" if m.group(2) else ESCAPES.get(m.group(3), m.group(3))
    return ESCAPE_RE.sub(unescape, raw)


def read_literal(data, pos, end=None):
    """Return (string, end) for a literal string with nested parentheses opening before pos,
    read no further than end."""
    depth, i, end = 1, pos, len(data) if end is None else end
    while i < end:
        c = data[i]
        if c == 92:
            i += 1
        elif c == 40:
            depth += 1
        elif c == 41:
            depth -= 1
            if depth == 0:
                return unescape_string(data[pos:i]), i + 1
        i += 1
    return unescape_string(data[pos:end]), end


def hex_string(text):
    """Return the bytes of a hex string's body; an odd last digit counts as followed by 0."""
    try:
        return bytes.fromhex(text.decode("latin-1"))
    except ValueError:
        pass
    digits = re.sub(rb"[^0-9A-Fa-f]", b"", text)
    return bytes.fromhex((digits + b"0" if len(digits) % 2 else digits).decode())


def iter_tokens(data, pos=0, end=None):
    """Yield the tokens of PDF syntax in data from pos (to end, if given).

    Numbers are int or float, names str, strings bytes, true/false/null Python's own,
    and everything else a Keyword (operators, brackets, obj, R)."""
    end = len(data) if end is None else end
    while pos < end:
        for m in TOKEN_RE.finditer(data, pos, end):
            kind = m.lastindex
            if kind == 1:
                text = m.group(1)
                yield float(text) if b"." in text else int(text)
            elif kind == 6:
                word = m.group(6)
                token = KEYWORDS.get(word, NOT_A_KEYWORD)
                yield Keyword(word.decode("latin-1")) if token is NOT_A_KEYWORD else token
                if word == b"ID":
                    # An inline image's bytes are not syntax: skip to its EI.
                    found = INLINE_IMAGE_END_RE.search(data, m.end() + 1, end)
                    pos = found.end() if found else end
                    yield KEYWORDS[b"EI"]
                    break
            elif kind == 3:
                yield unescape_string(m.group(3))
            elif kind == 2:
                name = m.group(2)
                if b"#" in name:
                    name = NAME_ESCAPE_RE.sub(lambda e: bytes.fromhex(e.group(1).decode()), name)
                yield name.decode("latin-1")
            elif kind == 5:
                yield KEYWORDS[m.group(5)]
            elif kind == 4:
                yield hex_string(m.group(4))
            elif kind == 7:
                text, pos = read_literal(data, m.end(), end)
                yield text
                break
        else:
            return


def make_dict(items):
    """Return the dict of a '<<' marker followed by alternating names and values."""
    result = {}
    for i in range(1, len(items) - 1, 2):
        if items[i].__class__ is str:
            result[items[i]] = items[i + 1]
    return result


def iter_operations(data, pos=0, end=None):
    """Yield (operator, operands) for each operator in data from pos, arrays and dicts built.

    References "n g R" become (n, g) tuples. Whatever is left at the end comes as
    (None, operands), so a bare object (in an object stream) reads the same way."""
    operands, stack = [], []
    for token in iter_tokens(data, pos, end):
        if token.__class__ is not Keyword:
            operands.append(token)
        elif token == "[" or token == "<<":
            stack.append(operands)
            operands = [token]
        elif token == "]" or token == ">>":
            if stack:
                items, operands = operands, stack.pop()
                operands.append(make_dict(items) if items[0] == "<<" else items[1:])
        elif token == "R" and len(operands) >= 2 and operands[-1].__class__ is int \
                and operands[-2].__class__ is int:
            generation = operands.pop()
            operands[-1] = (operands[-1], generation)
        elif stack and token not in OBJECT_BOUNDS:
            operands.append(token)
        else:
            # An array or dict still open at "endobj" or the next "obj" was cut short: it
            # ends there, as at the end of the data. Read on, each of a thousand objects
            # "n 0 obj [" parsed to the end of the file (4,000: 31 s), as did each of
            # the "trailer [" a damaged file's trailers are looked for in.
            operands = close_containers(operands, stack)
            yield token, operands
            operands = []
    operands = close_containers(operands, stack)
    if operands:
        yield None, operands


OBJECT_BOUNDS = frozenset(("obj", "endobj", "stream", "endstream", "xref", "trailer", "startxref"))


def close_containers(operands, stack):
    """Return the operands of the outermost level, the arrays and dicts still open in stack
    (each level's operands) closed around operands; empties stack."""
    while stack:
        items, operands = operands, stack.pop()
        operands.append(make_dict(items) if items[0] == "<<" else items[1:])
    return operands


# Content streams are most of the work, and most of their tokens are the numbers of
# path operators no text depends on. So one regex splits a content stream into
# (operands, operator) pairs in C, and only the operands of the operators we interpret
# are read. Each operand pattern ends where its token must end, and the operator may be
# empty, so that the regex never backtracks: a failed match would go back through the
# ways of cutting "12" into "1" and "2", and a run of spaces before a stray ")" would
# cost time quadratic in its length. A string with doubly nested parentheses (which
# the regex skips, so fewer bytes are matched) or an inline image takes the general path.
# A string ends at its ")", or, unbalanced, before a "(" or at the end, so that its pattern
# never fails after a long scan: "\(" after "\(" with no ")" was scanned from each "(" to
# the end, time quadratic in the run (8,000 of them: 4 s). A string cut short that way
# leaves its ")" unmatched, and the general path reads the stream.
# The operands are then read with the same patterns less the whitespace one: findall
# tries each position, and a whitespace token refused after matching made every space of
# a run match the rest of it, time quadratic again (40,000 spaces before "(x) Tj": 17 s).
VALUE_OPERAND = (rb"[+-]?[0-9.]+(?!" + REGULAR + rb")"
                 rb"|/" + REGULAR + rb"*(?!" + REGULAR + rb")"
                 rb"|\([^()\\]*(?:(?:\\.|\([^()\\]*(?:\\.[^()\\]*)*\))[^()\\]*)*"
                 rb"(?:\)|(?=\()|\\?\Z)"
                 rb"|<<|>>|<[^<>]*>|[\[\]]|%[^\r\n]*(?![^\r\n])")
OPERAND = WS + rb"+(?!" + WS + rb")|" + VALUE_OPERAND
OPERATION_RE = re.compile(rb"((?:" + OPERAND + rb")*)(" + REGULAR + rb"*)", re.S)
CONTENT_TOKEN_RE = re.compile(VALUE_OPERAND, re.S)
INLINE_IMAGE_RE = re.compile(rb"(?<!" + REGULAR + rb")BI" + WS + rb"*/")


def iter_content(data, wanted):
    """Yield (operator, operands) for the operators of a content stream that are in wanted."""
    operations = OPERATION_RE.findall(data)
    matched = len(b"".join(map(b"".join, operations)))
    if matched < len(data.rstrip()) or INLINE_IMAGE_RE.search(data):
        yield from ((op, args) for op, args in iter_operations(data)
                    if op is not None and op.encode("latin-1") in wanted)
        return
    for operands, operator in operations:
        if operator in wanted:
            yield KEYWORDS[operator], content_values(CONTENT_TOKEN_RE.findall(operands))


NUMBER_START = frozenset(b"+-.0123456789")


def content_values(tokens):
    """Return the values of content stream tokens, arrays built (dicts are not needed here)."""
    stack, items = [], []
    for token in tokens:
        c = token[0]
        if c in NUMBER_START:
            try:
                items.append(float(token))
            except ValueError:
                continue
        elif c == 40:
            items.append(unescape_string(token[1:-1]))
        elif c == 91:
            stack.append(items)
            items = []
        elif c == 93 and stack:
            items, inner = stack.pop(), items
            items.append(inner)
        elif c == 47:
            items.append(token[1:].decode("latin-1"))
        elif c == 60 and token[1:2] != b"<":
            items.append(hex_string(token[1:-1]))
    while stack:
        items, inner = stack.pop(), items
        items.append(inner)
    return items


def first_value(data, pos=0, end=None):
    """Return the first complete object in data from pos (to end, if given), or None."""
    for _, operands in iter_operations(data, pos, end):
        return operands[0] if operands else None
    return None


################ Documents: filters and encryption

# Stream filters (ISO 32000-1 7.4). Image codecs stay encoded: a JPEG is handed on as
# it is, and the others are formats a vision model does not read. LZW and RunLength,
# last seen in the 1990s, read as empty.
IMAGE_FILTERS = frozenset(("DCTDecode", "DCT", "JPXDecode", "CCITTFaxDecode", "CCF",
                           "JBIG2Decode"))


def inflate(data, limit):
    """Return data inflated, at most limit bytes; what a damaged stream held before its damage."""
    out = []
    size = 0
    for wbits in (15, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            chunk = inflater.decompress(data, limit + 1 - size)
        except zlib.error:
            # Some producers omit the zlib header; others end with garbage. Read the
            # raw deflate, or the part before the damage, as other readers do.
            chunk = partial_inflate(data, limit, wbits)
            if not chunk and wbits == 15:
                continue
        out.append(chunk)
        size += len(chunk)
        break
    if size > limit:
        raise DocumentError("too large once decompressed")
    return b"".join(out)


def partial_inflate(data, limit, wbits):
    """Return what inflates of data before it turns out damaged, in 4 KiB steps."""
    inflater = zlib.decompressobj(wbits)
    out = []
    size = 0
    for start in range(0, len(data), 4096):
        try:
            chunk = inflater.decompress(data[start:start + 4096], limit + 1 - size)
        except zlib.error:
            break
        out.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(out)


def undo_predictor(data, parms):
    """Return data with a PNG or TIFF predictor (ISO 32000-1 7.4.4.4) undone."""
    predictor = parms.get("Predictor", 1)
    if not isinstance(predictor, int) or predictor < 2:
        return data
    if len(data) > PDF_MAX_PREDICTED:
        raise DocumentError("too large once decompressed")
    pixel = max(1, (parms.get("Colors", 1) * parms.get("BitsPerComponent", 8) + 7) // 8)
    width = (parms.get("Colors", 1) * parms.get("BitsPerComponent", 8)
             * parms.get("Columns", 1) + 7) // 8
    # A row is never longer than the data: /Columns 4000000000 made a 16 GB row of zeros.
    width = min(width, len(data))
    if predictor == 2:
        # In place: a bytearray per row of /Columns 1 held 2.6 GB for 30 MB of data.
        out = bytearray(data)
        for start in range(0, len(out), max(width, 1)):
            for i in range(start + pixel, min(start + width, len(out))):
                out[i] = (out[i] + out[i - pixel]) & 255
        return bytes(out)
    out, previous = [], bytearray(width)
    for start in range(0, len(data) - width, width + 1):
        row = png_unfilter(data[start], bytearray(data[start + 1:start + 1 + width]),
                           previous, pixel)
        out.append(row)
        previous = row
    return b"".join(out)


def png_unfilter(kind, row, previous, pixel):
    """Return one PNG scanline with its filter (RFC 2083 6) undone, given the one above."""
    if kind == 2:
        return bytearray((a + b) & 255 for a, b in zip(row, previous))
    for i in range(len(row)):
        left = row[i - pixel] if i >= pixel else 0
        if kind == 1:
            row[i] = (row[i] + left) & 255
        elif kind == 3:
            row[i] = (row[i] + (left + previous[i]) // 2) & 255
        elif kind == 4:
            up, corner = previous[i], previous[i - pixel] if i >= pixel else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            guess = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            row[i] = (row[i] + guess) & 255
    return row


A85_SLICE = 5 << 16     # ASCII85 characters decoded at once: whole groups of five


def decode_filter(name, data, parms, limit):
    """Return data decoded by one stream filter; None for a filter we cannot decode."""
    if name in ("FlateDecode", "Fl"):
        return undo_predictor(inflate(data, limit), parms)
    if name in ("ASCIIHexDecode", "AHx"):
        return hex_string(data.split(b">")[0])
    if name in ("ASCII85Decode", "A85"):
        body = re.sub(rb"\s", b"", data).split(b"~>")[0]
        body = body[2:] if body.startswith(b"<~") else body
        # "z" is four zero bytes: 5 MB of it made 20 MB, past the inflate limit, and
        # a85decode held 456 MB doing so. Spelled out, the groups decode a slice at a time.
        if (len(body) + 4 * body.count(b"z")) * 4 // 5 > limit:
            raise DocumentError("too large once decompressed")
        body = body.replace(b"z", b"!!!!!")
        size, body = len(body) * 4 // 5, body + b"u" * (-len(body) % 5)
        try:
            return b"".join(base64.a85decode(body[i:i + A85_SLICE])
                            for i in range(0, len(body), A85_SLICE))[:size]
        except ValueError:
            return None
    if name == "Crypt":
        return data
    return None


# The standard security handler (ISO 32000-1 7.6.3) with the empty user password: files
# that open without asking and forbid copying. Only RC4 is here; the standard library
# has no AES, so AES files get a marker.
PASSWORD_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def rc4(key, data):
    """Return data encrypted or decrypted with RC4 under key."""
    state = list(range(256))
    j = 0
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) & 255
        state[i], state[j] = state[j], state[i]
    stream = bytearray(len(data))
    i = j = 0
    for n in range(len(data)):
        i = (i + 1) & 255
        j = (j + state[i]) & 255
        state[i], state[j] = state[j], state[i]
        stream[n] = state[(state[i] + state[j]) & 255]
    mixed = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(len(data), "big")


def empty_password_key(encrypt, first_id):
    """Return the RC4 file key for the empty user password, or None if it needs another.

    ISO 32000-1 7.6.3.3 algorithm 2 makes the key; algorithms 4 and 5 check it against U."""
    revision = encrypt.get("R", 2)
    length = 5 if revision == 2 else encrypt.get("Length", 40) // 8
    if encrypt.get("V") == 4:
        length = 16
    owner, user = encrypt.get("O", b""), encrypt.get("U", b"")
    permissions = (encrypt.get("P", 0) & 0xFFFFFFFF).to_bytes(4, "little")
    digest = hashlib.md5(PASSWORD_PAD + owner[:32] + permissions + first_id)
    if revision >= 4 and encrypt.get("EncryptMetadata") is False:
        digest.update(b"\xff\xff\xff\xff")
    key = digest.digest()[:length]
    if revision >= 3:
        for _ in range(50):
            key = hashlib.md5(key).digest()[:length]
    if revision == 2:
        return key if rc4(key, PASSWORD_PAD) == user[:32] else None
    check = rc4(key, hashlib.md5(PASSWORD_PAD + first_id).digest())
    for i in range(1, 20):
        check = rc4(bytes(k ^ i for k in key), check)
    return key if check == user[:16] else None


def encryption_problem(encrypt):
    """Return why a file's encryption is beyond us in a few words, or None if it is RC4."""
    if encrypt.get("Filter") != "Standard":
        return "encrypted for named recipients"
    if encrypt.get("V", 0) >= 5:
        return "AES encryption is not supported"
    if encrypt.get("V") == 4:
        filters = encrypt.get("CF") if isinstance(encrypt.get("CF"), dict) else {}
        for name in (encrypt.get("StmF"), encrypt.get("StrF")):
            method = filters.get(name).get("CFM") if isinstance(filters.get(name), dict) else None
            if method in ("AESV2", "AESV3"):
                return "AES encryption is not supported"
    return None


def decrypt_strings(value, key):
    """Return value with every string in it decrypted under the object's key."""
    if value.__class__ is bytes:
        return rc4(key, value)
    if value.__class__ is list:
        return [decrypt_strings(item, key) for item in value]
    if value.__class__ is dict:
        return {name: decrypt_strings(item, key) for name, item in value.items()}
    return value


################ Documents: PDF objects

# A PDF's objects found through its cross-reference sections (ISO 32000-1 7.5), and its
# page tree (7.7.3).

OBJECT_HEAD_RE = re.compile(WS + rb"*(\d+)" + WS + rb"+(\d+)" + WS + rb"+obj")
OBJECT_SCAN_RE = re.compile(rb"(?<![0-9])(\d{1,10})" + WS + rb"+(\d{1,5})" + WS + rb"+obj\b")
STREAM_START_RE = re.compile(rb"stream(?:\r\n|\n|\r(?!\n))?")
XREF_SUBSECTION_RE = re.compile(WS + rb"*(\d+)" + WS + rb"+(\d+)(?=" + WS + rb"+\d{3})")
XREF_ENTRY_RE = re.compile(WS + rb"*(\d{1,10})" + WS + rb"+(\d{1,5})" + WS + rb"+([nf])")
BROKEN = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
          OverflowError, ZeroDivisionError, StopIteration)


class PdfFile:
    """A PDF's objects, read lazily through its cross-reference data, and decrypted.

    __init__ reads the cross-reference sections (read_xref_chain: read_xref_table and
    read_xref_stream, newest first along /Prev), or, when they are broken, scans for
    "n g obj" (scan_objects, find_trailer, register_object_stream); then
    setup_encryption finds the key, and object_key derives each object's.
    resolve/get/fetch give objects, read by object_at and make_stream, or from an
    object stream by object_stream and object_in_stream; stream_data decodes a stream
    against the inflate budget, spend_content and spend_codes count what is run;
    iter_pages walks the page tree, page_count says what it claims."""

    def __init__(self, data, max_inflate=PDF_MAX_INFLATE, max_content=PDF_MAX_CONTENT,
                 max_codes=PDF_MAX_FONT_CODES):
        """Read the cross-reference data and the encryption of the PDF in data."""
        if b"%PDF" not in data[:1024]:
            raise DocumentError("not a PDF")
        self.data, self.budget = data, max_inflate
        # Inflating is bounded above, but running what was inflated is work too: a
        # 3 KB file whose 2,000 pages each run a tiny self-drawing form 2,000 times, or
        # run one 126 KB content stream of "(a) Tj", took minutes; a thousand fonts
        # sharing one 200,000-code CMap held gigabytes.
        self.content_left, self.codes_left = max_content, max_codes
        self.xref, self.trailer, self.objects, self.object_streams = {}, {}, {}, {}
        self.pending, self.scanned, self.key, self.encrypt_num = set(), None, None, None
        try:
            self.read_xref_chain()
        except (DocumentError, *BROKEN):
            self.xref, self.trailer = {}, {}
        # The key before the catalog: a catalog in an object stream is read decrypted.
        self.setup_encryption()
        if not isinstance(self.resolve(self.trailer.get("Root")), dict):
            scanned = self.scan_objects()
            self.xref, self.trailer = dict(scanned), {}
            self.objects, self.object_streams = {}, {}
            self.find_trailer()
            if self.key is None and self.setup_encryption():
                # The object streams found before the key was known are read again.
                self.xref = scanned
                self.find_trailer()
        if not isinstance(self.resolve(self.trailer.get("Root")), dict):
            raise DocumentError("damaged: no cross-reference table" if not self.xref
                                else "damaged: no document catalog")

    def read_xref_chain(self):
        """Read every cross-reference section from the last startxref back along /Prev."""
        at = self.data.rfind(b"startxref")
        offset = first_value(self.data, at + 9) if at >= 0 else None
        seen = set()
        while isinstance(offset, int) and offset not in seen and len(seen) < 64:
            seen.add(offset)
            if self.data.startswith(b"xref", offset):
                trailer = self.read_xref_table(offset + 4)
                if isinstance(trailer.get("XRefStm"), int):
                    self.read_xref_stream(trailer["XRefStm"])
            else:
                trailer = self.read_xref_stream(offset)
            for name, value in trailer.items():
                self.trailer.setdefault(name, value)
            offset = trailer.get("Prev")

    def read_xref_table(self, pos):
        """Read one cross-reference table at pos; return its trailer dictionary."""
        while True:
            section = XREF_SUBSECTION_RE.match(self.data, pos)
            if not section:
                break
            start, count = int(section.group(1)), int(section.group(2))
            pos = section.end()
            for num in range(start, start + count):
                entry = XREF_ENTRY_RE.match(self.data, pos)
                if not entry:
                    raise ValueError("short cross-reference table")
                pos = entry.end()
                if entry.group(3) == b"n":
                    self.xref.setdefault(num, (1, int(entry.group(1)), int(entry.group(2))))
        at = self.data.find(b"trailer", pos)
        trailer = first_value(self.data, at + 7) if at >= 0 else None
        return trailer if isinstance(trailer, dict) else {}

    def read_xref_stream(self, offset):
        """Read one cross-reference stream at offset; return its dictionary."""
        stream = self.object_at(offset, None)
        if not isinstance(stream, Stream):
            raise ValueError("no cross-reference stream")
        info, rows = stream.dict, self.stream_data(stream)
        widths = [w if isinstance(w, int) else 0 for w in info.get("W", [])][:3]
        size = sum(widths)
        index = info.get("Index") or [0, info.get("Size", 0)]
        pos = 0
        for first, count in zip(index[0::2], index[1::2]) if size else ():
            # Bounded by the rows left, not all of them: each of a thousand /Index pairs
            # read the whole table again (40 pairs of 100,000 in an 817-byte file: 2.6 s).
            for num in range(first, first + min(count, (len(rows) - pos) // size)):
                fields, pos = [], pos
                for width in widths:
                    fields.append(int.from_bytes(rows[pos:pos + width], "big"))
                    pos += width
                kind = fields[0] if widths[0] else 1
                if kind in (1, 2):
                    self.xref.setdefault(num, (kind, fields[1], fields[2]))
        return info

    def scan_objects(self):
        """Return cross-reference entries found by scanning for "n g obj"; the last one wins."""
        found = {}
        for m in OBJECT_SCAN_RE.finditer(self.data):
            found[int(m.group(1))] = (1, m.start(), int(m.group(2)))
        return found

    def find_trailer(self):
        """Rebuild the trailer of a file with broken cross-references from what it holds."""
        at = following = len(self.data)
        while (at := self.data.rfind(b"trailer", 0, at)) >= 0:
            trailer = first_value(self.data, at + 7, following)    # not into the next one
            following = at
            for name, value in (trailer.items() if isinstance(trailer, dict) else ()):
                self.trailer.setdefault(name, value)
        for num in sorted(self.xref, reverse=True):
            value = self.fetch(num)
            info = value.dict if isinstance(value, Stream) else value
            if isinstance(value, Stream) and info.get("Type") == "ObjStm":
                self.register_object_stream(num, value)
            elif isinstance(value, Stream) and info.get("Type") == "XRef":
                for name in ("Root", "Encrypt", "ID", "Info"):
                    self.trailer.setdefault(name, info.get(name))
            elif isinstance(info, dict) and info.get("Type") == "Catalog":
                self.trailer.setdefault("Root", (num, 0))

    def register_object_stream(self, num, stream):
        """Add the objects of an object stream that no scanned object overrides."""
        header = self.object_stream(num, stream)[1]
        for index, (contained, _) in enumerate(header):
            self.xref.setdefault(contained, (2, num, index))

    def setup_encryption(self):
        """Find the file key for an encrypted file (True once it is set), or raise why not."""
        encrypt = self.resolve(self.trailer.get("Encrypt"))
        if not isinstance(encrypt, dict):
            return
        if isinstance(self.trailer.get("Encrypt"), tuple):
            self.encrypt_num = self.trailer["Encrypt"][0]
        problem = encryption_problem(encrypt)
        if problem:
            raise DocumentError(problem)
        ids = self.resolve(self.trailer.get("ID"))
        first_id = ids[0] if isinstance(ids, list) and ids and isinstance(ids[0], bytes) else b""
        self.key = empty_password_key(encrypt, first_id)
        if self.key is None:
            raise DocumentError("encrypted")
        # Objects already read were read before the key was known.
        self.objects = {n: value for n, value in self.objects.items() if n == self.encrypt_num}
        self.object_streams = {}
        return True

    def spend_content(self, size):
        """Count a content stream of size bytes as run; raise DocumentError past the allowance."""
        self.content_left -= max(size, PDF_RUN_COST)
        if self.content_left < 0:
            raise DocumentError("too much to read: its pages run over %s MB of content" % format(
                PDF_MAX_CONTENT >> 20, ","))

    def spend_codes(self, count):
        """Count codes a font defines; raise DocumentError past the allowance."""
        self.codes_left -= count
        if self.codes_left < 0:
            raise DocumentError("too much to read: its fonts define over %s codes" % format(
                PDF_MAX_FONT_CODES, ","))

    def object_key(self, num, gen):
        """Return the RC4 key of one object (ISO 32000-1 7.6.2 algorithm 1)."""
        digest = hashlib.md5(self.key + num.to_bytes(3, "little") + gen.to_bytes(2, "little"))
        return digest.digest()[:min(len(self.key) + 5, 16)]

    def resolve(self, value):
        """Return value with references followed, or None for a dangling one."""
        for _ in range(PDF_MAX_DEPTH):
            if value.__class__ is not tuple:
                return value
            value = self.fetch(value[0])
        return None

    def get(self, holder, name, default=None):
        """Return holder[name] resolved when holder is a dict (or a stream's), else default."""
        if isinstance(holder, Stream):
            holder = holder.dict
        value = self.resolve(holder.get(name)) if isinstance(holder, dict) else None
        return default if value is None else value

    def fetch(self, num):
        """Return object num, read once and kept; None if it is missing or unreadable."""
        if num in self.objects:
            return self.objects[num]
        if num in self.pending or num not in self.xref:
            return None
        self.pending.add(num)
        try:
            kind, where, which = self.xref[num]
            if kind == 2:
                value = self.object_in_stream(where, which, num)
            else:
                value = self.object_at(where, num)
                if value is None and self.scanned is None:
                    self.scanned = self.scan_objects()
                if value is None and self.scanned.get(num, (0, where))[1] != where:
                    value = self.object_at(self.scanned[num][1], num)
        except BROKEN:
            value = None
        finally:
            self.pending.discard(num)
        self.objects[num] = value
        return value

    def object_at(self, offset, num):
        """Return the object whose "num gen obj" is at offset (any number when num is None)."""
        head = OBJECT_HEAD_RE.match(self.data, offset)
        if not head or (num is not None and int(head.group(1)) != num):
            return None
        num, gen = int(head.group(1)), int(head.group(2))
        # Read no further than the next object: each of 4,000 objects "n 0 obj (" read a
        # string to the end of the file (5.5 s, 16 times 1,000's).
        following = OBJECT_SCAN_RE.search(self.data, head.end())
        for operator, operands in iter_operations(self.data, head.end(),
                                                  following.start() if following else None):
            value = operands[0] if operands else None
            if operator == "stream" and isinstance(value, dict):
                return self.make_stream(value, head.end(), num, gen)
            if self.key and num != self.encrypt_num:
                value = decrypt_strings(value, self.object_key(num, gen))
            return value
        return None

    def make_stream(self, info, pos, num, gen):
        """Return the Stream whose dictionary info ends before the "stream" keyword after pos."""
        start = STREAM_START_RE.search(self.data, pos).end()
        length = self.resolve(info.get("Length"))
        end = start + length if isinstance(length, int) and length >= 0 else -1
        if end < 0 or b"endstream" not in self.data[end:end + 32]:
            # A wrong /Length is common: trust the endstream keyword instead.
            end = self.data.find(b"endstream", start)
            end = len(self.data) if end < 0 else end
            end -= 2 if self.data[end - 2:end] == b"\r\n" else self.data[end - 1] in b"\n\r"
        if self.key:
            info = decrypt_strings(info, self.object_key(num, gen))
        return Stream(info, start, end, num, gen)

    def object_stream(self, num, stream):
        """Return (data, [(object number, offset)], {object number: its index}) of object
        stream num, keeping the last few."""
        if num not in self.object_streams:
            data = self.stream_data(stream)
            first = self.get(stream, "First", 0)
            numbers = [n for n in iter_tokens(data[:first]) if n.__class__ is int]
            header = [(numbers[i], first + numbers[i + 1]) for i in range(0, len(numbers) - 1, 2)]
            # Looked up by number, not by a scan of the header per object: cross-reference
            # entries with wrong indexes made reading each object cost the whole stream's count.
            indexes = {}
            for index, (contained, _) in enumerate(header):
                indexes.setdefault(contained, index)
            if len(self.object_streams) >= 4:
                self.object_streams.pop(next(iter(self.object_streams)))
            self.object_streams[num] = (data, header, indexes)
        return self.object_streams[num]

    def object_in_stream(self, stream_num, index, num):
        """Return object num, the index-th object of object stream stream_num."""
        stream = self.fetch(stream_num)
        if not isinstance(stream, Stream):
            return None
        data, header, indexes = self.object_stream(stream_num, stream)
        if index >= len(header) or header[index][0] != num:
            index = indexes.get(num)
            if index is None:
                return None
        end = header[index + 1][1] if index + 1 < len(header) else len(data)
        return first_value(data[header[index][1]:end])

    def stream_data(self, stream, image=False):
        """Return a stream's bytes, decoded; with image, (bytes, image filter or None).

        Decoding stops at an image filter: a JPEG stays a JPEG. Without image, a stream
        that needs one (or an unknown filter) reads as empty."""
        data = self.data[stream.start:stream.end]
        self.budget -= len(data)    # a form run a thousand times costs as much unfiltered
        if self.budget < 0:
            raise DocumentError("too large once decompressed")
        if self.key and stream.dict.get("Type") != "XRef":
            data = rc4(self.object_key(stream.num, stream.gen), data)
        filters = self.get(stream, "Filter", [])
        parms = self.get(stream, "DecodeParms", self.get(stream, "DP", []))
        filters = filters if isinstance(filters, list) else [filters]
        parms = parms if isinstance(parms, list) else [parms] * len(filters)
        for i, name in enumerate(self.resolve(f) for f in filters):
            if name in IMAGE_FILTERS:
                return (data, name) if image else b""
            limit = max(0, min(PDF_MAX_STREAM_BYTES, self.budget))
            options = self.resolve(parms[i]) if i < len(parms) else None
            options = options if isinstance(options, dict) else {}
            if image:
                # PNG predictors are PNG's own filters: the page image keeps them.
                options = {k: v for k, v in options.items() if k != "Predictor"}
            data = decode_filter(name, data, options, limit)
            if data is None:
                return (b"", None) if image else b""
            if isinstance(options.get("Predictor"), int) and options["Predictor"] >= 2:
                self.spend_content(len(data))   # a predictor is undone a byte at a time
            self.budget -= len(data)
            if self.budget < 0:
                raise DocumentError("too large once decompressed")
        return (data, None) if image else data

    def iter_pages(self, limit=PDF_MAX_PAGES):
        """Yield (page dict, resources) in page order, Resources inherited (ISO 32000-1 7.7.3.4)."""
        root = self.get(self.trailer, "Root", {})
        stack = [(self.get(root, "Pages", {}), {}, 0)]
        seen, count = set(), 0
        while stack and count < limit:
            node, resources, depth = stack.pop()
            if not isinstance(node, dict) or id(node) in seen or depth > 2 * PDF_MAX_DEPTH:
                continue
            seen.add(id(node))
            resources = self.get(node, "Resources", resources)
            kids = self.get(node, "Kids")
            if node.get("Type") == "Page" or not isinstance(kids, list) and "Contents" in node:
                count += 1
                yield node, resources
            else:
                stack.extend((self.resolve(kid), resources, depth + 1) for kid in reversed(kids))

    def page_count(self):
        """Return the page count the page tree claims."""
        count = self.get(self.get(self.get(self.trailer, "Root", {}), "Pages", {}), "Count", 0)
        return count if isinstance(count, int) else 0


################ Documents: fonts

# How a font's codes become text and widths (ISO 32000-1 9.5-9.10).

# Glyph names (Adobe Glyph List) for what producers draw besides letters and digits,
# whose names are themselves. Accented letters are composed from ACCENTS below, and
# uniXXXX/uXXXXXX names carry their code points.
GLYPH_NAMES = {
    "space": " ", "exclam": "!", "quotedbl": '"', "numbersign": "#", "dollar": "$",
    "percent": "%", "ampersand": "&", "quotesingle": "'", "quoteright": "\u2019",
    "parenleft": "(", "parenright": ")", "asterisk": "*", "plus": "+", "comma": ",",
    "hyphen": "-", "period": ".", "slash": "/", "zero": "0", "one": "1", "two": "2",
    "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "colon": ":", "semicolon": ";", "less": "<", "equal": "=", "greater": ">",
    "question": "?", "at": "@", "bracketleft": "[", "backslash": "\\", "bracketright": "]",
    "asciicircum": "^", "underscore": "_", "quoteleft": "\u2018", "grave": "`",
    "braceleft": "{", "bar": "|", "braceright": "}", "asciitilde": "~", "exclamdown": "\u00a1",
    "cent": "\u00a2", "sterling": "\u00a3", "fraction": "\u2044", "yen": "\u00a5",
    "florin": "\u0192", "section": "\u00a7", "currency": "\u00a4", "quotedblleft": "\u201c",
    "guillemotleft": "\u00ab", "guilsinglleft": "\u2039", "guilsinglright": "\u203a",
    "fi": "fi", "fl": "fl", "ff": "ff", "ffi": "ffi", "ffl": "ffl", "endash": "\u2013",
    "emdash": "\u2014", "dagger": "\u2020", "daggerdbl": "\u2021", "periodcentered": "\u00b7",
    "paragraph": "\u00b6", "bullet": "\u2022", "quotesinglbase": "\u201a",
    "quotedblbase": "\u201e", "quotedblright": "\u201d", "guillemotright": "\u00bb",
    "ellipsis": "\u2026", "perthousand": "\u2030", "questiondown": "\u00bf", "acute": "\u00b4",
    "circumflex": "\u02c6", "tilde": "\u02dc", "macron": "\u00af", "breve": "\u02d8",
    "dotaccent": "\u02d9", "dieresis": "\u00a8", "ring": "\u02da", "cedilla": "\u00b8",
    "hungarumlaut": "\u02dd", "ogonek": "\u02db", "caron": "\u02c7", "AE": "\u00c6",
    "ae": "\u00e6", "OE": "\u0152", "oe": "\u0153", "Oslash": "\u00d8", "oslash": "\u00f8",
    "Lslash": "\u0141", "lslash": "\u0142", "dotlessi": "\u0131", "germandbls": "\u00df",
    "ordfeminine": "\u00aa", "ordmasculine": "\u00ba", "Eth": "\u00d0", "eth": "\u00f0",
    "Thorn": "\u00de", "thorn": "\u00fe", "minus": "\u2212", "multiply": "\u00d7",
    "divide": "\u00f7", "degree": "\u00b0", "copyright": "\u00a9", "registered": "\u00ae",
    "trademark": "\u2122", "plusminus": "\u00b1", "onehalf": "\u00bd", "onequarter": "\u00bc",
    "threequarters": "\u00be", "onesuperior": "\u00b9", "twosuperior": "\u00b2",
    "threesuperior": "\u00b3", "mu": "\u00b5", "logicalnot": "\u00ac", "brokenbar": "\u00a6",
    "nbspace": "\u00a0", "sfthyphen": "\u00ad", "Euro": "\u20ac", "Delta": "\u2206",
    "Omega": "\u2126", "quotereversed": "\u201b", "visiblespace": "\u2423",
    "dotlessj": "\u0237", "ff_i": "ffi", "ff_l": "ffl", "afii61289": "\u2113",
}
ACCENTS = {
    "acute": "\u0301", "grave": "\u0300", "circumflex": "\u0302", "dieresis": "\u0308",
    "tilde": "\u0303", "ring": "\u030a", "cedilla": "\u0327", "caron": "\u030c",
    "macron": "\u0304", "breve": "\u0306", "ogonek": "\u0328", "dotaccent": "\u0307",
    "hungarumlaut": "\u030b", "commaaccent": "\u0326",
}
GLYPH_CODE_RE = re.compile(r"(?:uni((?:[0-9A-F]{4})+)|u([0-9A-F]{4,6}))$")
# Ligatures spelled out, so that words are found; U+FFFD is what some producers map
# glyphs they could not name to, and says nothing.
LIGATURES = {0xFB00: "ff", 0xFB01: "fi", 0xFB02: "fl", 0xFB03: "ffi", 0xFB04: "ffl",
             0xFB05: "st", 0xFB06: "st", 0xFFFD: None}

# StandardEncoding (ISO 32000-1 D.2) above ASCII, as runs of (first code, characters).
STANDARD_HIGH = (
    (0xA1, "\u00a1\u00a2\u00a3\u2044\u00a5\u0192\u00a7\u00a4'\u201c\u00ab\u2039\u203a\ufb01\ufb02"),
    (0xB1, "\u2013\u2020\u2021\u00b7"), (0xB6, "\u00b6\u2022\u201a\u201e\u201d\u00bb\u2026\u2030"),
    (0xBF, "\u00bf"), (0xC1, "`\u00b4\u02c6\u02dc\u00af\u02d8\u02d9\u00a8"), (0xCA, "\u02da\u00b8"),
    (0xCD, "\u02dd\u02db\u02c7\u2014"), (0xE1, "\u00c6"), (0xE3, "\u00aa"),
    (0xE8, "\u0141\u00d8\u0152\u00ba"), (0xF1, "\u00e6"), (0xF5, "\u0131"),
    (0xF8, "\u0142\u00f8\u0153\u00df"))


def glyph_text(name):
    """Return the text a glyph name stands for, or None if the name says nothing."""
    if not isinstance(name, str):
        return None
    if name in GLYPH_NAMES:
        return GLYPH_NAMES[name]
    base = name.split(".")[0]
    if "_" in base:
        parts = [glyph_text(part) for part in base.split("_")]
        return "".join(parts) if all(parts) else None
    if len(base) == 1 and base.isalnum():
        return base
    code = GLYPH_CODE_RE.match(base)
    if code and code.group(1):
        digits = code.group(1)
        return "".join(chr(int(digits[i:i + 4], 16)) for i in range(0, len(digits), 4))
    if code:
        return chr(min(int(code.group(2), 16), 0x10FFFF))
    if len(base) > 1 and base[1:] in ACCENTS and base[0].isalpha():
        return unicodedata.normalize("NFC", base[0] + ACCENTS[base[1:]])
    if base != name or base == "":
        return glyph_text(base) if base else None
    try:
        return unicodedata.lookup(("GREEK CAPITAL LETTER " if base[0].isupper()
                                   else "GREEK SMALL LETTER ") + base.upper())
    except KeyError:
        return None


def base_encoding(name):
    """Return the 256 texts of a base encoding (WinAnsi, MacRoman, else Standard)."""
    if name in ("WinAnsiEncoding", "MacRomanEncoding"):
        codec = "cp1252" if name == "WinAnsiEncoding" else "mac_roman"
        table = [bytes([c]).decode(codec, "ignore") if c >= 32 else "" for c in range(256)]
        table[0x7F] = ""
        return table
    table = [chr(c) if 32 <= c < 127 else "" for c in range(256)]
    table[0x27], table[0x60] = "\u2019", "\u2018"
    for first, characters in STANDARD_HIGH:
        table[first:first + len(characters)] = characters
    return table


def utf16_text(code):
    """Return the text of a CMap destination: UTF-16BE bytes, or a single byte."""
    if len(code) == 1:
        return chr(code[0])
    return code.decode("utf-16-be", "ignore").replace("\x00", "")


def parse_cmap(data):
    """Return (codespace ranges, {code: text}, {code: CID}) of a CMap (Adobe TN 5014, 5411)."""
    spaces, texts, cids = [], {}, {}
    for operator, operands in iter_operations(data):
        if operator == "endcodespacerange":
            spaces += [(lo, hi) for lo, hi in zip(operands[0::2], operands[1::2])
                       if lo.__class__ is bytes and hi.__class__ is bytes and len(lo) == len(hi)]
        elif operator in ("endbfchar", "endcidchar"):
            target = texts if operator == "endbfchar" else cids
            for code, value in zip(operands[0::2], operands[1::2]):
                if code.__class__ is bytes:
                    target[int.from_bytes(code, "big")] = (
                        glyph_text(value) if value.__class__ is str else
                        utf16_text(value) if value.__class__ is bytes else value)
        elif operator in ("endbfrange", "endcidrange"):
            for lo, hi, value in zip(operands[0::3], operands[1::3], operands[2::3]):
                if lo.__class__ is bytes and hi.__class__ is bytes:
                    add_cmap_range(texts if operator == "endbfrange" else cids,
                                   int.from_bytes(lo, "big"), int.from_bytes(hi, "big"), value)
        if len(texts) + len(cids) > PDF_MAX_CMAP_ENTRIES:
            break
    return spaces, texts, cids


def add_cmap_range(target, lo, hi, value):
    """Add one bfrange or cidrange: lo..hi map to value counting up, or to a list's items."""
    hi = min(hi, lo + 65535)
    if value.__class__ is list:
        for code, item in zip(range(lo, hi + 1), value):
            if item.__class__ is bytes:
                target[code] = utf16_text(item)
    elif value.__class__ is int:
        for code in range(lo, hi + 1):
            target[code] = value + code - lo
    elif value.__class__ is bytes and value:
        first, size = int.from_bytes(value, "big"), len(value)
        for code in range(lo, hi + 1):
            target[code] = utf16_text((first + code - lo).to_bytes(size, "big", signed=False)
                                      if first + code - lo < 256 ** size else value)


def cid_widths(array):
    """Return {CID: width} of a CIDFont's W array (ISO 32000-1 9.7.4.3)."""
    widths, i = {}, 0
    while i + 1 < len(array) and len(widths) < PDF_MAX_CMAP_ENTRIES:
        first, item = array[i], array[i + 1]
        if isinstance(item, list):
            widths.update((first + n, w) for n, w in enumerate(item) if isinstance(w, (int, float)))
            i += 2
        elif i + 2 < len(array) and isinstance(first, int) and isinstance(item, int):
            widths.update((cid, array[i + 2]) for cid in range(first, min(item, first + 65535) + 1))
            i += 3
        else:
            break
    return widths


TYPE1_ENCODING_RE = re.compile(
    rb"dup" + WS + rb"+(\d+)" + WS + rb"*/(" + REGULAR + rb"+)" + WS + rb"+put")


def builtin_encoding(doc, font):
    """Return the 256 texts of the encoding a Type 1 font program defines (else Standard).

    TeX's Computer Modern fonts come this way, with neither Encoding nor ToUnicode."""
    program = doc.get(doc.get(font, "FontDescriptor", {}), "FontFile")
    if not isinstance(program, Stream):
        return base_encoding("StandardEncoding")
    text = doc.stream_data(program)
    text = text[:doc.get(program, "Length1", len(text))]
    if b"/Encoding StandardEncoding" in text:
        return base_encoding("StandardEncoding")
    table = [""] * 256
    for m in TYPE1_ENCODING_RE.finditer(text):
        if int(m.group(1)) < 256:
            table[int(m.group(1))] = glyph_text(m.group(2).decode("latin-1")) or ""
    return table


def simple_encoding(doc, font):
    """Return the 256 texts of a one-byte font's Encoding: a base encoding and Differences."""
    encoding = doc.get(font, "Encoding")
    base = encoding if isinstance(encoding, str) else doc.get(encoding, "BaseEncoding")
    table = base_encoding(base) if isinstance(base, str) else builtin_encoding(doc, font)
    code = 0
    for item in doc.get(encoding, "Differences", []):
        if isinstance(item, int):
            code = item
        elif 0 <= code < 256:
            table[code] = glyph_text(item) or ""
            code += 1
    return table


# The standard 14 fonts may come without Widths. Their widths of ASCII 32-126 (Adobe's
# AFM files), each as chr(round(width / 10) + 23); italics differ little from upright.
STANDARD_WIDTHS = {
    "Helvetica": ("33;OOpZ-88>Q3833OOOOOOOOOO33QQQO}ZZ__ZTe_3IZOj_e"
                 "Ze_ZT_ZuZZT333FO-OOIOO3OO--I-jOOOO8I3OI_III818Q"),
    "Helvetica-Bold": ("38FOOp_388>Q3833OOOOOOOOOO88QQQTy____ZTe_3O_Tj_e"
                      "Ze_ZT_ZuZZT838QO3OTOTO8TT33O3pTTTT>O8TOeOOI>3>Q"),
    "Times-Roman": ("08@IIje888IO0803IIIIIIIIII33OOOCs_ZZ_TO__8>_Tp__"
                   "O_ZOT__u__T838FI8CICIC8II33I3eIIII8>3II_IICG+GM"),
    "Times-Bold": ("08OII{j888IP0803IIIIIIIIII88PPPIt_Z__ZTee>IeZu_e"
                  "Te_OZ__{__Z838QI8IOCOC8IO38O3jOIOOC>8OI_IIC>->K"),
}


def standard_widths(base_font):
    """Return the 256 widths (in text space units per point) of a standard 14 font."""
    if "Courier" in base_font:
        return [0.6] * 256
    family = "Times" if "Times" in base_font else "Helvetica" if "Helvetica" in base_font \
        or "Arial" in base_font else None
    if family is None:
        return [0.25 if c == 32 else 0.5 for c in range(256)]
    table = STANDARD_WIDTHS[family + ("-Bold" if "Bold" in base_font else
                                      "-Roman" if family == "Times" else "")]
    return [0.5] * 32 + [(ord(c) - 23) * 0.01 for c in table] + [0.5] * 129


class CodeMap(dict):
    """A dict whose missing keys read as its default: a code without text or width."""

    def __init__(self, items, default):
        """Hold items, and default for every other key."""
        super().__init__(items)
        self.default = default

    def __missing__(self, key):
        """Return the default for a key not held."""
        return self.default


class Font:
    """What one PDF font makes of a string: its text, its width, how many codes and spaces."""

    def __init__(self, doc, font):
        """Read a font dictionary: its code length, Unicode mapping and widths."""
        self.subtype = doc.get(font, "Subtype")
        to_unicode = doc.get(font, "ToUnicode")
        texts = parse_cmap(doc.stream_data(to_unicode))[1] if isinstance(to_unicode, Stream) else {}
        self.composite = self.subtype == "Type0"
        self.ranges, self.cids, self.utf16 = None, None, False
        self.code_size = 2 if self.composite else 1
        # A font costs its 256 one-byte codes at least: 20,000 fonts of no codes, in a 2 MB
        # file, held 290 MB (the most fonts any file of the test corpus has is 123).
        if self.composite:
            self.read_composite(doc, font, texts)
            doc.spend_codes(256 + len(texts) + len(self.widths) + len(self.cids or ()))
        else:
            self.read_simple(doc, font, texts)
            doc.spend_codes(256 + len(texts))

    def read_simple(self, doc, font, texts):
        """Read a one-byte font: ToUnicode, else Encoding and Differences; Widths, FirstChar."""
        table = simple_encoding(doc, font)
        for code, text in texts.items():
            if 0 <= code < 256:
                table[code] = text
        self.translate = dict(enumerate(table))
        scale = 0.001
        if self.subtype == "Type3":
            matrix = doc.get(font, "FontMatrix", [0.001])
            scale = matrix[0] if isinstance(matrix[0], (int, float)) else 0.001
        missing = doc.get(doc.get(font, "FontDescriptor", {}), "MissingWidth", 0)
        widths = doc.get(font, "Widths")
        if not isinstance(widths, list):
            self.widths = standard_widths(str(doc.get(font, "BaseFont", "")))
            return
        first = doc.get(font, "FirstChar", 0)
        self.widths = [missing * scale] * 256
        for code, width in enumerate(widths, first if isinstance(first, int) else 0):
            width = doc.resolve(width)
            if 0 <= code < 256 and isinstance(width, (int, float)):
                self.widths[code] = width * scale

    def read_composite(self, doc, font, texts):
        """Read a Type0 font: its CMap (Identity, UCS-2 or embedded) and its CIDFont's W and DW."""
        descendants = doc.get(font, "DescendantFonts", [])
        cid_font = doc.resolve(descendants[0]) if descendants else {}
        widths = cid_widths(doc.get(cid_font, "W", []))
        self.widths = CodeMap({cid: w * 0.001 for cid, w in widths.items()},
                              doc.get(cid_font, "DW", 1000) * 0.001)
        self.texts = CodeMap(texts, "")
        encoding = doc.get(font, "Encoding")
        if isinstance(encoding, Stream):
            ranges, _, cids = parse_cmap(doc.stream_data(encoding))
            self.cids = CodeMap(cids, 0)
            self.ranges = None if all(len(lo) == 2 for lo, _ in ranges) else ranges
            self.code_size = 2 if self.ranges is None else 1 << 30
        elif isinstance(encoding, str) and ("UCS2" in encoding or "UTF16" in encoding):
            self.utf16 = not texts  # the codes are Unicode themselves

    def codes(self, string):
        """Return the character codes of a string shown in this composite font."""
        if self.ranges is None:
            codes = array.array("H", string[:len(string) & ~1])
            if sys.byteorder == "little":
                codes.byteswap()
            return codes
        codes, i = [], 0
        while i < len(string):
            size = next((len(lo) for lo, hi in self.ranges
                         if lo <= string[i:i + len(lo)] <= hi), 1)
            codes.append(int.from_bytes(string[i:i + size], "big"))
            i += size
        return codes

    def decode(self, string):
        """Return (text, width in text space units per point, codes, spaces, unmapped codes)."""
        if not self.composite:
            text = string.decode("latin-1").translate(self.translate)
            width = sum(map(self.widths.__getitem__, string))
            return text, width, len(string), string.count(32), 0 if text else len(string)
        codes = self.codes(string)
        if self.utf16:
            text = string.decode("utf-16-be", "ignore")
        else:
            text = "".join(map(self.texts.__getitem__, codes))
        cids = map(self.cids.__getitem__, codes) if self.cids is not None else codes
        width = sum(map(self.widths.__getitem__, cids))
        return text, width, len(codes), 0, 0 if text else len(codes)


################ Documents: text

# A page's text from its content stream: glyphs placed by the text and graphics state
# (ISO 32000-1 9.4), spaces and line breaks from where they stand; and the images of a
# page without text, for the vision model.

IDENTITY = (1, 0, 0, 1, 0, 0)
INVERTED = bytes(range(255, -1, -1))


def multiply(m, n):
    """Return the matrix product m x n of two PDF matrices (a b c d e f)."""
    return (m[0] * n[0] + m[1] * n[2], m[0] * n[1] + m[1] * n[3],
            m[2] * n[0] + m[3] * n[2], m[2] * n[1] + m[3] * n[3],
            m[4] * n[0] + m[5] * n[2] + n[4], m[4] * n[1] + m[5] * n[3] + n[5])


def png_image(width, height, color_type, depth, rows, palette=None):
    """Return a PNG (RFC 2083) of rows, which already carry each scanline's filter byte."""
    def chunk(kind, body):
        """One PNG chunk with its length and CRC."""
        return len(body).to_bytes(4, "big") + kind + body + \
            zlib.crc32(kind + body).to_bytes(4, "big")
    head = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    head += bytes([depth, color_type, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head)
            + (chunk(b"PLTE", palette) if palette else b"")
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def page_image(doc, image):
    """Return (media type, bytes) of an image XObject a vision model can read, or None.

    A DCTDecode stream is a JPEG as it stands. An 8-bit RGB or grey, or 1-bit grey,
    Flate image becomes a PNG: its scanlines get PNG's filter byte, or keep the one
    a PNG predictor already gave them."""
    data, codec = doc.stream_data(image, image=True)
    if codec in ("DCTDecode", "DCT"):
        return "image/jpeg", data
    width, height = doc.get(image, "Width", 0), doc.get(image, "Height", 0)
    depth = 1 if doc.get(image, "ImageMask") is True else doc.get(image, "BitsPerComponent", 8)
    space = doc.get(image, "ColorSpace", "DeviceGray")
    palette = None
    if isinstance(space, list) and space and space[0] == "ICCBased":
        space = {3: "DeviceRGB", 1: "DeviceGray"}.get(doc.get(doc.resolve(space[1]), "N"), "")
    elif isinstance(space, list) and len(space) == 4 and space[0] == "Indexed":
        palette = doc.resolve(space[3])
        palette = doc.stream_data(palette) if isinstance(palette, Stream) else palette
        rgb = doc.resolve(space[1]) == "DeviceRGB" and isinstance(palette, bytes)
        space = "Indexed" if rgb else ""
        palette = palette[:len(palette) // 3 * 3][:768] if space else None
    channels = {"DeviceRGB": 3, "CalRGB": 3, "DeviceGray": 1, "CalGray": 1, "Indexed": 1}.get(space)
    if codec or not channels or depth not in (1, 8) or not width or not height:
        return None
    row = (width * channels * depth + 7) // 8
    parms = doc.get(image, "DecodeParms", {})
    if isinstance(parms, list):     # one per filter: the Flate one is the one with a dict
        parms = next((p for p in map(doc.resolve, parms) if isinstance(p, dict)), {})
    predictor = parms.get("Predictor", 1) if isinstance(parms, dict) else 1
    # Too short is found before the rows are made: /Height 10000000 on 2 bytes made 872 MB.
    if 1 < predictor < 10 or len(data) < (row + (predictor >= 10)) * height:
        return None
    if predictor >= 10:
        rows = data     # stream_data left PNG's own filter bytes on every scanline
    else:
        if doc.get(image, "Decode", [0])[0] == 1:
            data = data.translate(INVERTED)
        rows = b"".join(b"\x00" + data[i:i + row] for i in range(0, row * height, row))
    color_type = 3 if palette else 2 if channels == 3 else 0
    return "image/png", png_image(width, height, color_type, depth, zlib.compress(rows), palette)


class PageText:
    """The text of one page, from running its content streams (ISO 32000-1 8, 9).

    run interprets a content stream; graphics_state, move, text_state, show_operator
    and draw_xobject are its operators; show places one string, and separator decides
    from where it stands whether a space or a new line comes before it; font_for reads
    a font once per document; text is the page's text."""

    def __init__(self, doc, fonts):
        """Start a page of doc; fonts is the document's {font key: Font} shared by its pages."""
        self.doc, self.fonts = doc, fonts
        self.out, self.images, self.stack = [], [], []
        self.unmapped = self.glyphs = self.forms = 0
        self.ctm = self.tm = self.tlm = IDENTITY
        self.font, self.size, self.tc, self.tw, self.th, self.tl, self.rise = None, 1, 0, 0, 1, 0, 0
        self.last = None    # (x, y, baseline x, baseline y, font height) where text ended
        self.handlers = {
            "q": self.graphics_state, "Q": self.graphics_state, "cm": self.graphics_state,
            "BT": self.move, "Td": self.move, "TD": self.move, "Tm": self.move, "T*": self.move,
            "Tc": self.text_state, "Tw": self.text_state, "Tz": self.text_state,
            "TL": self.text_state, "Ts": self.text_state, "Tf": self.text_state,
            "Tj": self.show_operator, "TJ": self.show_operator, "'": self.show_operator,
            '"': self.show_operator, "Do": self.draw_xobject}
        self.wanted = frozenset(name.encode() for name in self.handlers)

    def run(self, data, resources, depth=0):
        """Interpret one content stream with its resources."""
        self.doc.spend_content(len(data))
        handlers = self.handlers
        for operator, operands in iter_content(data, self.wanted):
            try:
                handlers[operator](operator, operands, resources, depth)
            except BROKEN:
                continue    # a malformed operator is skipped, as viewers do

    def graphics_state(self, operator, operands, resources, depth):
        """q, Q and cm: save, restore and transform the graphics state."""
        if operator == "q":
            if len(self.stack) < 256:
                self.stack.append((self.ctm, self.font, self.size, self.tc, self.tw, self.th,
                                   self.tl, self.rise))
        elif operator == "Q":
            if self.stack:
                (self.ctm, self.font, self.size, self.tc, self.tw, self.th, self.tl,
                 self.rise) = self.stack.pop()
        else:
            self.ctm = multiply(numbers(operands, 6), self.ctm)

    def move(self, operator, operands, resources, depth):
        """BT, Td, TD, Tm and T*: set the text and line matrices."""
        if operator == "BT":
            self.tm = self.tlm = IDENTITY
        elif operator == "Tm":
            self.tm = self.tlm = numbers(operands, 6)
        else:
            tx, ty = (0, -self.tl) if operator == "T*" else numbers(operands, 2)
            if operator == "TD":
                self.tl = -ty
            m = self.tlm
            self.tm = self.tlm = (m[0], m[1], m[2], m[3], tx * m[0] + ty * m[2] + m[4],
                                  tx * m[1] + ty * m[3] + m[5])

    def text_state(self, operator, operands, resources, depth):
        """Tf, Tc, Tw, Tz, TL and Ts: the font and spacing that place the glyphs."""
        if operator == "Tf":
            self.font = self.font_for(resources, operands[-2])
            self.size = numbers(operands, 1)[0]
            return
        value = numbers(operands, 1)[0]
        if operator == "Tc":
            self.tc = value
        elif operator == "Tw":
            self.tw = value
        elif operator == "Tz":
            self.th = value / 100
        elif operator == "TL":
            self.tl = value
        else:
            self.rise = value

    def font_for(self, resources, name):
        """Return the Font that resources call name, read once per document; None if unusable."""
        reference = self.doc.get(resources, "Font", {}).get(name)
        key = reference if isinstance(reference, tuple) else id(reference)
        if key not in self.fonts:
            font = self.doc.resolve(reference)
            try:
                self.fonts[key] = Font(self.doc, font) if isinstance(font, dict) else None
            except BROKEN:
                self.fonts[key] = None
        return self.fonts[key]

    def show_operator(self, operator, operands, resources, depth):
        """Tj, TJ, ' and ": show strings; TJ's numbers move by thousandths of the font size."""
        if operator == "TJ":
            for item in operands[-1]:
                if item.__class__ is bytes:
                    self.show(item)
                elif isinstance(item, (int, float)):
                    shift = -item * 0.001 * self.size * self.th
                    m = self.tm
                    self.tm = (m[0], m[1], m[2], m[3], m[4] + shift * m[0], m[5] + shift * m[1])
            return
        if operator == '"':
            self.tw, self.tc = numbers(operands[:-1], 2)
        if operator != "Tj":
            self.move("T*", (), resources, depth)
        self.show(operands[-1])

    def show(self, string):
        """Show one string: add its text after the right separator and advance the text matrix."""
        font, size, tc, th = self.font, self.size, self.tc, self.th
        if font is None or string.__class__ is not bytes:
            return
        if tc * th > PDF_SPACE_GAP * abs(size) and len(string) > font.code_size:
            # Ghostscript spaces words apart with character spacing alone ("(.W)" with
            # Tc 2.7 for ". W"): such a gap is a space, so each glyph is placed alone.
            step = font.code_size
            for i in range(0, len(string), step):
                self.show(string[i:i + step])
            return
        text, width, count, spaces, unmapped = font.decode(string)
        self.glyphs += count
        self.unmapped += unmapped
        a, b, c, d, e, f = self.tm
        advance = (width * size + tc * count + self.tw * spaces) * th
        self.tm = (a, b, c, d, e + advance * a, f + advance * b)
        if not text:
            return
        # The text matrix times the CTM, written out: this runs for every string shown.
        m0, m1, m2, m3, m4, m5 = self.ctm
        ux, uy, vx, vy = a * m0 + b * m2, a * m1 + b * m3, c * m0 + d * m2, c * m1 + d * m3
        x = e * m0 + f * m2 + m4 + self.rise * vx
        y = e * m1 + f * m3 + m5 + self.rise * vy
        scale = (ux * ux + uy * uy) ** 0.5 or 1
        height = abs(size) * ((vx * vx + vy * vy) ** 0.5 or scale)
        separator = self.separator(x, y, ux / scale, uy / scale, height)
        if separator == " " and (text[0].isspace() or self.out[-1][-1:].isspace()):
            separator = ""
        if separator:
            self.out.append(separator)
        self.out.append(text)
        # Text ends where its last glyph does: the character spacing after it is a gap.
        end = advance - tc * th
        self.last = (x + end * ux, y + end * uy, ux / scale, uy / scale, height)

    def separator(self, x, y, ux, uy, height):
        """Return what goes between the last text and text at (x, y): "", " " or a new line.

        Several producers draw no spaces, so glyph positions decide: a gap wider than a
        fraction of the font size is a word space, a shifted baseline a new line."""
        if self.last is None:
            return ""
        last_x, last_y, last_ux, last_uy, last_height = self.last
        dx, dy = x - last_x, y - last_y
        along, across = dx * ux + dy * uy, dy * ux - dx * uy
        height = max(height, last_height)
        turn = ux * last_ux + uy * last_uy
        if turn < -0.9 and abs(across) <= PDF_LINE_GAP * height:
            return ""   # a mirrored glyph on the same line, as in the XeTeX logo
        if abs(across) > PDF_LINE_GAP * height or turn < 0.9:
            return "\n"
        if along > PDF_SPACE_GAP * height or along < -height:
            return " "
        return ""

    def draw_xobject(self, operator, operands, resources, depth):
        """Do: run a form XObject's content in place; keep an image in case the page has no text."""
        xobject = self.doc.resolve(self.doc.get(resources, "XObject", {}).get(operands[-1]))
        if not isinstance(xobject, Stream):
            return
        kind = xobject.dict.get("Subtype")
        if kind == "Image" and len(self.images) < PDF_MAX_PAGE_IMAGES \
                and xobject not in self.images:
            self.images.append(xobject)
        elif kind == "Form" and depth < PDF_MAX_DEPTH and self.forms < PDF_MAX_FORMS:
            # Forms that draw each form ten times would run ten to the depth times.
            self.forms += 1
            saved = (self.tm, self.tlm, len(self.stack))
            self.graphics_state("q", (), resources, depth)
            matrix = self.doc.get(xobject, "Matrix", IDENTITY)
            self.ctm = multiply(numbers(matrix, 6), self.ctm)
            self.run(self.doc.stream_data(xobject), self.doc.get(xobject, "Resources", resources),
                     depth + 1)
            del self.stack[saved[2] + 1:]
            self.graphics_state("Q", (), resources, depth)
            self.tm, self.tlm = saved[:2]

    def text(self):
        """Return the page's text, lines stripped of trailing spaces, ligatures spelled out."""
        lines = "".join(self.out).translate(LIGATURES).split("\n")
        return "\n".join(line.rstrip() for line in lines).strip("\n")


def numbers(operands, count):
    """Return the last count operands as a tuple of numbers, or raise TypeError."""
    values = tuple(operands[-count:])
    if len(values) != count:
        raise TypeError("expected %d numbers" % count)
    sum(values)     # raises TypeError for anything but numbers, at C speed
    return values


def page_contents(doc, page):
    """Return the bytes of a page's content, its streams joined when it has several."""
    contents = doc.get(page, "Contents")
    streams = contents if isinstance(contents, list) else [contents]
    return b"\n".join(doc.stream_data(stream) for stream in map(doc.resolve, streams)
                      if isinstance(stream, Stream))


def page_images(doc, images):
    """Return the (media type, bytes) of the images a page without text draws, where readable."""
    found = []
    for image in images:
        try:
            found.append(page_image(doc, image))
        except BROKEN:
            continue
    return [image for image in found if image]


class PdfPages(list):
    """The pages pdf_pages read; unread counts the pages after them, not read."""
    unread = 0


def pdf_pages(data, max_inflate=PDF_MAX_INFLATE, max_pages=PDF_MAX_PAGES, **allowances):
    """Return the pages of a PDF as [{"text": str, "images": [(media type, bytes)]}].

    Images are given only for a page without text (a scan). At most max_pages pages are
    read; the list's unread counts those after them. allowances may lower PdfFile's
    max_content and max_codes. Raises DocumentError with a reason fit for a marker:
    "encrypted", "damaged: ...", "too large once decompressed", "no Unicode mapping for
    its fonts", ..."""
    try:
        doc = PdfFile(data, max_inflate, **allowances)
        fonts, pages, unmapped, glyphs, kept = {}, PdfPages(), 0, 0, 0
        for page, resources in doc.iter_pages(max_pages + PDF_MAX_UNREAD):
            if len(pages) == max_pages:
                pages.unread += 1   # counted, so the coder is told the document goes on
                continue
            reader = PageText(doc, fonts)
            reader.run(page_contents(doc, page), resources)
            text = reader.text()
            images = [] if text.strip() else page_images(doc, reader.images[:PDF_MAX_IMAGES - kept])
            kept += len(images)
            pages.append({"text": text, "images": images})
            unmapped, glyphs = unmapped + reader.unmapped, glyphs + reader.glyphs
    except BROKEN as error:
        raise DocumentError("damaged") from error
    if not pages:
        raise DocumentError("damaged: no pages")
    if unmapped > glyphs / 2:
        raise DocumentError("no Unicode mapping for its fonts")
    return pages


################ Documents

# What the coder reads in place of a document block: the text of a PDF (pdf_pages, the
# sections above), of a text or content document, or a marker saying why not. The
# pages of a scanned PDF come out as images, which then go the image path (the vision
# model describes each once). How a document renders depends only on it, the block
# before it and the coder's context length: a PDF is read once and kept by content
# (DocumentReader), and cutting is done by a rule, so it reads the same every turn.

FILE_READ_LINE = re.compile(r"PDF file read: (.+?) \([^()]*\)\s*\Z")   # Claude Code's Read tool


def is_document(block):
    """True for a document content block."""
    return isinstance(block, dict) and block.get("type") == "document"


def file_read_name(text):
    """The file name in Claude Code's "PDF file read: /path/a.pdf (592 bytes)" line, or None."""
    match = FILE_READ_LINE.match(text)
    return re.split(r"[/\\]", match.group(1))[-1] or None if match else None


def base64_document_data(block):
    """The base64 data of a base64 (PDF) document block, else None."""
    if is_document(block) and block["source"]["type"] == "base64":
        return block["source"]["data"]
    return None


def document_keys(messages):
    """Return {base64 data: sha256 hex} for every base64 (PDF) document in messages."""
    return content_keys(messages, base64_document_data)


def document_record(pages, max_chars=DOCUMENT_MAX_CHARS):
    """Return (record, images) for the pages pdf_pages read: what the cache keeps, and the
    page images as base64 ([[(media type, data)]], one list per page kept).

    A record's pages are each the page's text, {"images": n} for a page with no
    text layer and n images, or None for one with neither; past max_chars, pages
    are counted in more_pages and more_chars instead of kept; so are the pages past
    pdf_pages's limit, not read, which unread_pages counts too (absent when none)."""
    kept, images, chars = [], [], 0
    more_pages = more_chars = 0
    for page in pages:
        # A lone surrogate (a broken ToUnicode map) has no UTF-8 form, and a server that
        # parses its escape strictly would refuse every later turn of the conversation.
        text = page["text"].encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        if chars + len(text) > max_chars or more_pages:
            more_pages, more_chars = more_pages + 1, more_chars + len(text)
            continue
        chars += len(text)
        shots = [] if text.strip() else [(kind, base64.b64encode(data).decode("ascii"))
                                        for kind, data in page.get("images") or ()]
        kept.append(text if text.strip() else {"images": len(shots)} if shots else None)
        images.append(shots)
    unread = getattr(pages, "unread", 0)
    return {"pages": kept, "more_pages": more_pages + unread, "more_chars": more_chars,
            **({"unread_pages": unread} if unread else {})}, images


def is_document_record(value):
    """True when value (read from the cache file) is a record document_record could make."""
    if not isinstance(value, dict):
        return False
    if "failed" in value:
        return isinstance(value["failed"], str)
    return isinstance(value.get("pages"), list) and all(
        page is None or isinstance(page, str) or (
            isinstance(page, dict) and type(page.get("images")) is int)
        for page in value["pages"]) and all(
        type(value.get(k)) is int for k in ("more_pages", "more_chars")) and \
        type(value.get("unread_pages", 0)) is int


def record_chars(record):
    """How many characters of text a document record's PDF has, the pages not kept included."""
    return sum(len(p) for p in record["pages"] if isinstance(p, str)) + record["more_chars"]


def image_block(media_type, data):
    """A base64 image content block."""
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def pdf_parts(record, images):
    """A PDF's pages as [(page number, text or image block, chars of page text)]."""
    parts = []
    for number, page in enumerate(record["pages"], 1):
        shots = images[number - 1] if images and number <= len(images) else []
        if isinstance(page, str):
            parts += [(number, PAGE_HEADER % number, 0), (number, page, len(page))]
        elif page and shots:
            parts.append((number, SCANNED_PAGE_HEADER % number, 0))
            parts += [(number, image_block(kind, data), 0) for kind, data in shots]
        else:
            parts.append((number, BLANK_PAGE_HEADER % number, 0))
    return parts


def source_parts(source):
    """A text or content document as [(0, text or image block, chars of text)]."""
    if source["type"] == "text":
        return [(0, source["data"], len(source["data"]))]
    return [(0, b, 0) if is_image(b) else (0, b["text"], len(b["text"]))
            for b in content_blocks(source["content"])]


def json_length(text):
    """Bytes of text as a JSON string, quotes left out: what it adds to the body sent."""
    return len(json.dumps(text)) - 2


def cut_text(text, room):
    """The longest start of text whose JSON form fits in room bytes: whole lines, or
    characters when not even the first line fits."""
    end = used = 0
    for line in text.splitlines(keepends=True):
        used += json_length(line)
        if used > room:
            break
        end += len(line)
    if end:
        return text[:end]
    low, high = 0, len(text)      # the most characters that fit: bisect on the JSON length
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if json_length(text[:middle]) <= room else (low, middle - 1)
    return text[:low]


def cut_parts(parts, room):
    """Return (the parts that fit in room JSON bytes, the page the cut falls in or None,
    chars of text left out). An image counts as its longest description."""
    kept, used = [], 0
    for i, (page, piece, chars) in enumerate(parts):
        # A text part costs its JSON bytes and the line break ("\n") that joins it on.
        cost = DESCRIBE_MAX_TOKENS * BYTES_PER_TOKEN if is_image(piece) else json_length(piece) + 2
        if used + cost <= room:
            kept.append((page, piece, chars))
            used += cost
            continue
        head = cut_text(piece, room - used - 2) if chars else ""
        if head:
            kept.append((page, head, len(head)))
        return kept, page, sum(c for _, _, c in parts[i:]) - len(head)
    return kept, None, 0


def document_budget(context_length):
    """The JSON bytes one document may fill: its share of the coder's context."""
    return int((context_length or DOCUMENT_DEFAULT_CONTEXT) * DOCUMENT_CONTEXT_SHARE) \
        * BYTES_PER_TOKEN


def cut_note(record, cut_page, left, total, context_length):
    """The note that ends a cut document: how much of its text was left out, and why; and
    how many pages the router did not read."""
    unread = record.get("unread_pages", 0) if record else 0
    notes = [UNREAD_PAGES_MARKER % (format(unread, ","), format(PDF_MAX_PAGES, ","))] \
        if unread else []
    if cut_page is None and not (record and record["more_pages"] > unread):
        return "\n".join(notes) or None
    left += record["more_chars"] if record else 0
    where = " from page %d on" % (cut_page or len(record["pages"]) + 1) if record else ""
    why = ("the coder's %s-token context" % format(context_length or DOCUMENT_DEFAULT_CONTEXT,
                                                    ",")
           if cut_page is not None else "the router's limit of %s chars" % format(
               DOCUMENT_MAX_CHARS, ","))
    return "\n".join([CUT_DOCUMENT_MARKER % (format(left, ","), format(total, ","), where, why)]
                     + notes)


def document_header(block, name, pages):
    """The text that opens a document: its marker, then its title and context if sent."""
    lines = [DOCUMENT_MARKER % (name if pages is None else "%s, %d page%s" % (
        name, pages, "" if pages == 1 else "s"))]
    if block.get("title") and block["title"] != name:
        lines.append("Title: %s" % block["title"])
    if block.get("context"):
        lines.append("Context: %s" % block["context"])
    return "\n".join(lines)


def render_document(block, name, record, images, context_length):
    """The blocks the coder reads in place of a document block: text blocks, with the
    page images of a scanned PDF between them.

    record is what was read of a PDF (document_record; None for other sources, a
    {"failed": reason} for what cannot be read); images its page images."""
    if record and "failed" in record:
        return [text_block(FAILED_DOCUMENT_MARKER % (name, record["failed"]))]
    parts = pdf_parts(record, images) if record else source_parts(block["source"])
    total = record_chars(record) if record else sum(c for _, _, c in parts)
    kept, cut_page, left = cut_parts(parts, document_budget(context_length))
    pages = len(record["pages"]) + record["more_pages"] if record else None
    texts = [document_header(block, name, pages)]
    note = cut_note(record, cut_page, left, total, context_length)
    out = []
    for _, piece, _ in kept + ([(0, note, 0)] if note else []):
        if is_image(piece):
            out += [text_block("\n".join(texts)), piece]
            texts = []
        else:
            texts.append(piece)
    return out + ([text_block("\n".join(texts))] if texts else [])


def document_name(block, before):
    """What to call a document: the file named by Claude Code's "PDF file read" line just
    before it (before: that block, or None), else its title, else "document"."""
    named = file_read_name(before["text"]) if before and before.get("type") == "text" else None
    return named or block.get("title") or "document"


################ Documents: the reader

class DocumentCache(DescriptionCache):
    """What the router read of each PDF (document_record), by the SHA-256 of its data: in a
    file of its own beside the descriptions, kept with the same care.

    The page images of scanned PDFs stay in memory only, for a few documents: they
    are large, and can be read from the PDF again, which comes with every turn."""

    file_name = DOCUMENT_CACHE_FILE
    field = "document"
    what = "document cache"

    def __init__(self, directory, max_entries=DOCUMENT_CACHE_MAX_ENTRIES):
        super().__init__(directory, max_entries)
        self.images = {}        # document hash -> its page images (document_record); lock guards

    def is_value(self, value):
        """True when value, read from the file, is a document record."""
        return is_document_record(value)

    def keep_images(self, key, images):
        """Keep the page images of the document key, the oldest document's going first."""
        with self.lock:
            put_newest(self.images, ((key, images),), DOCUMENT_IMAGES_KEPT)

    def kept_images(self, key):
        """The page images kept of the document key, or None."""
        with self.lock:
            return self.images.get(key)


DOCUMENT_LINES = 16     # documents of a turn logged a line each; the rest are counted


class DocumentReader:
    """Puts what the coder can read in place of each document of a request: a PDF is read
    once (pdf_pages) and kept by content; counts for /status what it did."""

    def __init__(self, directory):
        self.cache = DocumentCache(directory)
        self.lock = threading.Lock()    # guards counts
        self.counts = {"extracted": 0, "cached": 0, "failed": 0}

    def read(self, messages, context_length, quiet=False):
        """Return (messages with every document block replaced by render_document's blocks,
        {page image key: what to tell the vision model of it}). Unless quiet (a token count),
        log a line per document of the user's turn (DOCUMENT_LINES at most) and count each
        as cached or read now."""
        keys = document_keys(messages)
        records = self.cache.lookup(keys.values()) if keys else {}
        fresh = {key: self.extract(data, key) for data, key in keys.items() if key not in records}
        records.update(fresh)
        with self.lock:
            for key in keys.values() if not quiet else fresh:
                what = "cached" if key not in fresh else "failed" if "failed" in fresh[key] \
                    else "extracted"
                self.counts[what] += 1
        images = {key: self.page_images(data, key) for data, key in keys.items()
                  if any(isinstance(p, dict) for p in records[key].get("pages", ()))}
        contexts, seen = {}, []

        def render(block, before):
            source, name = block["source"], document_name(block, before)
            key = keys.get(source.get("data")) if source["type"] == "base64" else None
            record = records[key] if key else source_record(source)
            blocks = render_document(block, name, record, images.get(key), context_length)
            contexts.update(page_contexts(images.get(key), name))
            seen.append((name, source, record, key in fresh, blocks))
            return blocks

        turn = current_turn_start(messages)
        out = map_blocks(messages[:turn], is_document, render)
        earlier = len(seen)
        out += map_blocks(messages[turn:], is_document, render)
        found = seen[earlier:] if not quiet else []
        # A line each for the first few: 50,000 one-byte documents in a 3 MB request made
        # 50,000 lines (3.2 MB) of the log, and the body limit allows twenty times that.
        for document in found[:DOCUMENT_LINES]:
            log(document_line(*document))
        if len(found) > DOCUMENT_LINES:
            log("document: %s more in this turn" % format(len(found) - DOCUMENT_LINES, ","))
        return out, contexts

    def extract(self, data, key):
        """Read the PDF in data (base64); return its record, now in the cache, its page images
        in memory."""
        try:
            record, images = document_record(pdf_pages(base64.b64decode(data)))
        except DocumentError as e:
            record, images = {"failed": str(e) or "damaged"}, []
        except Exception as e:
            # A PDF the reader did not foresee still gets its turn answered, with a marker.
            # Kept in memory only, so that a fixed router reads it again after a restart.
            log("! reading a PDF failed: %s: %s; Traceback (most recent call last):\n%s" % (
                type(e).__name__, escape_log(e)[:200],
                "".join(traceback.format_tb(e.__traceback__)).rstrip()))
            record = {"failed": "the router's PDF reader failed (%s)" % type(e).__name__}
            self.cache.store({key: record}, DOCUMENT_READER, on_disk=False)
            return record
        self.cache.store({key: record}, DOCUMENT_READER)
        if any(images):
            self.cache.keep_images(key, images)
        return record

    def page_images(self, data, key):
        """The page images of the scanned PDF in data: kept in memory, else read again."""
        images = self.cache.kept_images(key)
        if images is None:
            try:
                images = document_record(pdf_pages(base64.b64decode(data)))[1]
            except Exception:       # extract() has said why already, in the marker
                images = []
            self.cache.keep_images(key, images)
        return images

    def status(self):
        """The documents part of /status."""
        with self.lock:
            counts = dict(self.counts)
        with self.cache.lock:
            return {**counts, "entries": len(self.cache.entries), "file": self.cache.path}


def source_record(source):
    """The record of a document the router does not read as a PDF: None for text and
    content documents, a failure for those it would have to fetch."""
    if source["type"] == "url":
        return {"failed": URL_DOCUMENT_REASON % source["url"]}
    if source["type"] == "file":
        return {"failed": FILE_DOCUMENT_REASON % source["file_id"]}
    return None


def page_contexts(images, name):
    """{image key: the describe request's context} for a scanned PDF's page images."""
    return {hashlib.sha256(data.encode()).hexdigest(): PAGE_CONTEXT % (number, name)
            for number, shots in enumerate(images or (), 1) for _, data in shots}


def document_line(name, source, record, fresh, blocks):
    """The log line saying what became of one document (record: see render_document)."""
    if record and "failed" in record:
        cached = " (cached)" if source["type"] == "base64" and not fresh else ""
        return "document: %s could not be read: %s%s" % (
            escape_log(name), escape_log(record["failed"]), cached)
    if record:
        pages = len(record["pages"]) + record["more_pages"]
        what = "%d page%s, %s chars, %s" % (pages, "" if pages == 1 else "s", format(
            record_chars(record), ","), "extracted" if fresh else "cached")
    else:
        what = "%s source, %s chars" % (source["type"], format(
            sum(c for _, _, c in source_parts(source)), ","))
    scans = sum(1 for b in blocks if is_image(b))
    cut = [b["text"] for b in blocks if b["type"] == "text" and "<<DOCUMENT CUT: " in b["text"]]
    return "document: %s, %s%s%s" % (
        escape_log(name), what, ", %d page image(s)" % scans if scans else "",
        "; cut: " + cut[0].rsplit("<<DOCUMENT CUT: ", 1)[1][:-2] if cut else "")


################ Encoding and estimates

# The body as sent, what it costs in tokens, and how much of it the last turn sent too:
# a prompt as parts, compared with the last one by hash.


class EncodedRequest:
    """A request body encoded once, in pieces: its bytes, and what a turn derives from them.

    Each top-level field and each message is encoded on its own and never again: the
    prompt's parts are hashed as they are encoded, the estimate counts their bytes,
    and a clamped max_tokens is spliced in. Joined, the pieces are json.dumps(body),
    except that base64 image data goes in as it is (encode_message). With memo (an
    EncodedParts), the system text, the tools and each message without images that a
    recent request sent too are neither encoded nor hashed again; with parts ({id() of a
    cleaned value: its ReadPart}, Handler.read_request), those sent on as read are not
    even looked up there (part_encoding)."""

    def __init__(self, body, keys, memo=None, parts=None):
        marker = "@claude-router-image-%s-" % os.urandom(8).hex()
        encode = memo.encode if memo else encode_part
        if parts:
            encode = functools.partial(part_encoding, parts, encode)
        self.fields, self.digests = {}, {}
        for name, value in body.items():
            if name in ("system", "tools"):
                self.fields[name], self.digests[name] = encode(value)
            else:
                self.fields[name] = None if name == "messages" else json.dumps(value).encode()
        self.max_tokens = body.get("max_tokens")
        self.messages = [encode_message(m, keys, marker, encode) for m in body["messages"]]
        self.image_bytes = sum(m[2] for m in self.messages)
        self.images = sum(m[3] for m in self.messages)
        self.length = sum(map(len, self.pieces()))

    def pieces(self):
        """The body as pieces: bytes, and base64 image data as the str it came as."""
        out = [b"{"]
        for name, value in self.fields.items():
            out.append(b'%s%s: ' % (b", " if len(out) > 1 else b"", json.dumps(name).encode()))
            if value is not None:
                out.append(value)
                continue
            out.append(b"[")
            for i, (pieces, _, _, _) in enumerate(self.messages):
                out.extend((b", ", *pieces) if i else pieces)
            out.append(b"]")
        out.append(b"}")
        return out

    def data(self):
        """The body to send: bytes, or with images an iterator of pieces (see send_pieces)."""
        pieces = self.pieces()
        return self.send_pieces(pieces) if self.images else b"".join(pieces)

    def send_pieces(self, pieces):
        """Yield the body as the bytes between images, then each image's data, in turn.

        They never hold a second copy of the whole body, and an image's data is
        encoded to bytes only as it goes, a slice at a time (encoded_slices). Each piece
        is one send, so the small ones between images go joined: with TCP_NODELAY each
        would be a packet of its own."""
        run = []
        for piece in pieces:
            if isinstance(piece, str):
                yield b"".join(run)
                yield from encoded_slices(piece)
                run = []
            else:
                run.append(piece)
        yield b"".join(run)

    def tokens(self):
        """Estimated tokens of the request as sent (see estimate_tokens).

        Descriptions count as the text they are; each image still sent as pixels costs
        IMAGE_TOKENS, whatever its size."""
        return estimate_tokens(self.length, self.image_bytes, self.images)

    def clamp(self, context_length):
        """Cut max_tokens so that the estimated input and the output fit context_length."""
        room = clamped_max_tokens(self.max_tokens, self.tokens(), context_length)
        if room != self.max_tokens:
            old, self.fields["max_tokens"] = self.fields["max_tokens"], b"%d" % room
            self.length += len(self.fields["max_tokens"]) - len(old)
            self.max_tokens = room

    def prompt_parts(self):
        """Return (names, digests, sizes) of the prompt's parts in the order templates render
        them: the system text, the tools and each message; 16 bytes of digest per part,
        which names its place too."""
        parts = [(name, self.digests[name], len(self.fields[name]))
                 for name in ("system", "tools") if name in self.fields]
        parts += [("message %d" % i, digest, sum(map(len, pieces)))
                  for i, (pieces, digest, _, _) in enumerate(self.messages)]
        digests = [hashlib.blake2b(name.encode() + digest, digest_size=16).digest()
                   for name, digest, _ in parts]
        return [p[0] for p in parts], b"".join(digests), [p[2] for p in parts]


def encode_part(value):
    """Return (value as JSON bytes, a 16-byte digest of them)."""
    data = json.dumps(value).encode()
    return data, hashlib.blake2b(data, digest_size=16).digest()


def part_encoding(parts, encode, value):
    """Return encode(value); encode_part(value), kept with its ReadPart in parts, when value
    is one's cleaned form.

    A cleaned form is shared by every request that sends its part again and is never
    changed, so neither is its encoding: no marshal key needs making to find it, nor
    keeping in EncodedParts."""
    part = parts.get(id(value))
    if part is None or part.clean is not value:
        return encode(value)
    if part.encoded is None:
        part.encoded = encode_part(value)
    return part.encoded


def encode_message(message, keys, marker, encode=encode_part):
    """Return (pieces, digest, image bytes, images) of message encoded as JSON.

    pieces are its bytes, base64 image data in between as str: json.dumps would scan
    and copy every byte of a multi-MB screenshot (2.5 ms per MB here), and validated
    base64 needs no escaping. The digest reads the pieces with each image's key in
    place of its data, so no image is hashed again. A message without images is
    encode(message)'s."""
    if not keys or not any(is_image(b) for b in iter_blocks(message)):
        data, digest = encode(message)
        return [data], digest, 0, 0
    found, sizes = [], []

    def swap(block):
        sizes.append(len(image_data(block)))
        data = block["source"].get("data")
        # validate_request allows only strict base64 here. This cheaper guard (isascii is
        # O(1), a quote or a backslash is a memchr) leaves anything that could end the JSON
        # string to json.dumps, so no body can add JSON fields of its own this way.
        if block["source"].get("type") != "base64" or not isinstance(data, str) \
                or not data.isascii() or '"' in data or "\\" in data:
            return block
        found.append(data)
        return {**block, "source": {**block["source"], "data": "%s%d" % (marker, len(found) - 1)}}

    swapped = map_image_blocks([message], swap)[0]
    first, *rest = json.dumps(swapped).encode().split(marker.encode())
    pieces, digest = [first], hashlib.blake2b(first, digest_size=16)
    for part in rest:
        index, tail = part.split(b'"', 1)     # the marker's number, then the rest of the JSON
        data = found[int(index)]
        pieces += [data, b'"' + tail]
        digest.update(keys[data].encode() + b'"' + tail)
    return pieces, digest.digest(), sum(sizes), len(sizes)


class EncodedParts:
    """Parts of recent requests as encoded (encode_part): bounded by their bytes, one lock.

    Claude Code sends the same system text, tools and history every turn, and only
    the newest messages are new: those alone are encoded and hashed. A part is looked
    up by its marshal bytes, made in a tenth of json.dumps's time and exact where
    == is not (1 == 1.0 == True, which JSON tells apart)."""

    def __init__(self, max_bytes=ENCODED_PARTS_BYTES):
        self.lock = threading.Lock()    # guards parts and size
        self.max_bytes = max_bytes      # bound of the keys' and values' bytes; oldest go first
        self.parts = {}                 # marshal bytes -> (JSON bytes, digest)
        self.size = 0

    def encode(self, value):
        """Return (value as JSON bytes, their digest), as encode_part does."""
        try:
            key = marshal.dumps(value, 2)   # version 2: no references, so sharing is no matter
        except ValueError:
            return encode_part(value)
        with self.lock:
            found = self.parts.pop(key, None)
            if found is not None:
                self.parts[key] = found     # the most recent again
                return found
        found = encode_part(value)
        size = len(key) + len(found[0])
        if size > self.max_bytes // 8:
            return found
        with self.lock:
            if self.parts.setdefault(key, found) is found:
                self.size += size
            while self.size > self.max_bytes:
                oldest = next(iter(self.parts))
                self.size -= len(oldest) + len(self.parts.pop(oldest)[0])
        return found


def estimate_tokens(body_bytes, image_bytes=0, images=0):
    """A token count for a request of body_bytes that errs high, images costed apart."""
    return -(-(body_bytes - image_bytes) // BYTES_PER_TOKEN) + images * IMAGE_TOKENS


def clamped_max_tokens(asked, estimated_input, context_length):
    """The max_tokens to send for asked: cut so input plus output fits context_length."""
    if not context_length or asked is None:
        return asked
    return min(asked, max(context_length - estimated_input, MIN_OUTPUT_TOKENS))


def unchanged_parts(previous, digests):
    """How many parts, from the first, digests has the same as the previous prompt's."""
    same = 0
    while digests[same * 16:same * 16 + 16] == previous[same * 16:same * 16 + 16] != b"":
        same += 1
    return same


def reuse_note(sent, reuse):
    """The route line's tail: the prompt's size and how much of the last prompt it sends again."""
    note = " %.1f KB" % (sent / 1024)
    if reuse is None:
        return note + ", first turn"
    last, unchanged, changed = reuse
    share = unchanged / last if last else 1.0
    note += ", %.1f%% as last turn" % (100 * min(share, 1.0))
    if changed and share < REUSE_NOTE_BELOW:
        note += ", changed from %s on" % changed
    return note

USAGE_FIELDS = ("input_tokens", "cache_read_input_tokens", "output_tokens")


# What an auxiliary request is for, by a phrase of its system prompt (Claude Code 2.1.332).
AUXILIARY_LABELS = (("naming a coding session", "session title"),
                    ("security monitor for autonomous", "auto mode check"))


def conversation_key(session, klass, names, digests, messages):
    """The key of a prompt's books: its conversation, then its request class.

    A conversation is Claude Code's session id, or else the hashes of its system text,
    tools and first message. Within one, each class of request (Claude Code's hint
    header; without it, the system text) is compared only with its own last prompt, so
    a session-title request between two main turns does not read as the main prompt
    having changed from the system on."""
    head = digests[:16 * (len(names) - messages + 1)]
    system = digests[:16] if names and names[0] == "system" else b""
    return (session or head, klass or system)


def class_note(klass, compaction, compacted, system):
    """The route line's words on a request that is not a plain main turn ("" for one)."""
    note = ""
    if klass and klass != "main":
        note = ", " + escape_log(klass)
        label = next((label for phrase, label in AUXILIARY_LABELS
                      if klass == "auxiliary" and phrase in system), None)
        if label or compaction:
            note += ": " + (label or "%s compaction" % escape_log(compaction[:20]))
    if compacted:
        note += ", the first turn after a compaction"
    return note


def usage_numbers(usage):
    """The token counts of an Anthropic usage object that are numbers."""
    if not isinstance(usage, dict):
        return {}
    return {k: usage[k] for k in USAGE_FIELDS if type(usage.get(k)) is int}


class PromptMemory:
    """What the router remembers of the prompts it sent: bounded, one lock.

    prompts: per conversation and model, hashes of the last prompt sent, to tell how
    much of it the next turn sends again; prompt_stats: per model, what that came to
    and what the server said it read from its cache (one entry per model)."""

    def __init__(self, max_entries=MEMORY_MAX_ENTRIES):
        self.lock = threading.Lock()    # guards prompts and prompt_stats
        self.max_entries = max_entries  # bound of prompts; the oldest entry goes first
        self.prompts = {}               # (conversation, model) -> hashes of the last prompt
        self.prompt_stats = {}          # model -> its last turn's figures and running totals

    def note_prompt(self, conversation, model, names, digests, sizes, length):
        """Remember a prompt sent to model in a body of length bytes; return (last prompt's
        bytes, bytes of it sent again unchanged, the first part that differs or None), or
        None on a first turn. Prompt bytes are those of its parts (EncodedRequest.prompt_parts)."""
        with self.lock:
            previous = self.prompts.pop((conversation, model), None)
            self.prompts[(conversation, model)] = (digests, sum(sizes))
            drop_oldest(self.prompts, self.max_entries)
        reuse = None
        if previous is not None:
            same = unchanged_parts(previous[0], digests)
            reuse = previous[1], sum(sizes[:same]), names[same] if same < len(names) else None
        last = {"bytes": length, "unchanged_bytes": reuse[1] if reuse else 0,
                "first_change": reuse[2] if reuse else "first turn"}
        with self.lock:
            stats = self.prompt_stats.setdefault(model, {"last_turn": {}, "totals": {
                "turns": 0, "bytes": 0, "unchanged_bytes": 0}})
            stats["last_turn"] = last
            totals = stats["totals"]
            totals["turns"] += 1
            totals["bytes"] += last["bytes"]
            totals["unchanged_bytes"] += last["unchanged_bytes"]
        return reuse

    def note_usage(self, model, usage):
        """Keep the token counts the server reported for model's last turn, and add them up."""
        with self.lock:
            stats = self.prompt_stats.get(model)
            if stats is None:
                return
            stats["last_turn"].update(usage)
            for name, number in usage.items():
                stats["totals"][name] = stats["totals"].get(name, 0) + number

    def prompt_status(self):
        """{model: last turn's figures and running totals}, for /status."""
        with self.lock:
            return copy.deepcopy(self.prompt_stats)


################ Event streams

# Server-sent events: relayed as they come, read on the side, never held back.

# A piece of the model's answer (about a token): llama-server sends comments (":") and
# events that say nothing while it reads the prompt, so only these say the model spoke.
# Quoted, it is the JSON type only, never the event line; a quote in text is escaped.
DELTA_MARK = b'"content_block_delta"'

# An SSE event ends at a blank line; a line ends with CRLF, LF or CR (WHATWG HTML 9.2.6).
SSE_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def is_event_stream(resp):
    """True when an upstream response is an SSE stream."""
    return "text/event-stream" in (resp.getheader("content-type") or "")


def parse_sse_event(raw):
    """Return (event name, parsed data or None) for one SSE event with LF line ends."""
    name, data = "", []
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data.append(line[5:].strip())
    try:
        return name, json.loads(b"\n".join(data)) if data else None
    except (ValueError, RecursionError):
        return name, None


class EventTooLarge(Exception):
    """An upstream event passed MAX_EVENT_BYTES before its blank line came."""


class EventSplitter:
    """Whole SSE events out of a stream read in pieces, none held past a bound.

    A line ends with CRLF, LF or CR, and an event at a blank line (WHATWG HTML 9.2.6).
    Each read is scanned once, with the last three bytes before it, where an event's
    end may begin: bytes held for an event still arriving are not scanned again, so
    the cost is linear in the stream. Those three bytes also join a CRLF that two
    reads cut in half: a CR that ends a read ends no event unless a line end comes
    just before it, and then that event has ended whatever follows."""

    def __init__(self, limit=MAX_EVENT_BYTES):
        self.limit = limit      # most bytes of one event
        self.held = []          # the reads of the event still arriving (its part of them)
        self.size = 0           # bytes in held
        self.tail = b""         # held's last three bytes

    def feed(self, data):
        """Return the bytes, as read, of the events that data completes (b"" if none).

        Raise EventTooLarge once the event still arriving is over the limit."""
        if not self.held and data.endswith(b"\n\n") and b"\r" not in data:
            return data         # the usual read: whole events with LF line ends
        window = self.tail + data
        end = last_event_end(window) - len(self.tail)
        if end > 0:
            events = b"".join([*self.held, data[:end]]) if self.held else data[:end]
            data, self.held, self.size, self.tail = data[end:], [], 0, b""
        else:
            events = b""
        if data:
            self.held.append(data)
            self.size += len(data)
            self.tail = (self.tail + data)[-3:]
        if self.size > self.limit:
            raise EventTooLarge("an event of over %d bytes" % self.limit)
        return events

    def has_partial(self):
        """True when the bytes held are an event begun (more than blank lines)."""
        return any(piece.strip() for piece in self.held)


def last_event_end(data):
    """Where the last whole SSE event in data ends, past its blank line; 0 if none does."""
    if b"\r" not in data:
        end = data.rfind(b"\n\n")     # the usual read
        return end + 2 if end >= 0 else 0
    end = 0
    for match in SSE_EVENT_END.finditer(data):
        end = match.end()
    return end


def sse_events(data):
    """The SSE events in data (whole events, as a splitter returns them), each with LF
    line ends and without its blank line."""
    data = lf_lines(data)
    return [event.lstrip(b"\n") for event in data.split(b"\n\n") if event.strip(b"\n")]


def marked_events(data, marks):
    """The events of sse_events(data) that hold one of marks (bytes without a line end), in
    order; found by looking for the marks, so the other events cost no work."""
    data, found = lf_lines(data), {}
    for mark in marks:
        at = data.find(mark)
        while at >= 0:
            start, end = data.rfind(b"\n\n", 0, at), data.find(b"\n\n", at)
            start, end = start + 2 if start >= 0 else 0, end if end >= 0 else len(data)
            found[start] = data[start:end].lstrip(b"\n")
            at = data.find(mark, end)
    return [found[start] for start in sorted(found)]


def lf_lines(data):
    """data with every line end (CRLF, CR or LF) an LF."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data


class ReplyCapture:
    """Text and usage of a streamed reply, read from its SSE events on the side of the relay."""

    def __init__(self, keep_text=True):
        self.keep_text = keep_text
        self.parts = []
        self.usage = {}         # token counts as the server reported them
        self.complete = False   # message_stop seen
        self.failed = None      # why the reply failed (an error event's message), or None
        self.stop_reason = None

    def feed(self, data):
        """Take the next whole events of the stream, as an EventSplitter returns them."""
        # Without the text, only the message's start, delta and stop, and errors, matter:
        # splitting and parsing every content event cost most of the relay's CPU.
        if not self.keep_text and b"message_" not in data and b"error" not in data:
            return      # content events only, as most reads of a paced stream are
        events = sse_events(data) if self.keep_text else marked_events(data, (b"message_",
                                                                             b"error"))
        for raw in events:
            self.take(*parse_sse_event(raw))

    def take(self, name, event):
        """Take one event: its name and its parsed data."""
        if not isinstance(event, dict):     # any JSON can arrive; only objects carry text
            event = {}
        kind = event.get("type", name)
        delta = event.get("delta")
        if kind == "content_block_delta" and isinstance(delta, dict) and self.keep_text:
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self.parts.append(delta["text"])
        elif kind == "message_start" and isinstance(event.get("message"), dict):
            self.usage.update(usage_numbers(event["message"].get("usage")))
        elif kind == "message_delta":
            self.usage.update(usage_numbers(event.get("usage")))
            if isinstance(delta, dict):
                self.stop_reason = delta.get("stop_reason", self.stop_reason)
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.failed = upstream_message(json.dumps(event).encode()) or "an error event"

    def feed_message(self, message):
        """Take a whole reply, a message object (a non-streamed answer)."""
        self.parts = [reply_text(message)]
        self.complete = isinstance(message, dict)
        self.usage.update(usage_numbers(message.get("usage") if self.complete else None))
        self.stop_reason = message.get("stop_reason") if self.complete else None

    def text(self):
        """The reply's text if the stream completed without error, else ""."""
        return "".join(self.parts) if self.complete and not self.failed else ""

    def description(self):
        """The reply's text as an image's description (see description_text)."""
        return description_text(self.text(), self.stop_reason == "max_tokens")


def encode_chunk(data):
    """One HTTP/1.1 chunk holding data (RFC 9112 7.1)."""
    return b"%X\r\n%s\r\n" % (len(data), data)


def sse_error_event(message, kind="api_error"):
    """An SSE error event as Anthropic sends one mid-stream."""
    return b"event: error\ndata: %s\n\n" % json.dumps(anthropic_error(500, message, kind)).encode()


################ Upstream

# Opening a request to a model server, waiting for it while watching the client, what its
# refusals mean, and what it says it has.

# Headers: RFC 9110 7.6.1 hop-by-hop, plus what http.client or we set ourselves,
# what local servers must not see (credentials, betas), and what would make gzip.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# Expect too: the router answers a 100-continue itself and sends the whole body at once.
DROP_REQUEST_HEADERS = HOP_BY_HOP | HINT_HEADERS | {
    "host", "content-length", "accept-encoding", "x-api-key", "authorization",
    "anthropic-beta", "origin", "cookie", "expect"}
DROP_RESPONSE_HEADERS = HOP_BY_HOP | {"content-length", "server", "date"}

JOIN_BYTES = 65536          # a body up to this goes in one send with its head; more, apart


def connection_tokens(headers):
    """The lower-case tokens of every Connection header (RFC 9110 7.6.1: close, keep-alive,
    and the names of hop-by-hop fields)."""
    return {t.strip().lower() for v in headers.get_all("connection") or () for t in v.split(",")}


def filter_headers(headers, drop):
    """Return [(name, value)] without the drop set, headers named in Connection, and any
    header that is not a plain field line (see is_plain_field): an upstream's are looked
    at one by one, a request's HeaderFields are plain all (read_head took no other line)."""
    named = connection_tokens(headers)
    plain = isinstance(headers, HeaderFields)
    return [(k, v) for k, v in headers.items() if (low := k.lower()) not in drop
            and low not in named and (plain or is_plain_field(k, v))]


def is_plain_field(name, value):
    """True when name: value is a header line as read_head accepts one: a token name, a value
    without control characters but tab (no NUL, ESC, DEL, CR or an obs-fold's line break).

    http.client takes an upstream's headers as they come, and send_header writes them as
    they are; Claude Code's Node runtime refuses a response with such a header, and its
    retry of that "connection error" fails the same way."""
    line = "%s:%s\r\n" % (name, value)
    return bool(HEADER_LINE.fullmatch(line.encode("latin-1", "replace")))


def upstream_failure(error, url, connecting=False):
    """The ProxyError that tells the client why the upstream at url failed.

    A timeout while connecting means nothing accepted the connection (a machine
    asleep, a full backlog): that is "not reachable", like a refused connection,
    and not a model that is slow to answer."""
    timed_out = isinstance(error, TIMEOUT_ERRORS)
    if timed_out and not connecting:
        return ProxyError(504, "upstream %s did not answer in time" % url)
    if isinstance(error, http.client.HTTPException):
        return ProxyError(502, "upstream %s sent a broken response (%s)"
                          % (url, type(error).__name__))
    why = "no answer to connect" if timed_out else error.strerror or type(error).__name__
    return ProxyError(529, "upstream %s is not reachable (%s); is the model server running?"
                      % (url, why))


def open_upstream(url, method, path, body=None, headers=(), read_timeout=READ_TIMEOUT,
                  connect_timeout=CONNECT_TIMEOUT, client=None, key="", on_connect=None):
    """Send one request to the server at url; return its http.client.HTTPResponse once its
    headers are in (close it with close_upstream).

    The only place that opens upstream connections and knows their timeouts. One
    connection per request: nothing pooled can go stale and fail the next
    response with RemoteDisconnected. The connect timeout is short; the read
    timeout bounds each wait for bytes, not the whole answer, so a long generation
    streams on while a dead server is noticed.
    With client (its socket), raise ClientGone if it hangs up before the headers.
    key, if set, goes as a Bearer token (LM Studio's "Require Authentication",
    llama-server's and vLLM's --api-key); the client's own credentials never do.
    on_connect, if given, gets the connected socket, for another thread to shut down."""
    headers = list(dict(headers).items())
    if key:
        headers.append(("Authorization", "Bearer " + key))
    parts = urllib.parse.urlsplit(url)
    try:
        sock = socket.create_connection((parts.hostname, parts.port or 80), connect_timeout)
    except OSError as e:
        raise upstream_failure(e, url, connecting=True) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as http.client does
        sock.settimeout(read_timeout)
        if on_connect:
            on_connect(sock)
        send_request(sock, request_head(method, parts.path.rstrip("/") + path,
                                        host_header(parts), headers, body), body)
        if client is not None:
            await_upstream(sock, client, read_timeout)
        return final_response(sock, method)
    except (OSError, http.client.HTTPException) as e:
        sock.close()
        raise upstream_failure(e, url) from None
    except ClientGone:      # said first, so the log never lags the close
        log("client went away while the model was silent; closed the upstream request")
        sock.close()
        raise


def host_header(parts):
    """The Host header's value for a request to the URL split into parts (urlsplit's), as
    http.client writes it: an IPv6 address in brackets, the port unless it is 80."""
    host = parts.hostname if parts.hostname.isascii() else \
        parts.hostname.encode("idna").decode("ascii")
    host = "[%s]" % host if ":" in host else host
    return host if (parts.port or 80) == 80 else "%s:%d" % (host, parts.port)


def request_head(method, target, host, headers, body):
    """Return the bytes of a request's head: the request line, then Host, Accept-Encoding:
    identity and a Content-Length (unless headers [(name, value)] have one) as
    http.client's request() writes them, then headers. Raise ValueError for a header
    line read_head would refuse, http.client.InvalidURL for such a request line.

    Here, and not in http.client, so that the head goes out in one piece with a small
    body (send_request), and that each line is checked once: http.client's checks of
    each value (a regular expression per header) repeat what filter_headers already
    made sure of, and the rest are our own constants and numbers."""
    lines = ["%s %s HTTP/1.1\r\n" % (method, target), "Host: %s\r\n" % host,
             "Accept-Encoding: identity\r\n"]
    if not any(name.lower() == "content-length" for name, _ in headers):
        if isinstance(body, (bytes, bytearray)):
            lines.append("Content-Length: %d\r\n" % len(body))
        elif body is None and method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0\r\n")     # a body is expected: an empty one
        elif body is not None:
            raise ValueError("a body in pieces needs its Content-Length")
    lines += ["%s: %s\r\n" % (name, value) for name, value in headers]
    head = ("".join(lines) + "\r\n").encode("latin-1")     # strict, as http.client's
    line = REQUEST_LINE.match(head)
    if not line or line.end() != len(lines[0]):
        raise http.client.InvalidURL("not a request line: %r" % lines[0][:200])
    # Each line in the grammar, and as many line ends as lines: no value holds one.
    block = HEADER_BLOCK.match(head, line.end())
    if not block or block.end() != len(head) or head.count(b"\n") != len(lines) + 1:
        raise ValueError("a header that is not one plain field line")
    return head


def send_request(sock, head, body):
    """Send a request's head and body (bytes or a bytearray, an iterable of bytes, or None):
    a body of up to JOIN_BYTES in the head's send, as two sends are two packets the server
    wakes for; a bigger one in sends of its own, since copying it to join costs more."""
    whole = isinstance(body, (bytes, bytearray))
    if whole and len(body) <= JOIN_BYTES:
        sock.sendall(head + body)
        return
    sock.sendall(head)
    for piece in (body,) if whole else body or ():
        if piece:
            sock.sendall(piece)


def final_response(sock, method):
    """The response to the request sent on sock, past any interim (1xx) ones; its
    upstream_sock is sock, which close_upstream closes with it."""
    resp = http.client.HTTPResponse(sock, method=method)
    resp.upstream_sock = sock
    resp.begin()
    while 100 <= resp.status < 200:
        # Interim responses (RFC 9110 15.2): http.client skips 100 only, not 102 or 103.
        # begin() reads the next response when the headers are unset.
        resp.headers = None
        resp.begin()
    coding = resp.getheader("transfer-encoding")
    if coding is not None:
        # http.client decodes chunked alone, and only as the bare word: any other value
        # ("gzip, chunked", "chunked " with its trailing blank) it reads to the close, and
        # the framing reached the client as the body. We ask for no coding (RFC 9112 6.1).
        if coding.strip(" \t").lower() != "chunked":
            resp.close()
            raise http.client.UnknownTransferEncoding(coding[:40])
        if resp.length != 0:        # 0: a HEAD's, a 204's or a 304's, which has no body
            resp.chunked, resp.length = True, None
    return resp


def close_upstream(resp):
    """Close an upstream response and its connection; the server sees the close at once."""
    resp.close()                # its reader holds the socket open: first
    resp.upstream_sock.close()


def has_hung_up(client):
    """True when the client's side of the connection is closed (it is readable: so we peek)."""
    try:
        return client.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def has_left(client):
    """True when the client has hung up, asked without waiting."""
    poller = select.poll()
    poller.register(client, select.POLLIN)
    return bool(poller.poll(0)) and has_hung_up(client)


def await_upstream(sock, client, timeout, body=None):
    """Return once the upstream has bytes for us; raise ClientGone if the client hangs up first.

    A local model reads a long prompt for seconds to minutes before its first byte.
    When the user presses Esc meanwhile, Claude Code closes its connection; closing
    ours at once stops the model, where waiting for its next write (or, for a
    non-streamed request, its whole answer) keeps a one-slot server busy for nobody
    and queues the user's next prompt behind it. timeout bounds the silence, as the
    socket timeout would (socket.timeout, which upstream_failure reports as a 504).
    body, if given, is the response's body reader (ChunkedBody or PlainBody), which may
    hold bytes that poll cannot see."""
    if body is not None and body.at_hand():
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    # poll, not selectors: this runs between reads of every stream, and a poll object
    # costs one system call where an epoll selector costs four.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(client, select.POLLIN)
    while True:
        left = None if deadline is None else max(deadline - time.monotonic(), 0) * 1000
        ready = {fd for fd, _ in poller.poll(left)}
        if sock.fileno() in ready:
            return
        if not ready:
            raise socket.timeout("timed out")
        if has_hung_up(client):
            raise ClientGone()
        # The client sent bytes (a pipelined request): it is there; stop watching it.
        poller.unregister(client)


def read_within(resp, limit, seconds):
    """Return up to limit bytes of resp's body, all read within seconds (None: no bound);
    raise TimeoutError past that.

    The socket's timeout bounds each read, not the whole: a server that sends a byte a
    second never trips it. The model-list refresh runs on a client connection's thread,
    holding its slot, so a trickled /props held a slot for good, one more every 30 s."""
    deadline = None if seconds is None else time.monotonic() + seconds
    chunks, size = [], 0
    while size < limit:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("timed out: the answer took over %g s to arrive" % seconds)
        chunk = resp.read1(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def fetch_json(url, method, path, body=None, read_timeout=READ_TIMEOUT,
               connect_timeout=CONNECT_TIMEOUT, key="", client=None):
    """Return (status, parsed JSON or None) of one small upstream request.

    With client (its socket), raise ClientGone if it hangs up before the answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    resp = open_upstream(url, method, path, data, headers, read_timeout, connect_timeout,
                         client, key)
    try:
        raw = read_within(resp, MAX_ERROR_BODY_BYTES, read_timeout)
    except (OSError, http.client.HTTPException) as e:
        raise upstream_failure(e, url) from None
    finally:
        close_upstream(resp)
    try:
        reply = json.loads(raw)
    except (ValueError, RecursionError):
        return resp.status, None
    # Parsed just under the parser's limit, it would fail in a later json.dumps instead.
    return resp.status, reply if json_depth(reply) <= MAX_JSON_DEPTH else None


def server_start_mark(url, timeout=CONNECT_TIMEOUT, key=""):
    """A mark of llama-server's /props that is new each time the server starts, "sleeping"
    while it has unloaded its model, or None when it shows none.

    Its media_marker is drawn at random as the server starts (seen with b10434: a restart
    changed it); the build and model path are part of the mark too, so a new build or
    another model in its place counts as a restart."""
    try:
        status, props = fetch_json(url, "GET", "/props", read_timeout=timeout,
                                   connect_timeout=timeout, key=key)
    except ProxyError:
        return None
    if status != 200 or not isinstance(props, dict) or not props.get("media_marker"):
        return None
    if props.get("is_sleeping") is True:     # --sleep-idle-seconds: its model is unloaded
        return "sleeping"
    return "%s %s %s" % (props["media_marker"], props.get("build_info"), props.get("model_path"))


# What a model server's refusal means, and how Claude Code should take it.

# Error statuses a retry may fix: a model loading, a server busy or briefly away. Claude Code
# 2.1.332 retries 5xx, 401, 408, 409 and 429 ten times over about three minutes (README,
# "When something fails"); every other error goes out with x-should-retry: false, which
# stops that after one request, so what cannot succeed reaches the user at once.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 502, 503, 504, 529})

# Upstream texts that mean "the prompt does not fit the loaded context", with the group
# order of (prompt tokens, context tokens) when the text carries them. Claude Code
# compacts on "prompt is too long" and gives up on every other wording. They are
# looked for in every error status: LM Studio says some of them with a 500.
OVERFLOW_PATTERNS = (
    # llama.cpp llama-server (b10434, seen here)
    (r"request \((\d+) tokens\) exceeds the available context size \((\d+) tokens\)", "nm"),
    (r"exceeds the available context size", ""),
    # LM Studio (lmstudio-bug-tracker #546, #237, #2205; the 500 of its MLX engine, #2339)
    (r"keep the first (\d+) tokens when context the overflows.*?length of only (\d+) tokens", "nm"),
    (r"n_keep: (\d+) ?>= ?n_ctx: (\d+)", "nm"),
    (r"tokens to keep from the initial prompt is greater than the context length", ""),
    (r"n_keep \((\d+)\) >= n_ctx \((\d+)\)", "nm"),
    (r"context size has been exceeded", ""),
    # vLLM (vllm #12165, #36197; serving_engine.py up to v0.17, renderers/params.py since
    # v0.18). Most of its wordings also fit a refused max_tokens beside a prompt that
    # fits; overflow_error tells those apart by the numbers.
    (r"maximum context length is (\d+) tokens\. However, you requested (?:\d+ tokens \()?"
     r"(\d+) (?:tokens )?in the messages", "mn"),
    (r"maximum context length is (\d+) tokens\. However, your (?:request has|messages "
     r"resulted in) (\d+) (?:input )?tokens", "mn"),
    (r"maximum context length is (\d+) tokens\. However, you requested \d+ output tokens and "
     r"your prompt contains (?:at least )?(\d+) input tokens", "mn"),
    (r"maximum context length is (\d+) tokens\. However, you requested \d+ output tokens and "
     r"your prompt contains \d+ characters", "m"),
    (r"total length (\d+)\) is too long to fit into the model \(context length (\d+)\)", "nm"),
    (r"maximum context length is (\d+) tokens and your request has (\d+) input tokens", "mn"),
    # Ollama
    (r"exceeds the context length|exceeded max context length", ""),
    # already in Anthropic's words
    (r"prompt is too long: (\d+) tokens > (\d+)", "nm"),
    (r"prompt is too long", ""),
)


def server_message(raw):
    """What an upstream error body (bytes or text) says in the server's own words: the message
    of its JSON, in any server's shape; the body itself when it is not JSON; "" when its
    JSON has no message. Never the rest of a JSON body, which may echo the conversation."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail")
    return error if isinstance(error, str) else ""


def upstream_message(raw):
    """An upstream error body's message as the log, /status and the client are told it: on
    one line, cut short, control characters escaped (it may reach a terminal)."""
    text = server_message(raw)
    if not text.strip():
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return escape_log(" ".join(text.split())[:ERROR_TEXT_CHARS])


def short_reason(text):
    """The first clause of text, one line without brackets, at most FAILURE_REASON_CHARS."""
    text = re.split(r"\s+-\s+|[.;]\s|\n", text.strip(), maxsplit=1)[0]
    # Control characters go, raw or as upstream_message escaped them.
    text = re.sub(r"[\x00-\x1f\x7f-\x9f<>]|\\x[0-9a-f]{2}", " ", text)
    text = " ".join(text.split()).rstrip(".")
    if len(text) > FAILURE_REASON_CHARS:
        text = text[:FAILURE_REASON_CHARS - 3].rstrip() + "..."
    return text


def retry_headers(status):
    """The headers that tell Claude Code not to retry an error status a retry cannot fix."""
    return [] if status in RETRYABLE_STATUSES else [("x-should-retry", "false")]


def overflow_error(raw, estimated_input, context_length):
    """Anthropic's "prompt is too long" envelope if an upstream error body (or event), bytes or
    text, reports a context overflow in the server's own message, else None."""
    text = server_message(raw)
    for pattern, order in OVERFLOW_PATTERNS:
        match = re.search(pattern, text, re.IGNORECASE | re.DOTALL)
        if match:
            numbers = dict(zip(order, map(int, match.groups())))
            if numbers.get("m", 0) - numbers.get("n", float("inf")) >= MIN_OUTPUT_TOKENS:
                # The prompt fits with room to answer: the server refused max_tokens, and
                # compacting the conversation would not help (it fails the same way).
                return None
            limit = numbers.get("m") or context_length or estimated_input
            tokens = max(numbers.get("n") or estimated_input, limit + 1)
            return anthropic_error(
                400, "prompt is too long: %d tokens > %d maximum" % (tokens, limit))
    return None


def opening_error(head):
    """The text of the error event a stream opens with (head: its first whole events), or None.

    LM Studio answers a streamed request it cannot serve with 200 and the reason as
    the first SSE frame, an error event (thane-ai-agent#1395, lmstudio-bug-tracker#2322)."""
    first = (sse_events(head) or [b""])[0]
    name, event = parse_sse_event(first)
    if name != "error" and not (isinstance(event, dict) and event.get("type") == "error"):
        return None
    return json.dumps(event) if event else first.decode("utf-8", "replace")


################ Upstream bodies

# An upstream response's body as the relay reads it: a chunked one decoded many chunks a
# read, any other as http.client reads it, and whether bytes are at hand before a read.

# A chunk's head: the CRLF that ends the chunk before it, then its size line (RFC 9112 7.1).
# The size is hex digits only (int() would also take a sign, "0x", "_" and spaces); what
# follows a ';' is an extension, which a recipient must ignore if it does not know it.
CHUNK_HEAD = re.compile(rb"\r\n([0-9A-Fa-f]+)(?:[ \t]*;[^\r\n]*)?\r\n")
MAX_CHUNK_HEAD = 4096       # bytes of a chunk's head: size line, extensions and CRLFs


class ChunkError(http.client.HTTPException):
    """An upstream's chunked body broke its framing (RFC 9112 7.1)."""


class ChunkedBody:
    """A chunked response body, decoded from whole reads of the connection.

    http.client's read1 returns at most one chunk a call, through four Python calls,
    and whether more is at hand cost a peek and two settimeout calls; model servers
    send each SSE event as a chunk of its own, so all of that was paid per event. One
    read() here takes what the connection holds and decodes every chunk in it; the
    bytes left are a chunk still arriving, so after a read that did not fill its
    buffer nothing more is at hand until the socket has some, which poll sees.
    The last chunk ends the body: its trailers (RFC 9112 7.1.2), which a recipient may
    discard, are never read or waited for, since the connection is closed after it."""

    def __init__(self, fp, sock):
        self.fp = fp            # http.client's buffered reader of the connection
        self.sock = sock
        self.held = b"\r\n"     # bytes not yet decoded: as if a chunk had just ended, so
                                # each size line comes after a CRLF (see CHUNK_HEAD)
        self.left = 0           # bytes of the current chunk's data still to come
        self.ended = False      # the last chunk has come
        self.broken = None      # what is wrong with the framing, once it is
        self.unsure = True      # the reader may hold bytes: before the first read, or
                                # after a read that filled the whole size asked

    def read(self, size):
        """Return the data that one read of the connection brings: b"" if it held framing
        only, or at the end (then ended is set).

        Raise IncompleteRead if the connection ends before the last chunk, ChunkError
        once the framing is broken (the data before the break is returned first)."""
        if self.broken:
            raise ChunkError(self.broken)
        if self.ended:
            return b""
        data = self.fp.read1(size)     # what the reader holds, or one read of the socket
        if not data:
            raise http.client.IncompleteRead(b"")
        # A read1 that returns less than asked left nothing in the reader.
        self.unsure = len(data) == size
        return self.decode(self.held + data if self.held else data)

    def decode(self, data):
        """Return the chunk data in data, all bytes not yet decoded; hold a chunk head cut off."""
        parts, at, end, left = [], 0, len(data), self.left
        self.held = b""
        while at < end:
            if not left:
                head = CHUNK_HEAD.match(data, at)
                if head is None or head.end() - at > MAX_CHUNK_HEAD:
                    self.held = data[at:]
                    self.broken = chunk_head_problem(self.held)
                    break
                at, left = head.end(), int(head[1], 16)
                if not left:
                    self.ended = True
                    break
            stop = at + left
            parts.append(data[at:stop])
            at, left = (stop, 0) if stop <= end else (end, stop - end)
        self.left = left
        return b"".join(parts)

    def at_hand(self):
        """True when a read now will not wait for the upstream."""
        return self.ended or bool(self.broken) or (
            self.unsure and has_buffered_bytes(self.fp, self.sock))


def chunk_head_problem(rest):
    """What is wrong with rest, the start of a chunk head that CHUNK_HEAD did not match (or
    too long), or None when it may be one cut off by a read."""
    if not b"\r\n".startswith(rest[:2]):
        return "no CRLF after a chunk's data"
    line_end = rest.find(b"\n", 2)
    if (len(rest) if line_end < 0 else line_end + 1) > MAX_CHUNK_HEAD:
        return "a chunk size line of over %d bytes" % MAX_CHUNK_HEAD
    return "a chunk size that is not hex digits" if line_end >= 0 else None


class PlainBody:
    """A body framed by its Content-Length or by the connection's close, read with http.client
    (read/ended/at_hand as ChunkedBody's)."""

    def __init__(self, resp):
        self.resp = resp
        self.ended = False
        self.drained = False    # the last look found no byte at hand

    def read(self, size):
        """Return what one read of the body brings; b"" at its end (then ended is set)."""
        data = self.resp.read1(size)
        self.ended, self.drained = not data, False
        return data

    def at_hand(self):
        """True when a read now will not wait for the upstream."""
        resp = self.resp
        if resp.fp is None or resp.length == 0:
            return True         # its body is all read: the next read returns b"" at once
        if not self.drained:    # drained, bytes can only come to the socket, which poll sees
            self.drained = not has_buffered_bytes(resp.fp, resp.upstream_sock)
        return not self.drained


def upstream_body(resp):
    """The reader of resp's body: ChunkedBody or PlainBody."""
    return ChunkedBody(resp.fp, resp.upstream_sock) if resp.chunked else PlainBody(resp)


def has_buffered_bytes(fp, sock):
    """True when the buffered reader fp of sock has bytes at hand, so reading it will not wait."""
    timeout = sock.gettimeout()
    sock.settimeout(0)      # a non-blocking peek: b"" now means nothing has arrived yet
    try:
        return bool(fp.peek(1))
    except OSError:
        return True         # let the read itself report what is wrong
    finally:
        sock.settimeout(timeout)


################ Model listings

# What the server says it has: LM Studio's, llama-server's, vLLM's and Ollama's lists.

# Advice for what the startup check finds, per (problem, kind of server); "" is any other.
FIXES = {
    ("missing", "lmstudio"): "lms get {model}, or set --{role}-model to one of those",
    ("missing", "ollama"): "ollama pull {model}, or set --{role}-model to one of those",
    ("missing", ""): "set --{role}-model to one of those",
    ("unloaded", "lmstudio"): "lms load {model} --gpu max (or start the router with --preload)",
    ("unloaded", ""): "load it on the model server",
    ("blind", "llama.cpp"): "restart llama-server with --mmproj <the model's mmproj .gguf>, "
                            "or point --vision-upstream at a server whose model has vision",
    ("blind", ""): "set --vision-model to a model with vision",
    ("small", "lmstudio"): "lms unload {model} && "
                           "lms load {model} --context-length 32768 --gpu max",
    ("small", "llama.cpp"): "restart llama-server with -c 32768",
    ("small", "vllm"): "restart vLLM with --max-model-len 32768",
    ("small", "ollama"): "restart Ollama with OLLAMA_CONTEXT_LENGTH=32768",
    ("small", ""): "load it with 32768 tokens of context",
}


def read_objects(obj, name):
    """The objects in the list obj[name]; none when it is no list."""
    return [e for e in read_typed(obj, name, list, []) if type(e) is dict]


def read_id(obj, name):
    """A model id at obj[name], escaped: it reaches terminals (the log, the status line,
    claude-local), and an id can carry escape sequences. None when it is no string."""
    value = read_typed(obj, name, str)
    return escape_log(value) if value else None


def models_from_listing(listing):
    """Return {model id: {"loaded", "context_length", "vision"}} from a server's model list.

    Reads LM Studio's /api/v1/models, and the OpenAI or Anthropic /v1/models shape
    (llama-server adds meta.n_ctx, vLLM max_model_len); what a listing does not say is None."""
    found = {}
    for entry in read_objects(listing, "models"):
        key = read_id(entry, "key")
        if key is None:
            continue
        loaded = read_objects(entry, "loaded_instances")
        config = read_typed(loaded[0], "config", dict) if loaded else None
        found[key] = info = {
            "loaded": bool(loaded), "context_length": read_typed(config, "context_length", int),
            "vision": read_typed(read_typed(entry, "capabilities", dict), "vision", bool)}
        for instance in loaded:
            if read_id(instance, "id") not in (None, key):
                found[read_id(instance, "id")] = info
    capabilities = {read_id(e, "model"): e["capabilities"] for e in read_objects(listing, "models")
                    if type(e.get("capabilities")) is list}
    for entry in read_objects(listing, "data"):
        name = read_id(entry, "id")
        if name is not None:
            context = (read_typed(read_typed(entry, "meta", dict), "n_ctx", int)   # llama-server
                       or read_typed(entry, "max_model_len", int))                # vLLM
            found.setdefault(name, {"loaded": True, "context_length": context,
                                    "vision": listed_vision(entry, capabilities.get(name))})
    return found


def listed_vision(entry, capabilities):
    """True or False when a /v1/models entry says whether it takes images, else None.

    llama-server says it twice: data[].architecture.input_modalities (["text"] without
    an mmproj) and, in its Ollama-style models[], capabilities ("multimodal" with one)."""
    modalities = read_typed(read_typed(entry, "architecture", dict), "input_modalities", list)
    if modalities is not None:
        return "image" in modalities
    if capabilities is not None:
        return "multimodal" in capabilities or "vision" in capabilities
    return None


def server_kind(path, listing):
    """Which server answered a model listing at path: lmstudio, llama.cpp, vllm, ollama or other."""
    if path == "/api/v1/models":
        return "lmstudio"
    entries = read_objects(listing, "data")
    owners = {read_typed(e, "owned_by", str) for e in entries}
    if "llamacpp" in owners or any("meta" in e for e in entries):
        return "llama.cpp"
    if "vllm" in owners:
        return "vllm"
    if owners & {"library", "ollama"}:     # Ollama names a pulled model's namespace
        return "ollama"
    return "other"


def find_model(models, kind, model):
    """Return (info, id it is served as) for model on a server's list, or (None, None).

    A llama-server with one model serves it whatever name a request gives."""
    if model in models:
        return models[model], model
    if kind == "llama.cpp" and len(models) == 1:
        (served, info), = models.items()
        return info, served
    return None, None


def fix_for(problem, kind, role, model):
    """The advice for a problem with the role's model, in the words of that kind of server."""
    return FIXES.get((problem, kind), FIXES[problem, ""]).format(role=role, model=model)


def model_report(role, model, kind, models):
    """Return (one line on what the server has for the role's model, [problems with their fix])."""
    info, served = find_model(models, kind, model)
    if info is None:
        have = ", ".join(sorted(models)[:LISTED_IDS]) + (
            ", ..." if len(models) > LISTED_IDS else "")
        return ("%s %s: not on the server" % (role, model),
                ["%s model %s is not on the %s server, which has: %s. Fix: %s"
                 % (role, model, kind, have or "no models", fix_for("missing", kind, role, model))])
    images = {True: "sees images", False: "text only", None: "images unknown"}
    context = info.get("context_length")
    line = "%s %s%s: %s, %s, %s" % (
        role, model, "" if served == model else " (served by %s, the server's only model)" % served,
        "loaded" if info.get("loaded") else "not loaded",
        "%d-token context" % context if context else "context unknown",
        images[info.get("vision")])
    problems = []
    if not info.get("loaded"):
        problems.append("%s model %s is not loaded. Fix: %s"
                        % (role, model, fix_for("unloaded", kind, role, model)))
    if role == "vision" and info.get("vision") is False:
        problems.append("vision model %s cannot see images; the coder answers image turns "
                        "without them. Fix: %s" % (served, fix_for("blind", kind, role, model)))
    if role == "vision" and context and context < SMALL_VISION_CONTEXT:
        problems.append("vision model %s is loaded with %d context. Fix: %s"
                        % (served, context, fix_for("small", kind, role, model)))
    return line, problems


def list_models(url, timeout=CONNECT_TIMEOUT, key=""):
    """Return (kind of server, {model id: info}) from the server at url, LM Studio's API first.

    (None, None) when it is down; kind "needs-key" when it refused the listing."""
    found, kind = None, None
    for path in ("/api/v1/models", "/v1/models"):
        try:
            status, listing = fetch_json(url, "GET", path, read_timeout=timeout,
                                         connect_timeout=timeout, key=key)
        except ProxyError:
            return None, None
        if status in (401, 403):
            return "needs-key", {}
        if status == 200:
            found = {**models_from_listing(listing), **(found or {})}
            kind = kind or server_kind(path, listing)
            if found and path == "/api/v1/models":
                break
    return kind or "other", found if found is not None else {}


################ Vision

# Asking the vision model to describe an image, what its reply leaves as a description,
# and what the router remembers between turns.

# Why a vision request failed, in the words of the marker, for what the router saw itself.
FAILURE_WORDS = {502: "its server sent a broken response", 504: "no answer in time",
                 529: "its server is not reachable"}


def describe_request(block, context, model):
    """The request that asks the vision model to describe one image."""
    content = ([text_block(context)] if context else []) + [
        {k: v for k, v in block.items() if k != "cache_control"}]
    return {"model": model, "max_tokens": DESCRIBE_MAX_TOKENS, "temperature": 0,
            "stream": False, "system": DESCRIBE_PROMPT,
            "messages": [{"role": "user", "content": content}]}


def image_contexts(messages, keys, wanted):
    """Return {key: (image block, context text)} for the wanted images of the user's turn.

    The context is the user's own words in that turn (not the reminders Claude Code
    or the router add), or the tool the image came from."""
    found = {}
    tools = {b["id"]: b["name"] for m in messages if m["role"] == "assistant"
             for b in content_blocks(m["content"]) if b.get("type") == "tool_use"}
    turn = [m for m in messages[current_turn_start(messages):] if m["role"] == "user"]
    said = " ".join(b["text"] for m in turn for b in content_blocks(m["content"])
                    if b.get("type") == "text" and not b["text"].startswith("<system-reminder>"))
    said = said.strip()[:DESCRIBE_CONTEXT_CHARS]
    for message in turn:
        for block in content_blocks(message["content"]):
            inner = [block]
            context = "The user wrote: %s" % said if said else ""
            if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                inner = block["content"]
                context = "This image is the result of the tool %s." % tools.get(
                    block["tool_use_id"], "call")
            for item in inner:
                if is_image(item) and keys[image_data(item)] in wanted:
                    found.setdefault(keys[image_data(item)], (item, context))
    return found


def reply_text(message):
    """The text of an Anthropic message object, text blocks joined."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return ""
    return "".join(b.get("text", "") for b in content
                   if isinstance(b, dict) and b.get("type") == "text"
                   and isinstance(b.get("text"), str))


def description_text(text, cut_off=False, context=""):
    """A vision reply's text as an image's description.

    Text the router put in the vision request (its synthetic turns, markers of
    other images, a describe request's context) is dropped when the model echoes
    it. A reply that max_tokens cut off loses its repetition (a small model
    looping), or says that it is cut off, so it is never kept as if it were complete."""
    for injected in (*INJECTED_TEXTS, context):
        text = text.replace(injected, "") if injected else text
    text = re.sub(r"\n{3,}", "\n\n", re.sub(MARKER_PATTERN, "", text)).strip()
    if cut_off and text:
        trimmed = trim_repetition(text)
        text = trimmed if trimmed != text else "%s %s" % (text, CUT_OFF_NOTE)
    return text


def trim_repetition(text):
    """text up to the end of the first copy of a sentence or line run it repeats to its end."""
    spans = [m.span() for m in re.finditer(r"[^.!?\n]+[.!?]*", text)]
    units = [text[a:b].strip() for a, b in spans]
    n, best = len(units), None
    for period in range(1, min(n // 3, REPEAT_MAX_UNITS) + 1):
        start = n - period          # the repeating tail begins here; its last unit may be cut
        while start > 0 and (units[start - 1] == units[start - 1 + period] or (
                start - 1 + period == n - 1 and units[start - 1].startswith(units[-1]))):
            start -= 1
        if n - start >= 3 * period and (best is None or start < best[0]):
            best = (start, period)
    if best is None:
        return text
    return text[:spans[best[0] + best[1] - 1][1]].rstrip()


def describe_image(url, block, context, model, key="", client=None):
    """Return (description or "", prompt bytes, failure) from the vision model; failure is
    None or (why in a few words, for the marker; what /status is told; a status or None).

    With client (its socket), raise ClientGone if it hangs up first."""
    request = describe_request(block, context, model)
    try:
        status, reply = fetch_json(url, "POST", "/v1/messages", request, key=key, client=client)
    except ProxyError as e:
        log("! describe failed: %s" % e)
        return "", 0, (FAILURE_WORDS.get(e.status, "error %d" % e.status), str(e), e.status)
    sent = len(json.dumps(request))
    if status != 200:
        log("! describe failed: upstream status %d" % status)
        message = upstream_message(json.dumps(reply).encode())
        return "", sent, (short_reason(message) or "error %d" % status, message, status)
    if type(reply) is not dict:
        # Whatever a server answers, its turn fails with a reason, never with a 500 that
        # every retry meets again.
        log("! describe failed: the reply is not a JSON object")
        return "", sent, (FAILURE_WORDS[502], "describe: the vision model's reply is not a "
                          "JSON object, so %s" % FAILURE_WORDS[502], 502)
    text = description_text(reply_text(reply), reply.get("stop_reason") == "max_tokens", context)
    return text, sent, None if text else (
        "it gave no description", "describe: it gave no description", None)


class Vision:
    """The vision model's side of the router, one per Server: the description cache, the
    images being described now (claims), those it failed on, describing and learning.

    settle() gives a turn the descriptions of its images and claims the new ones it is to
    send to the vision model, waiting for those another turn is describing; describe()
    asks for each claimed image's description (describe mode, and the fallback);
    learn() keeps a vision answer as the description of a turn's images; failed()
    remembers images it could not read; release() ends a claim. Below them: claim(),
    wait() and resolve() keep a Future per image being described, resolving to
    (description, failure); note_failure(), failure_reasons() and recent_failures()
    keep the failures."""

    def __init__(self, server, cache_dir, max_entries=MEMORY_MAX_ENTRIES):
        self.server = server            # its settings (models, upstream, key) and counters
        self.cache = DescriptionCache(cache_dir)
        self.lock = threading.Lock()    # guards pending and failures
        self.max_entries = max_entries  # bound of failures; the oldest entry goes first
        self.pending = {}               # image key -> Future of (description, failure)
        self.failures = {}              # image key -> (time.monotonic() of failure, reason)
        self.retry_after = VISION_RETRY_AFTER   # s before a failed image goes to the model again

    def settle(self, messages, keys, client):
        """Return (descriptions, claimed): the descriptions of the request's images, and the
        new images of the user's turn that this request is now the one to send to the
        vision model.

        An image another request is describing is waited for (at most DESCRIPTION_WAIT),
        so no image goes to the vision model twice; one it failed on recently is not
        sent again and stays a marker saying why. Raise ClientGone if the client (its
        socket) hangs up while it waits."""
        deadline = time.monotonic() + DESCRIPTION_WAIT
        descriptions = self.cache.lookup(keys.values())
        while True:
            unknown = [k for k in keys.values() if k not in descriptions]
            failed = self.recent_failures(unknown)
            wanted = [k for k in new_image_keys(messages, keys, descriptions) if k not in failed] \
                if self.server.vision_model else []     # text only: images stay markers
            claimed, busy = self.claim(wanted, unknown)
            if not busy or time.monotonic() >= deadline:
                return descriptions, claimed
            log("waiting for the description of %d image(s) being made" % len(busy))
            descriptions.update(self.wait(busy, deadline, client))

    def describe(self, messages, keys, wanted, mode, client=None, contexts=None):
        """Ask the vision model to describe each wanted image; store and return {key: text}.

        One request per image keeps each description tied to its image; a few run at
        once, since local servers serve several requests in parallel. An image it
        cannot describe is remembered as failed. With client (its socket), the requests
        end if it hangs up, and so does the turn: ClientGone, once the others are in.
        contexts: {key: what to tell the vision model of it}, in place of image_contexts'."""
        server = self.server
        found = {key: (block, (contexts or {}).get(key, context))
                 for key, (block, context) in image_contexts(messages, keys, wanted).items()}
        server.upstream_wanted(server.vision_upstream_url)
        with concurrent.futures.ThreadPoolExecutor(
                min(DESCRIBE_CONCURRENCY, len(found) or 1), initializer=set_log_request,
                initargs=(None, request_id())) as pool:
            jobs = {key: pool.submit(describe_image, server.vision_upstream_url, block, context,
                                     server.vision_model, server.upstream_key, client)
                    for key, (block, context) in found.items()}
        described, failed, gone = {}, {}, False
        for key, job in jobs.items():
            try:
                text, sent, failure = job.result()
            except ClientGone:
                gone = True
                continue
            server.count_vision_call(mode, sent)
            if text:
                described[key] = text
            else:
                reason, message, status = failure
                server.note_error(message, status)      # /status names it, as in answer mode
                failed.setdefault(reason, []).append(key)
        self.keep(described, server.vision_model)
        if described:
            log("described %d image(s) with %s [%s]" % (len(described), mode, server.vision_model))
        for reason, failed_keys in failed.items():
            self.failed(failed_keys, reason)
        if gone:
            raise ClientGone()
        return described

    def learn(self, text, model, keys):
        """Keep a vision reply's text (a description, see description_text) for the new images."""
        if text:
            self.keep(dict.fromkeys(keys, text), model)

    def keep(self, descriptions, model):
        """Store {key: description} made by model, count them, and hand them to whoever waits."""
        self.cache.store(descriptions, model)
        self.server.count_described(len(descriptions))
        for key, text in descriptions.items():
            self.resolve([key], text)

    def failed(self, keys, reason):
        """Remember that the vision model could not read these images; say so in the log."""
        self.note_failure(keys, reason)
        log("! the vision model could not read %d image(s): %s; not sent to it again for %ds"
            % (len(keys), reason, self.retry_after))
        self.resolve(keys, failure=reason)

    def release(self, keys):
        """End the caller's claim on keys, waking whoever still waits for them."""
        self.resolve(keys)

    # Claims.

    def claim(self, keys, watched):
        """Mark keys as being described by the caller and return (keys, {}); or, while any
        of watched is being described by another request, claim nothing and return
        ([], {key: its Future}).

        All or nothing, so two requests never wait for each other. pending holds only
        the images of requests in flight (each releases its claim), so it needs no bound."""
        with self.lock:
            busy = {k: self.pending[k] for k in watched if k in self.pending}
            if busy:
                return [], busy
            for k in keys:
                self.pending[k] = concurrent.futures.Future()
            return list(keys), {}

    def resolve(self, keys, description=None, failure=None):
        """End the claim on keys with what came of it, (None, None) for nothing: the Future of
        each resolves to (description, failure)."""
        with self.lock:
            done = [self.pending.pop(k) for k in keys if k in self.pending]
        for future in done:
            future.set_result((description, failure))

    def wait(self, busy, deadline, client):
        """Wait for the busy {key: Future} until deadline; return {key: description} of those
        described. Raise ClientGone if the client hangs up meanwhile."""
        waiting = set(busy.values())
        while waiting and time.monotonic() < deadline:
            _, waiting = concurrent.futures.wait(
                waiting, min(HANGUP_CHECK, max(deadline - time.monotonic(), 0)))
            if waiting and has_left(client):
                log("client went away while waiting for a description")
                raise ClientGone()
        return {k: f.result()[0] for k, f in busy.items() if f.done() and f.result()[0]}

    # Failures.

    def note_failure(self, keys, reason):
        """Remember that the vision model could not read these images, and why.

        The marker of a failed image is part of the conversation from then on, and the
        server caches the prompt through it, so it must read the same on every later
        turn: a failure that happens again keeps the first reason, and the record
        outlives retry_after (which only decides when the image is sent again) until
        the bound evicts it or the router restarts. Then an image of an earlier turn
        becomes the unknown-image marker, and the server re-reads the prompt from that
        message once: the least surprising choice, since keeping failures on disk would
        also keep the image from being tried again after a restart."""
        now = time.monotonic()
        with self.lock:
            for k in keys:
                first = self.failures.pop(k, (now, reason))[1]
                self.failures[k] = (now, first)
            drop_oldest(self.failures, self.max_entries)

    def failure_reasons(self, keys):
        """{key: reason} for the keys the vision model could not read."""
        with self.lock:
            return {k: self.failures[k][1] for k in keys if k in self.failures}

    def recent_failures(self, keys):
        """The keys the vision model failed on less than retry_after ago."""
        now = time.monotonic()
        with self.lock:
            return {k for k in keys
                    if k in self.failures and now - self.failures[k][0] < self.retry_after}


################ Connections

# How many client connections are served at once, and what happens to the one past that:
# a thread per connection is http.server's way, so the cap is the bound on threads.

class BoundedServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer that serves at most max_connections connections at once. Past
    that a new connection takes the slot of the one idle longest, which is closed; when
    every connection is in the middle of a request, it is turned away with a 503 from the
    accepting thread.

    process_request() takes a slot (take_slot) or calls turn_away(); process_request_thread()
    frees it (free_slot). A Handler between requests is idle: connection_idle() while it
    waits, connection_busy() once a request begins, which says whether a newcomer took its
    slot meanwhile (it then answers no_room_answer()). service_actions() and
    drop_turned_away() close the turned-away sockets a second later, server_close() the rest."""

    def __init__(self, address, handler, max_connections=MAX_CONNECTIONS):
        # Set before binding: when binding fails, __init__ calls server_close, which reads them.
        self.max_connections = max_connections
        self.slots = threading.Condition()      # guards the three below; the tests wait on it
        self.served = 0                         # connections holding a slot
        self.idle = {}                          # {socket: None} waiting for a request, longest first
        self.evicted = set()                    # idle ones whose slot went on, their thread not ended
        self.turned_away = []                   # [(time.monotonic(), socket)] answered 503
        self.at_limit = False                   # the last connection found no free slot
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        """Serve a connection in a thread of its own while it has a slot; turn it away, without
        a thread, when it has none.

        A connection holds its thread for its whole life, idle keep-alive too, so without
        a cap idle sockets make threads without bound: 1,200 made 1,201 threads before a
        single request was read."""
        slot = self.take_slot()
        if slot != "free" and not self.at_limit:    # said once until a slot is free again
            log("! %d client connections are open, the limit: a new one takes the place of the "
                "one idle longest, or gets 503 when none is idle" % self.max_connections)
        self.at_limit = slot != "free"
        if not slot:
            return self.turn_away(request)
        try:
            super().process_request(request, client_address)
        except Exception:       # no thread started to free the slot
            self.free_slot(request)
            raise
        # Not BaseException: a KeyboardInterrupt (Ctrl-C, --stop's SIGTERM) comes while
        # Thread.start() waits for a thread that has started and frees the slot itself;
        # freeing it here too counted it twice (with a semaphore, a ValueError that the
        # accept loop logged and went on from: the router ignored the signal, 1 stop in 15).

    def take_slot(self):
        """Take a slot for a new connection: "free", "idle" (the longest-idle connection's,
        which is closed), or "" when every connection is in the middle of a request.

        Idle keep-alive sockets (a few per Claude Code session, a buggy client's, a port
        scanner's) would otherwise lock new clients out for IDLE_TIMEOUT; nginx reuses idle
        keep-alive connections under pressure the same way. At most max_connections closed
        ones may still be ending, so there are never more than twice that many threads."""
        with self.slots:
            if self.served < self.max_connections:
                self.served += 1
                self.slots.notify_all()
                return "free"
            if not self.idle or len(self.evicted) >= self.max_connections:
                return ""
            sock = next(iter(self.idle))
            del self.idle[sock]
            self.evicted.add(sock)
            # The reading side only: that wakes the connection's thread, which closes the
            # connection, or answers a request that began just now (BSD drops bytes not yet
            # read: that client sees a close, as when any server closes an idle connection).
            # Under the lock, as the thread closes its socket only after leaving idle: the
            # descriptor is still its own, not a newer connection's.
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            self.slots.notify_all()
            return "idle"

    def free_slot(self, request):
        """Give a connection's slot back, unless take_slot gave it to a newcomer already."""
        with self.slots:
            self.idle.pop(request, None)
            if request in self.evicted:
                self.evicted.discard(request)
            else:
                self.served -= 1
            self.slots.notify_all()

    def connection_idle(self, request):
        """Note that a connection waits for its next request: a newcomer may take its slot."""
        with self.slots:
            self.idle[request] = None
            self.slots.notify_all()

    def connection_busy(self, request):
        """Note that a connection's wait has ended; False if its slot went to a newcomer."""
        with self.slots:
            self.idle.pop(request, None)
            self.slots.notify_all()
            return request not in self.evicted

    def process_request_thread(self, request, client_address):
        """Serve one connection (ThreadingMixIn's), then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.free_slot(request)

    def no_room_answer(self):
        """The whole 503 response for a connection that has no slot, as bytes."""
        message = "the router serves %d connections at once and has no room for more; " \
                  "try again shortly" % self.max_connections
        body = json.dumps(anthropic_error(503, message)).encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    def turn_away(self, request):
        """Answer a connection that has no slot with a 503 at once, from the accepting thread.

        A 503, not a bare close and not a 529: Claude Code retries a 503 for about three
        minutes, interactively too, which outlasts a burst, then shows our words; a 529
        (or an overloaded_error) it gives up on within seconds when interactive, and a
        close reads as a router that crashed. The socket is half-closed now and closed a
        second later (service_actions): closed at once, with the request unread, it
        would send a reset, which can destroy the answer before the client reads it
        (RFC 9112 9.6)."""
        request.setblocking(False)
        try:
            request.send(self.no_room_answer())
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.turned_away.append((time.monotonic(), request))
        while len(self.turned_away) > self.max_connections:
            self.drop_turned_away()

    def service_actions(self):
        """Between accepts (serve_forever's): close the turned-away connections a second on."""
        super().service_actions()
        while self.turned_away and time.monotonic() - self.turned_away[0][0] > 1.0:
            self.drop_turned_away()

    def drop_turned_away(self):
        """Close the oldest turned-away connection, dropping first what it sent (a few reads)."""
        sock = self.turned_away.pop(0)[1]
        try:
            for _ in range(16):
                if not sock.recv(RELAY_BUFFER):
                    break
        except OSError:     # nothing more has arrived (it does not block), or it is gone
            pass
        sock.close()

    def server_close(self):
        """Close the listening socket and every turned-away connection."""
        super().server_close()
        while self.turned_away:
            self.drop_turned_away()


################ Handler

class ProtocolHandler(http.server.BaseHTTPRequestHandler):
    """One client connection's HTTP/1.1, stricter than http.server's: waiting for each
    request, reading it, refusing what is malformed with Anthropic's envelope, and writing
    the answers. Its subclass Handler answers each request (handle_request), as
    http.server's SimpleHTTPRequestHandler answers what BaseHTTPRequestHandler reads.

    handle() serves the connection; handle_one_request() waits for a request
    (await_request), reads its head (read_head) and hands it to a do_ method, else to
    handle_request(method); receive_body() reads its body, against a deadline. refuse()
    answers a ProxyError, answer_unexpected() a bug; finish() and linger() close after a
    refused request. Answers: send_head (date_time_string), send_json, write_client,
    end_stream and end_response. log_message keeps http.server's access lines for the
    verbose log."""

    protocol_version = "HTTP/1.1"       # keep-alive; so every response must be framed
    disable_nagle_algorithm = True      # each event goes out at once, no 40 ms Nagle delay
    timeout = IDLE_TIMEOUT              # idle keep-alive connections end, after the client's
    server_version = "claude-router/" + VERSION
    unread_input = False                # the client may still be sending its request's bytes
    join_limit = JOIN_BYTES             # bytes of body sent in the head's write; more, a write apart
    date = (0, "")                      # (a second, its Date value), shared by all handlers

    def handle(self):
        """Serve the connection's requests, then refresh the model list if one claimed that.

        The claiming request's response said Connection: close, so the client sends its
        next request on a new connection instead of waiting behind the refresh."""
        self.refresh_due = False
        self.trim_due = False           # a body over TRIM_AFTER_BYTES came: trim at the end or idle
        try:
            super().handle()
        finally:
            if self.trim_due:
                release_freed_memory()
            if self.refresh_due:
                self.server.refresh_models()

    def handle_one_request(self):
        """Wait for a request, read it and answer it; every request gets an answer.

        Unlike http.server's version: waiting for a request may take IDLE_TIMEOUT, but
        one that stalls once begun gets a 408 after request_timeout; a request is read
        under one strict rule (read_head); a ProxyError gets Anthropic's envelope; and
        anything else is a bug: a 500 (or an error event inside a stream), the
        connection closed, and Server.handle_error logs its traceback once."""
        self.response_started = False   # our status line is fixed once this is set
        self.unsent_head = b""          # a response head held back to go with the first write
        self.stream_frame = None        # while an SSE body is going out: how to frame its bytes
        self.body = b""
        if not self.await_request():
            self.close_connection = True
            return
        set_log_request(self.server.request_ids)
        self.unread_input = True
        try:
            self.read_head()
        except ProxyError as e:
            return self.refuse(e)
        except Exception:
            self.answer_unexpected()
            raise
        handler = getattr(self, "do_" + self.command, None)
        handler() if handler else self.handle_request(self.command)

    def await_request(self):
        """Wait up to the idle timeout for a request to begin; False if none does.

        Meanwhile the connection is idle, and at the connection cap a newcomer may take its
        slot (BoundedServer.take_slot), which wakes it here to close. A request that began
        just then gets the 503 a newcomer with no slot gets: serving it would pass the cap,
        and closing without a word would read as a router that crashed."""
        self.server.connection_idle(self.connection)
        if self.trim_due and not self.client_sends_within(self.server.trim_idle_seconds):
            release_freed_memory()
            self.trim_due = False
        self.connection.settimeout(self.timeout)
        try:
            begun = bool(self.rfile.peek(1))
        except OSError:         # the idle timeout, or a reset
            begun = False
        finally:
            kept = self.server.connection_busy(self.connection)
        if begun and not kept:
            self.unread_input = True    # so finish() lingers: a reset could destroy the answer
            self.write_client(self.server.no_room_answer())
        return begun and kept

    def client_sends_within(self, seconds):
        """True once the client sends a byte, closes or fails within seconds; else False.

        A peek at the socket itself: a timed-out read of rfile would leave it unreadable.
        Bytes the client sent with the last body and rfile holds are not seen here: they
        wait seconds more (no client we know of sends a request before the last answer)."""
        self.connection.settimeout(seconds)
        try:
            self.connection.recv(1, socket.MSG_PEEK)
        except TIMEOUT_ERRORS:
            return False
        except OSError:         # a reset: the wait for the request meets it too
            pass
        return True

    def read_head(self):
        """Read the request line and headers; raise ProxyError unless they are plain HTTP/1.x.

        Sets command, path (normalised), request_version, headers and close_connection
        as http.server's parse_request does. A head that is all in the buffer (almost
        every one: the wait for the request read its first bytes) is taken in one piece
        (split_head); any other is read a line at a time under its deadline (HeadLines),
        which also finds what is wrong with a head split_head would not take."""
        self.command, self.request_version, self.close_connection = "", "HTTP/1.0", True
        self.requestline, self.headers = "", HeaderFields()
        head = split_head(self.rfile.peek())
        if head:
            match, lines, length = head
            self.rfile.read(length)     # buffered: no wait
            self.requestline = match[0].rstrip(b"\r\n").decode("latin-1")
        else:
            reader = HeadLines(self.rfile, self.connection, self.server.request_timeout)
            try:
                match, lines = reader.read()
            except ProxyError as e:
                self.unread_input = e.status != 408     # a stalled client sends no more
                raise
            finally:
                self.requestline = reader.requestline
        method, path, query, minor = match.groups()
        self.command, self.request_version = method.decode(), "HTTP/1.%s" % minor.decode()
        self.headers = HeaderFields(lines)
        connection = connection_tokens(self.headers)
        self.close_connection = "close" in connection or (
            minor == b"0" and "keep-alive" not in connection)
        path = normalize_path(path.decode())
        if path is None:
            raise ProxyError(400, "the path has an encoded slash or backslash")
        self.path = path + query.decode()
        if len(self.headers.get_all("host") or ()) > 1:
            raise ProxyError(400, "more than one Host header")

    def receive_body(self):
        """Read the request's body, for any method, once the checks that may refuse it passed.

        A request is never answered with its body unread and the connection open: those
        bytes would be read as the next request. Expect: 100-continue is answered here,
        after the access and size checks, not before them as http.server does."""
        length = body_length(self.headers, self.command, self.server.max_body_bytes)
        if length and self.request_version == "HTTP/1.1" and \
                self.headers.get("expect", "").lower() == "100-continue":
            self.write_client(b"HTTP/1.1 100 Continue\r\n\r\n")
        seconds = self.server.request_timeout + length / (1 << 20) * self.server.body_time_per_mb
        self.trim_due = self.trim_due or length > TRIM_AFTER_BYTES
        try:
            read = read_split if length > self.server.split_body_bytes else read_exactly
            body = read(self.rfile, self.connection, length, seconds) if length else b""
        except TIMEOUT_ERRORS:
            self.unread_input = False   # a stalled client sends nothing more to wait for
            self.close_connection = True
            raise ProxyError(408, "the request body did not arrive in %.0f s" % seconds) from None
        if len(body) < length:
            raise ProxyError(400, "request body ended after %d of %d bytes" % (len(body), length))
        self.unread_input = False
        self.connection.settimeout(self.timeout)    # writing the answer may take long
        self.body = body

    def refuse(self, error):
        """Answer a ProxyError with Anthropic's envelope; close if the request was not all read."""
        if error.status >= 500:
            log("! %s" % error)
            self.server.note_error(str(error), error.status)
        if self.unread_input or error.status == 408:
            self.close_connection = True    # unread bytes must not pass for a request
        self.send_json(error.status, anthropic_error(error.status, str(error), error.error_type),
                       retry_headers(error.status))

    def finish(self):
        """Close the connection, after letting a refused client finish sending (see linger)."""
        if self.unread_input:
            self.linger()
        super().finish()

    def linger(self):
        """Half-close, then read and drop what the client still sends, for LINGER_TIMEOUT at most.

        Closing a socket with unread bytes makes the kernel reset the connection, and the
        reset can destroy the answer before the client reads it (RFC 9112 9.6)."""
        deadline = time.monotonic() + LINGER_TIMEOUT
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while deadline > time.monotonic():
                self.connection.settimeout(deadline - time.monotonic())
                if not self.rfile.read1(RELAY_BUFFER):
                    break
        except OSError:
            pass

    def answer_unexpected(self):
        """Answer a request whose handling raised something unexpected, then close.

        After a bug we no longer know what the connection holds, so it closes."""
        self.close_connection = True
        message = "the router failed on this request (a bug); its log has the details"
        if self.stream_frame:
            self.end_stream(sse_error_event(message))
        elif not self.response_started:
            self.send_json(500, anthropic_error(500, message), retry_headers(500))

    def send_head(self, status, headers, data=b"", hold=False):
        """Start the response: the status line, Server and Date as http.server's send_response
        writes them, headers [(name, value)], Connection: close when the connection ends
        after it, then data (the body) in the same write. With hold, the head goes out with
        the next write_client instead (a stream's first events, which are at hand).

        One write where send_response, send_header and end_headers, then the body, make
        two: a send and a packet fewer per response. A body over join_limit goes in a
        write of its own: copying it costs more than that saves."""
        self.response_started = True
        self.sent_status = status
        self.log_request(status)
        lines = ["%s %d %s\r\n" % (self.protocol_version, status,
                                    self.responses.get(status, ("",))[0]),
                 "Server: %s\r\n" % self.version_string(),
                 "Date: %s\r\n" % self.date_time_string()]
        lines += ["%s: %s\r\n" % (name, value) for name, value in headers]
        if self.close_connection:
            lines.append("Connection: close\r\n")
        head = ("".join(lines) + "\r\n").encode("latin-1")   # strict, as send_header's
        if hold:
            self.unsent_head = head
        elif len(data) > self.join_limit:
            self.write_client(head) and self.write_client(data)
        else:
            self.write_client(head + data)

    def send_json(self, status, obj, headers=()):
        """Send obj as a JSON response with Content-Length, and headers [(name, value)]."""
        data = json.dumps(obj).encode()
        self.send_head(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data))), *headers],
                       data if self.command != "HEAD" else b"")

    def date_time_string(self, timestamp=None):
        """The Date header's value (http.server's) for now, or for timestamp: for now, made
        once a second, as formatting it took a third of the rest of a response's head."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        second, text = ProtocolHandler.date
        if second != now:
            text = super().date_time_string(now)
            ProtocolHandler.date = (now, text)      # one assignment: no thread sees half of it
        return text

    def write_client(self, data):
        """Write to the client, after the response's head if send_head held it back; return
        False, marking the connection closed, if the client is gone."""
        if self.unsent_head:
            data, self.unsent_head = self.unsent_head + data, b""
        try:
            self.wfile.write(data)
            return True
        except (ConnectionError, *TIMEOUT_ERRORS):
            self.close_connection = True
            return False

    def end_stream(self, event=b""):
        """End the SSE body, after event if given, in one write."""
        data = self.stream_frame(event) if event else b""
        if self.stream_frame is encode_chunk:
            data += b"0\r\n\r\n"
        self.stream_frame = None
        if data:
            self.write_client(data)

    def end_response(self):
        """Let the client go before slow work: its response is complete; close the
        connection, so that its next request does not wait behind this thread."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def log_message(self, format, *args):
        """Access and protocol lines, only when verbose; client strings escaped."""
        if self.server.verbose:
            log(escape_log("%s %s" % (self.address_string(), format % args)))


class Handler(ProtocolHandler):
    """What the router answers each request with: dispatch, and the endpoints it answers
    itself. A /v1/messages turn is a Turn; the upstream's response to any request is
    relayed by a Relay.

    handle_request() checks access, reads the body (receive_body) and routes it;
    handle_routed() counts and times /v1/messages, which do_POST sends it. Endpoints
    (routes) take the body with read_body or read_request: probe, status, models,
    count_tokens, messages (a Turn), and forward for any other /v1/ or /api/ path."""

    def do_POST(self):
        if urllib.parse.urlsplit(self.path).path == "/v1/messages":
            return self.handle_routed()
        self.handle_request("POST")

    def handle_request(self, method):
        """Check access, read the body and dispatch; answer every failure, the unexpected too.

        A ProxyError gets Anthropic's envelope. Anything else is a bug: it gets a 500 (or
        an error event, inside a stream) and the connection closes, then it goes on to
        Server.handle_error, which logs its traceback once."""
        path = urllib.parse.urlsplit(self.path).path
        try:
            check_access(self.headers, self.server.token, self.server.host)
            self.receive_body()
            route = self.routes.get((method, path))
            if route:
                return route(self)
            if method not in ("GET", "POST", "HEAD"):
                raise ProxyError(405, "method %s is not supported" % method)
            if path.startswith(("/v1/", "/api/")):
                return self.forward(method)
            raise ProxyError(404, "no such endpoint: %s %s" % (method, escape_log(path[:200])))
        except ClientGone:
            self.close_connection = True
            self.outcome = CLIENT_LEFT
        except ProxyError as e:
            self.outcome = str(e)
            self.refuse(e)
        except Exception:
            self.answer_unexpected()
            raise

    def handle_routed(self):
        """POST /v1/messages, counted and timed: a line with its status and seconds follows it."""
        server = self.server
        if server.claim_refresh():
            self.refresh_due = True
            self.close_connection = True
        self.sent_status = self.outcome = None
        self.rewarm = None      # a Turn sets the conversation whose coder prompt to send again
        started = server.request_started(self.connection)
        self.record = started[1]    # the Turn names its route and model in it
        try:
            self.handle_request("POST")
        finally:
            seconds = server.request_ended(started, self.sent_status, self.outcome == CLIENT_LEFT)
            log(outcome_line(self.sent_status, seconds, self.outcome))
        if self.rewarm is not None:
            server.warm("after a vision turn", server.warmer.prompt_of(self.rewarm))

    def read_body(self):
        """Return the request body (read before dispatch) as bytes, letting go of it here."""
        body, self.body = self.body, b""
        return body.whole() if type(body) is SplitBody else body

    def read_request(self, fields=REQUEST_FIELDS):
        """Return (the request body parsed, validated and cleaned (checked_request), {id() of
        each cleaned part: its ReadPart}), reading and checking only what recent requests
        did not send too (RequestParts).

        json.loads(bytes) would decode a copy while the bytes live on; decoding first
        and dropping the bytes keeps two copies of an 8 MB body in memory, not three."""
        raw, self.body = self.body, b""
        try:
            if type(raw) is SplitBody:
                body, parts = raw.parse(self.server.request_parts.read)
            else:
                text = raw.decode("utf-8")
                del raw
                body, parts = self.server.request_parts.read(text)
                del text
        except UnicodeDecodeError:
            raise ProxyError(400, "request body is not valid JSON (or not UTF-8)") from None
        clean = checked_request(body, fields, parts)
        self.server.request_parts.remember(parts)
        return clean, {id(part.clean): part for part in parts.values()
                       if part.checked and part.clean}

    # Endpoints the router answers itself.

    def probe(self):
        """HEAD / and GET /: Claude Code's warm-up probe."""
        self.send_json(200, {"ok": True, "service": "claude-router", "version": VERSION})

    def status(self):
        """GET /status: what the router knows, without asking the upstream.

        When warm-ups are on, a stale model list is looked at after the answer, on a
        closed connection: claude-local reads /status as Claude Code starts, so a server
        restarted since the last look gets its warm-up then."""
        if self.server.warmer.enabled and self.server.claim_refresh():
            self.refresh_due = True
            self.close_connection = True
        self.send_json(200, self.server.status())

    def models(self):
        """GET /v1/models: the upstreams' models as last seen, else the configured two, in
        Anthropic's shape.

        A list older than LISTING_TTL is looked at again after the answer, on a closed
        connection, by one request at a time: a client polling this reaches the model
        server at most once per LISTING_TTL, and never waits for it."""
        if self.server.claim_refresh(LISTING_TTL):
            self.refresh_due = True
            self.close_connection = True
        ids = list(self.server.known_models() or ()) or [
            m for m in (self.server.coder_model, self.server.vision_model) if m]
        data = [{"type": "model", "id": i, "display_name": i,
                 "created_at": "1970-01-01T00:00:00Z"} for i in ids]
        self.send_json(200, {"data": data, "has_more": False,
                             "first_id": ids[0], "last_id": ids[-1]})

    def count_tokens(self):
        """POST /v1/messages/count_tokens: the upstream's count, else a local estimate."""
        server = self.server
        clean, _ = self.read_request(COUNT_TOKENS_FIELDS)
        clean["messages"], _ = server.documents.read(clean["messages"], server.coder_context(),
                                                     quiet=True)
        keys = image_keys(clean["messages"])
        _, _, clean["messages"], _ = route_request(
            clean, keys, server.vision.cache.lookup(keys.values()), "", "", [])
        clean["model"] = server.coder_model
        counted = server.upstream_token_count(clean)
        if counted is None:
            counted = EncodedRequest(clean, keys).tokens()
        self.send_json(200, {"input_tokens": counted})

    def messages(self):
        """POST /v1/messages: one turn, routed to a model (see Turn)."""
        Turn(self).run()

    def forward(self, method):
        """Pass any other /v1/ or /api/ request through to the upstream as it is."""
        body = self.read_body() if method == "POST" else None
        headers = filter_headers(self.headers, DROP_REQUEST_HEADERS)
        with Relay.open(self, self.server.upstream_url, method, self.path, body, headers) as relay:
            relay.send()

    routes = {
        ("GET", "/"): probe, ("HEAD", "/"): probe, ("HEAD", "/api/hello"): probe,
        ("GET", "/status"): status, ("GET", "/v1/models"): models,
        ("POST", "/v1/messages"): messages, ("POST", "/v1/messages/count_tokens"): count_tokens,
    }


################ Relay

class Relay:
    """One upstream response, relayed to the client of a Handler: whole, as an event stream
    as it arrives, or as an error in Anthropic's envelope.

    open() sends the request and returns the Relay once the response's headers are in; as
    a context manager it closes the upstream connection. read_head() and read_error_body()
    read what may still decide our status (a status is sent once); send() relays the
    response (send_whole, send_stream, pump, read_events, stream_failed); send_error() and
    send_overflow() answer an upstream's refusal; send_headers() starts our response
    with the upstream's headers; wait() returns once the upstream has bytes, watching
    the client meanwhile, and client_left() says in the log what a client that hung up
    had of the answer."""

    def __init__(self, handler, resp, url):
        self.handler = handler
        self.resp = resp
        self.url = url
        self.body = upstream_body(resp)     # reads its body: a chunked one many chunks a read
        self.splitter = EventSplitter()     # an event stream's bytes, as whole events
        self.relayed = 0        # bytes of the answer's body the client has been sent
        self.deltas = 0         # of them, pieces of the answer (content_block_delta events)

    @classmethod
    def open(cls, handler, url, method, path, body, headers):
        """Send a request for handler's client, which ends if the client hangs up; return its
        Relay once the upstream's headers are in."""
        server = handler.server
        if method == "POST":    # a listing or a HEAD takes no slot of a one-slot server
            server.upstream_wanted(url)
        resp = open_upstream(url, method, path, body, headers, server.read_timeout,
                             server.connect_timeout, client=handler.connection,
                             key=server.upstream_key)
        return cls(handler, resp, url)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        close_upstream(self.resp)

    def wait(self):
        """Return once the response has bytes to read; raise ClientGone if the client hangs up first."""
        try:
            await_upstream(self.resp.upstream_sock, self.handler.connection,
                           self.handler.server.read_timeout, self.body)
        except ClientGone:
            self.client_left()      # before the upstream is closed, so the log never lags it
            raise

    def client_left(self):
        """Log that the client hung up, and what it had of the answer by then."""
        self.handler.outcome = CLIENT_LEFT
        log("client went away %s; closed the upstream request" % (
            "after %d piece%s of the answer (%s) reached it" % (
                self.deltas, "s" * (self.deltas > 1), short_size(self.relayed))
            if self.deltas else "while the model was silent"))

    def read_head(self):
        """The first whole events of an upstream event stream (b"" for other bodies), read
        before our status goes out, so what they say can still decide it (a status is
        sent once).

        Reads until an event is complete (or STREAM_HEAD_BYTES are held, or the end): an
        opening error event may come in several reads. What is held stays in the
        splitter for pump()."""
        if not is_event_stream(self.resp):
            return b""
        head = b""
        try:
            while not head and self.splitter.size < STREAM_HEAD_BYTES and not self.body.ended:
                self.wait()
                head = self.splitter.feed(self.body.read(RELAY_BUFFER))
        except (OSError, http.client.HTTPException) as e:
            raise upstream_failure(e, self.url) from None
        except EventTooLarge:
            pass            # pump() meets it again and ends the stream
        return head

    def read_error_body(self):
        """The first MAX_ERROR_BODY_BYTES of an upstream error's body (b"" if it breaks off)."""
        try:
            return self.resp.read(MAX_ERROR_BODY_BYTES)
        except (OSError, http.client.HTTPException):
            return b""

    def send_headers(self, framing=None, data=b"", hold=False):
        """Send the upstream's status and headers, with our own framing header, then data
        (see ProtocolHandler.send_head, also for hold).

        Hop-by-hop headers stay behind (RFC 9110 7.6.1), and so do the upstream's
        Content-Length and Transfer-Encoding: http.client has undone its framing."""
        headers = filter_headers(self.resp.headers, DROP_RESPONSE_HEADERS)
        self.handler.send_head(self.resp.status, headers + [framing] if framing else headers,
                               data, hold)

    def send(self, learn=None, head=b"", keep_text=False):
        """Relay the upstream's response: an event stream as it arrives, anything else whole;
        return the reply as a ReplyCapture (a stream's text only with keep_text).

        learn, if given, gets that capture once a complete successful reply is in and
        before the response ends, so the next turn finds what it says in the cache.
        head is what was already read of a stream."""
        if self.handler.command == "HEAD":
            # No body, and the length the GET's body would have (RFC 9110 9.3.2).
            length = self.resp.getheader("content-length", "")
            self.send_headers(("Content-Length", length) if re.fullmatch("[0-9]+", length)
                              else None)
            return ReplyCapture()
        if not is_event_stream(self.resp):
            return self.send_whole(learn)
        return self.send_stream(learn, head, keep_text)

    def send_whole(self, learn=None):
        """Relay a response that is not an event stream in one write; return its ReplyCapture."""
        try:
            data = self.resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise upstream_failure(e, self.url) from None
        reply = ReplyCapture()
        if self.resp.status == 200:
            try:
                reply.feed_message(json.loads(data))
            except (ValueError, RecursionError):
                pass
        if learn and reply.complete:
            learn(reply)
        self.send_headers(("Content-Length", str(len(data))), data)
        return reply

    def send_stream(self, learn=None, head=b"", keep_text=False):
        """Relay an SSE stream as it arrives; return its ReplyCapture."""
        handler = self.handler
        chunked = handler.request_version == "HTTP/1.1"
        if not chunked:
            handler.close_connection = True     # HTTP/1.0: the end of the body is the close
        # The head waits for the events at hand (pump's first write), to go in one write.
        self.send_headers(("Transfer-Encoding", "chunked") if chunked else None, hold=bool(head))
        handler.stream_frame = encode_chunk if chunked else bytes
        capture = ReplyCapture(keep_text=keep_text)
        broken, gone = self.pump(head, capture)
        if not capture.complete and not capture.failed and not gone and keep_text:
            # Its answer is not whole (cut, stalled, or ended before message_stop): a
            # failure of the model, which Claude Code's retry must not meet again.
            capture.failed = "its answer %s" % (broken[0] if broken else "ended early")
        if learn and capture.complete and not capture.failed:
            # Before the response ends, a broken one too (a stream cut after message_stop
            # is a whole answer): the next turn finds it.
            learn(capture)
        if broken:
            self.stream_failed(*broken)
        elif not gone:
            handler.end_stream()
        return capture

    def pump(self, events, capture):
        """Write the stream's events to the client, from those already read (events), as
        read_events() brings them: each time one chunk in one write. Return (None or
        (what, why) the upstream's stream failed, whether the client left).

        Each chunk holds whole events only; the bytes of an event still arriving wait
        for the next read. So a stream that breaks off hands the client only whole
        events, then the error event."""
        handler, ended, failure = self.handler, False, None
        while True:
            if events:
                capture.feed(events)
                if not handler.write_client(handler.stream_frame(events)):
                    self.client_left()
                    return None, True
                self.relayed += len(events)
                self.deltas += events.count(DELTA_MARK)
            if ended:
                return failure, False
            events, ended, failure = self.read_events()

    def read_events(self):
        """Wait for the upstream; return (the whole events of what it has sent by now, whether
        its stream ended, None or (what, why) it failed).

        A read returns what the connection brings, not a wait for a size (read(n) would
        hold tokens back, urllib3#2123); what further reads find at hand, up to
        RELAY_BUFFER bytes, goes out with it: one write for a burst of events, and never
        a wait for more. A chunked body's one read takes every chunk at hand."""
        events, size = [], 0
        try:
            self.wait()
            while True:
                events.append(self.splitter.feed(self.body.read(RELAY_BUFFER)))
                size += len(events[-1])
                if self.body.ended:
                    partial = self.splitter.has_partial()
                    return b"".join(events), True, (("broke off", "it ended inside an event")
                                                    if partial else None)
                if size >= RELAY_BUFFER or not self.body.at_hand():
                    return b"".join(events), False, None
        except ChunkError as e:
            return b"".join(events), True, ("broke off", str(e))
        except (OSError, http.client.HTTPException) as e:
            return b"".join(events), True, (
                "stalled" if isinstance(e, TIMEOUT_ERRORS) else "broke off", type(e).__name__)
        except EventTooLarge as e:
            # Held whole, it would stall the client and hold the memory: end it here.
            return b"".join(events), True, ("broke off", str(e))

    def stream_failed(self, what, why):
        """End a stream whose upstream failed: headers are out, so say it in band."""
        handler = self.handler
        log("! upstream stream %s (%s)" % (what, why))
        handler.outcome = "upstream stream %s" % what
        handler.server.note_error(handler.outcome)
        handler.end_stream(sse_error_event("the model server's stream %s" % what,
                                           "overloaded_error"))
        handler.close_connection = True

    def send_error(self, estimate, context_length):
        """Relay an upstream error in Anthropic's envelope with the server's own words.

        A context overflow becomes Anthropic's "prompt is too long", on which Claude Code
        compacts the conversation instead of giving up. What a retry cannot fix says so
        (retry_headers). A 404 (a model the server does not have) goes out as 502: on a
        404 Claude Code shows its own "issue with the selected model" text instead."""
        handler, resp = self.handler, self.resp
        raw = self.read_error_body()
        error = overflow_error(raw, estimate, context_length)
        if error:
            return self.send_overflow(error)
        handler.outcome = upstream_message(raw)
        handler.server.note_error(handler.outcome, resp.status)
        handler.close_connection = handler.close_connection or not resp.isclosed()
        status = 502 if resp.status == 404 else resp.status
        wait = resp.getheader("retry-after")     # Claude Code honours it on a 429
        wait = [("Retry-After", wait)] if wait and is_plain_field("Retry-After", wait) else []
        handler.send_json(status, anthropic_error(status, handler.outcome),
                          retry_headers(resp.status) + wait)

    def send_overflow(self, error):
        """Answer a context overflow with Anthropic's "prompt is too long" (Claude Code compacts)."""
        log("! context overflow upstream; answered %r" % error["error"]["message"])
        self.handler.outcome = error["error"]["message"]
        self.handler.send_json(400, error)


################ Turn

SESSION_HEADER = "x-claude-code-session-id" # Claude Code's conversation id


class Turn:
    """One POST /v1/messages, read top to bottom in run(): clean the request, put each
    document's text in its place (DocumentReader), settle its images, let the vision
    model try a turn that brings new ones, and let the coder answer every other turn,
    and the turns the vision model fails.

    run() is the turn and try_vision() the vision model's go at it; send() sends the turn
    to one model (prepare) and relays the answer (answer, then after_vision); learn()
    keeps what a whole reply says; vision_error() and vision_failure() put the vision
    model's failures in a few words; note_prompt() and note_usage() keep the prompt
    statistics, per request class; note_warm_up() keeps what a warm-up needs."""

    def __init__(self, handler):
        self.handler = handler
        self.server = handler.server
        self.vision = handler.server.vision

    def run(self):
        """Clean the request, read its documents and settle what is known of its images; then
        the vision model answers a turn with new images and the coder every other, or the
        coder when the vision model fails."""
        self.clean, self.parts = self.handler.read_request()
        self.clean["messages"], self.pages = self.server.documents.read(
            self.clean["messages"], self.server.coder_context())
        self.keys = image_keys(self.clean["messages"])
        self.descriptions, claimed = self.vision.settle(self.clean["messages"], self.keys,
                                                        self.handler.connection)
        try:
            if claimed and not self.try_vision(claimed):
                return
        finally:
            # Described, or failed and remembered: a turn waiting for these images need not
            # wait for our coder turn too.
            self.vision.release(claimed)
        self.send([])

    def try_vision(self, claimed):
        """Give the vision model the claimed images: described (describe mode, and the pages of
        a scanned PDF), or the turn to answer. Return False when its answer went to the
        client, True when the coder answers."""
        # Scanned pages are described one by one in either mode: the coder reads each in its
        # page's place, where one answer of the vision model to the whole turn would stand
        # for every page of the document alike.
        scans = [k for k in claimed if k in self.pages]
        if scans:
            self.descriptions.update(self.vision.describe(
                self.clean["messages"], self.keys, scans, "describe", self.handler.connection,
                self.pages))
            claimed = [k for k in claimed if k not in self.pages]
        if not claimed:
            return True
        if self.server.vision_mode == "describe":
            self.descriptions.update(self.vision.describe(
                self.clean["messages"], self.keys, claimed, "describe", self.handler.connection))
            return True
        failure = self.send(claimed)
        if failure is None:
            return False
        self.vision.failed(claimed, failure)
        log("the coder answers instead")
        return True

    def send(self, new_keys):
        """Send the turn to the vision model (new_keys: the images it is to see) or the coder,
        and relay the answer. Return None; or, when the vision model failed before any
        of its answer reached the client, a few words saying why."""
        data, length = self.prepare(new_keys)
        headers = [(k, v) for k, v in filter_headers(self.handler.headers, DROP_REQUEST_HEADERS)
                   if k.lower() != "content-type"] + [("Content-Type", "application/json"),
                                                      ("Content-Length", str(length))]
        try:
            relay = Relay.open(self.handler, self.upstream, "POST", "/v1/messages", data, headers)
        except ProxyError as e:
            return self.vision_failure(e)
        del data
        with relay:
            reply, failure = self.answer(relay)
        if reply is not None and self.route == "vision":
            self.after_vision(reply)
        return failure

    def prepare(self, new_keys):
        """Route the turn and encode it for its model; return (body bytes, their length).
        The route, model and upstream are kept; the route line is logged and counted."""
        server = self.server
        self.new_keys = new_keys
        self.route, self.model, messages, substituted = route_request(
            self.clean, self.keys, self.descriptions, server.vision_model, server.coder_model,
            new_keys, self.vision.failure_reasons(self.keys.values()))
        if self.route == "coder" and server.side_model and is_side_request(self.handler.headers,
                                                                           self.clean):
            self.route, self.model = "side", server.side_model
        self.upstream = {"vision": server.vision_upstream_url,
                         "side": server.side_upstream_url}.get(self.route, server.upstream_url)
        self.context_length = server.model_info(self.model, self.upstream).get("context_length")
        outgoing = {**self.clean, "model": self.model, "messages": messages}
        encoded = EncodedRequest(outgoing, self.keys, server.encoded_parts, self.parts)
        self.estimate = encoded.tokens()
        encoded.clamp(self.context_length)
        log("→ %s [%s]%s" % (self.route, self.model, self.note_prompt(encoded, outgoing)))
        self.note_warm_up(outgoing)
        if substituted:
            log("cached description for %d image(s)" % substituted)
        server.count(self.route, self.model, self.upstream, encoded.length, self.handler.record)
        return encoded.data(), encoded.length

    def answer(self, relay):
        """Relay the model's answer; return (its ReplyCapture, or None when none went out;
        None, or why the vision model failed before any of its answer reached the client)."""
        vision, status = self.route == "vision", relay.resp.status
        if status >= 400 and vision:
            return None, self.vision_error(status, relay.read_error_body())
        if status >= 400:
            relay.send_error(self.estimate, self.context_length)
            return None, None
        try:
            head = relay.read_head()
        except ProxyError as e:
            return None, self.vision_failure(e)
        opening = opening_error(head) if head else None
        if opening and vision:
            return None, self.vision_error(status, opening.encode())
        overflow = overflow_error(opening, self.estimate, self.context_length) if opening else None
        if overflow:
            relay.send_overflow(overflow)
            return None, None
        reply = relay.send(self.learn, head, keep_text=vision)
        if not reply.complete or reply.failed:      # learn was not called
            self.note_usage(reply.usage)
        return reply, None

    def learn(self, reply):
        """Keep what a whole reply says: its usage, and a vision answer as the images'
        description. Called before the response ends: a /status read (the status line)
        right after the turn finds its figures, and the next turn finds the description."""
        self.note_usage(reply.usage)
        if self.route == "vision":
            self.vision.learn(reply.description(), self.model, self.new_keys)

    def after_vision(self, reply):
        """Once a vision answer went out: remember it if it failed midway; describe the images
        if it described nothing."""
        if reply.failed:
            # Its answer had begun, so the coder cannot take this turn over; remembering the
            # failure sends Claude Code's retry to the coder instead of failing the same way.
            self.vision.failed(self.new_keys, short_reason(reply.failed))
        elif reply.complete and not reply.description():
            # A bare tool call describes nothing: describe each image on its own, so the
            # coder never loses sight of it, once the client has its answer.
            self.handler.end_response()
            self.vision.describe(self.clean["messages"], self.keys, self.new_keys, "fallback")

    def vision_error(self, status, raw):
        """A few words for the vision model's error answer (raw: its body or error event)."""
        message = upstream_message(raw)
        self.server.note_error(message, status)
        return short_reason(message) or "error %d" % status

    def vision_failure(self, error):
        """A few words for a ProxyError of the vision model's request; raise it again for the
        coder's, and when the vision model shares the coder's server and that is down."""
        server = self.server
        if self.route != "vision" or (error.status == 529
                                      and server.vision_upstream_url == server.upstream_url):
            raise error
        server.note_error(str(error), error.status)
        return FAILURE_WORDS.get(error.status, "error %d" % error.status)

    def note_prompt(self, encoded, body):
        """Remember the prompt sent to the model (body, as encoded); return the route line's
        note on what it reuses.

        Claude Code names its conversation in a header; other clients' are told apart
        by their system text, tools and first message. Within one, each request class
        keeps its own books (conversation_key)."""
        headers = self.handler.headers
        names, digests, sizes = encoded.prompt_parts()
        self.klass = request_class(headers)
        self.conversation = conversation_key(headers.get(SESSION_HEADER, "")[:100], self.klass,
                                             names, digests, len(body["messages"]))
        system = content_text(body.get("system")) if self.klass == "auxiliary" else ""
        return reuse_note(encoded.length, self.server.prompts.note_prompt(
            self.conversation, self.model, names, digests, sizes, encoded.length)) + class_note(
            self.klass, headers.get(COMPACTION_HEADER, ""), COMPACTED_HEADER in headers, system)

    def note_warm_up(self, body):
        """Keep what a warm-up needs from a main coder turn: its prompt's head and the prompt;
        mark a vision turn that swapped the coder out on its server for a warm-up after it."""
        server = self.server
        if not server.warmer.enabled:
            return
        if self.route == "coder" and self.klass in ("", "main") and "tools" in body:
            server.warmer.remember(self.model, self.upstream, body)
            server.warmer.note_prompt(self.conversation, body)

        def served(name):
            return server.model_info(name, self.upstream).get("served_by", name)
        # Answer mode on one server: the vision model answered, so on a machine that holds
        # one model at a time the coder, and its cache, are gone.
        swapped = self.route == "vision" and server.vision_mode == "answer" and \
            self.upstream == server.upstream_url and served(self.model) != served(
                server.coder_model)
        self.handler.rewarm = self.conversation if swapped else None

    def note_usage(self, usage):
        """Log and keep the token counts the server reported for this turn, if it did."""
        if "input_tokens" not in usage:
            return
        cached = usage.get("cache_read_input_tokens", 0)
        log("usage [%s]: %d prompt tokens, %d of them from the server's cache"
            % (self.model, usage["input_tokens"] + cached, cached))
        self.server.prompts.note_usage(self.model, usage)


################ Warm-up

# Warm-ups. A local server reuses its cache only for the unchanged head of a prompt, and
# Claude Code's first prompt is some 12k tokens of system text, tools and environment
# that every session sends alike: minutes on a CPU, on every first turn after the server
# (re)started or (re)loaded the coder. The router sends that head ahead of the user, and
# after a vision turn swapped the coder out, the conversation's last coder prompt.

WARM_UP_TEXT = "."                          # the user text after the head in a warm-up


def prompt_head(body):
    """The head of a coder prompt as sent: {system, tools, tool_choice (those it has),
    "reminders": the <system-reminder> blocks that open its first user message}.

    Claude Code's environment (cwd, platform, date) opens the first user message; with
    it, a warm-up covers all but the user's own words (measured: 11,693 of 11,705 tokens
    of the next first turn, against 9,417 with system and tools alone)."""
    head = {k: body[k] for k in ("system", "tools", "tool_choice") if k in body}
    first = body["messages"][0] if body["messages"] else {}
    reminders = []
    for block in first.get("content", []) if first.get("role") == "user" else []:
        if block.get("type") != "text" or not block["text"].startswith("<system-reminder>"):
            break
        reminders.append(block)
    return {**head, "reminders": reminders}


def warm_up_request(model, head):
    """The warm-up request for a prompt head: encoded as a turn is, one token of answer."""
    fields = {k: v for k, v in head.items() if k != "reminders"}
    message = {"role": "user", "content": [*head["reminders"], text_block(WARM_UP_TEXT)]}
    return {"model": model, **fields, "messages": [message], "max_tokens": 1, "stream": False}


class Warmer:
    """The heads of coder prompts (kept on disk) and the one warm-up that may run.

    remember / head_request: keep a coder prompt's head per (model, upstream), on disk
    (write) only when it changes; load (with read) reads them back at start (a damaged
    file is ignored with one warning). note_prompt / prompt_of: the last coder prompt,
    whole, for the warm-up after a vision turn. check_coder sees a server's coder cache
    gone; start (Server.warm calls it) starts a warm-up, claim, run, attach, cancel,
    finish keep it to one at a time; a request about to go to the coder's server cancels
    it at once (Server.upstream_wanted). status: /status's warm_up."""

    def __init__(self, directory, enabled):
        self.enabled = enabled              # False: no warm-ups and no heads file
        self.path = os.path.join(directory or CACHE_DIR, HEADS_FILE)
        self.lock = threading.Lock()        # guards heads, seen, last_prompt, and the warm-up fields
        self.write_lock = threading.Lock()  # one writer of the file at a time, in order
        self.heads = {}                     # (model, upstream) -> the head as JSON text
        self.seen = {}                      # (model, upstream) -> the last head, marshalled
        self.last_prompt = None             # (conversation, the last coder prompt's body)
        self.running = None                 # the warm-up running: {reason, what, started}
        self.sock = None                    # its upstream socket, once connected
        self.cancelled = None               # why a turn cancelled it
        self.last = None                    # the last warm-up's figures, for /status
        self.idle = threading.Event()       # set while no warm-up runs
        self.idle.set()

    # Heads.

    def read(self):
        """{(model, upstream): head as JSON text} from the heads file ({} when there is none).

        Raises OSError, ValueError, KeyError, TypeError or RecursionError (nested past the
        parser's limit) when it cannot be read whole."""
        try:
            with open(self.path, encoding="utf-8") as f:
                records = json.load(f, parse_constant=reject_constant)["heads"]
        except FileNotFoundError:
            return {}
        return {(r["model"], r["upstream"]): json.dumps(r["head"]) for r in records
                if isinstance(r["head"], dict) and isinstance(r["head"]["reminders"], list)}

    def load(self):
        """Read the heads file, if any; a damaged one is ignored with one warning line."""
        if not self.enabled:
            return 0
        try:
            heads = self.read()
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            log("! warm-up: ignored %s, which is damaged (%s); the next turn rewrites it"
                % (self.path, type(e).__name__))
            return 0
        with self.lock:
            self.heads = heads
        return len(heads)

    def remember(self, model, upstream, body):
        """Keep the head of a coder prompt sent to model on upstream; write the file if it changed."""
        head = prompt_head(body)
        seen = marshal.dumps(head, 2)   # a tenth of json.dumps's time, and most turns change nothing
        with self.lock:
            if self.seen.get((model, upstream)) == seen:
                return
            put_newest(self.seen, (((model, upstream), seen),), HEADS_KEPT)
        head = json.dumps(head)
        with self.lock:
            if self.heads.get((model, upstream)) == head:
                return
            put_newest(self.heads, (((model, upstream), head),), HEADS_KEPT)
        self.write()

    def write(self):
        """Write the heads file whole: a new file put in place (os.replace), private (0600).

        Written only when a head changes, which is once per conversation at most. The
        heads other routers sharing the directory wrote since are kept (ours win)."""
        with self.write_lock:
            try:
                heads = self.read()
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                heads = {}      # damaged: load said so; ours replace it
            with self.lock:
                put_newest(heads, self.heads.items(), HEADS_KEPT)
            text = json.dumps({"heads": [{"model": m, "upstream": u, "head": json.loads(h)}
                                         for (m, u), h in heads.items()]})
            temporary = "%s.%d.tmp" % (self.path, os.getpid())
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(temporary, self.path)
            except OSError as e:
                log("! warm-up: cannot write %s: %s" % (self.path, e.strerror or e))

    def head_request(self, model, upstream):
        """The warm-up request for the head kept for model on upstream, or None."""
        with self.lock:
            head = self.heads.get((model, upstream))
        return warm_up_request(model, json.loads(head)) if head else None

    def note_prompt(self, conversation, body):
        """Keep the last coder prompt (its body), in case a vision turn swaps the coder out."""
        with self.lock:
            self.last_prompt = conversation, body

    def prompt_of(self, conversation=None):
        """The last coder prompt (of conversation, if given) as a warm-up request, or None."""
        with self.lock:
            kept, body = self.last_prompt or (None, None)
        if body is None or conversation not in (None, kept):
            return None
        return {**body, "max_tokens": 1, "stream": False}

    # The warm-up.

    def check_coder(self, server):
        """Look at whether server's coder is loaded and when its server started; warm it when
        that shows its cache gone: newly loaded (LM Studio's list), or its server restarted
        (llama-server's /props)."""
        kind, models = server.listings.get(server.upstream_url, (None, {}))
        info, _ = find_model(models, kind, server.coder_model)
        # Ollama's /v1/models lists every model pulled, loaded or not.
        loaded = bool(info and info.get("loaded")) and kind != "ollama"
        mark = server_start_mark(server.upstream_url, server.connect_timeout,
                                 server.upstream_key) if loaded and kind == "llama.cpp" else None
        with server.stats_lock:
            previous = server.coder_seen
            if mark is None and previous:
                mark = previous[1]      # not answering now is no restart
            loaded = loaded and mark != "sleeping"
            server.coder_seen = loaded, mark
        if previous is None or not loaded:
            return
        if not previous[0]:
            self.start(server, "the coder was loaded")
        elif previous[1] and mark != previous[1]:
            self.start(server, "the model server restarted")

    def start(self, server, reason, body=None):
        """Start a warm-up of server's coder: body, else the last coder prompt, else the head
        kept for it; True if one started.

        It runs in a thread of its own, the one thread the router starts itself: the
        point is to read the prompt while Claude Code starts and the user types, before
        any request comes to wait on. It lives for one request. Never while a turn is in
        flight, never two at once, and never to a coder the server's list does not show
        loaded, since warming must not load a model nobody asked for.

        Once a turn has been sent, the last coder prompt goes whole, not the head: the
        server may well hold it still (a restart seen only after the turn that followed
        it, a JIT load made by a turn), and the head alone with a new end would push the
        conversation out of a one-slot cache, where the whole prompt costs one token."""
        if not self.enabled or not (server.coder_seen and server.coder_seen[0]):
            return False
        what = "coder prompt"
        body = body or self.prompt_of()
        if body is None:
            what = "coder prefix"
            body = self.head_request(server.coder_model, server.upstream_url)
        if body is None:
            return False
        with server.stats_lock:   # held across the claim: a turn counted in flight now waits
            if server.in_flight or not self.claim(reason, what):
                return False
        # Not streamed, so no byte comes before the whole prompt is read: 10 minutes on a
        # busy CPU for Claude Code's head, where READ_TIMEOUT would give up on it.
        threading.Thread(target=self.run, name="warm-up", daemon=True, args=(
            server.upstream_url, body, server.upstream_key,
            max(server.read_timeout, WARM_UP_TIMEOUT), server.connect_timeout)).start()
        return True

    def claim(self, reason, what):
        """Mark a warm-up as running and return True, unless one already is."""
        with self.lock:
            if self.running:
                return False
            self.running = {"reason": reason, "what": what, "started": time.monotonic()}
            self.sock, self.cancelled = None, None
            self.idle.clear()
            return True

    def attach(self, sock):
        """Note the running warm-up's upstream socket (open_upstream's on_connect)."""
        with self.lock:
            self.sock = sock
            cancelled = self.cancelled
        if cancelled:
            shut_down(sock)

    def cancel(self, why):
        """Stop the running warm-up, if any, by closing its upstream connection.

        llama-server drops the task of a closed connection and keeps in its cache what it
        had read; a turn then starts at once and reuses that, where waiting would make it
        queue behind the warm-up (a one-slot server serves one prompt at a time)."""
        with self.lock:
            if not self.running or self.cancelled:
                return
            self.cancelled = why
            sock = self.sock
        if sock is not None:
            shut_down(sock)

    def run(self, url, body, key, read_timeout, connect_timeout):
        """Send the claimed warm-up to url and say what it cost (a warm-up thread's target).

        It ends whatever happens: a bug here would otherwise leave it running for good and
        no warm-up would follow (its traceback still reaches stderr)."""
        usage, failure = {}, "the router failed on it (a bug)"
        try:
            encoded = EncodedRequest(body, image_keys(body["messages"]))
            data = encoded.data()
            headers = {"Content-Type": "application/json", "Content-Length": str(encoded.length)}
            resp = open_upstream(url, "POST", "/v1/messages", data, headers, read_timeout,
                                 connect_timeout, key=key, on_connect=self.attach)
            try:
                raw = resp.read(MAX_ERROR_BODY_BYTES)
            finally:
                close_upstream(resp)
            reply = json.loads(raw) if resp.status == 200 else None
            usage = usage_numbers(reply.get("usage")) if isinstance(reply, dict) else {}
            failure = None if resp.status == 200 else (
                short_reason(upstream_message(raw)) or "error %d" % resp.status)
        except (ProxyError, OSError, http.client.HTTPException, ValueError, RecursionError) as e:
            failure = str(e)[:ERROR_TEXT_CHARS]      # a RecursionError: a reply nested too deeply
        finally:
            self.finish(usage, failure)

    def finish(self, usage, failure):
        """End the running warm-up: log one line on what it cost and why, keep it for /status."""
        with self.lock:
            running, cancelled = self.running, self.cancelled
            seconds = time.monotonic() - running["started"]
            tokens, cached = usage.get("input_tokens"), usage.get("cache_read_input_tokens", 0)
            outcome = ("cancelled: %s" % cancelled if cancelled else
                       "failed: %s" % failure if failure else "done")
            self.last = {"reason": running["reason"], "what": running["what"], "tokens": tokens,
                         "cached": cached, "seconds": round(seconds, 1), "outcome": outcome,
                         "time": readable_time(time.time())}
            self.running, self.sock = None, None
        if cancelled:
            said = "cancelled after %.1f s (%s); the server keeps what it read" % (seconds, cancelled)
        elif failure:
            said = "failed after %.1f s: %s" % (seconds, failure)
        elif tokens is None:
            said = "read in %.1f s (the server did not say how many tokens)" % seconds
        else:
            said = "%s tokens read in %.1f s" % (short_count(tokens), seconds) + (
                ", %s more were cached already" % short_count(cached) if cached else "")
        log("%swarm-up: %s %s (%s)" % ("! " if failure and not cancelled else "",
                                       running["what"], said, running["reason"]))
        self.idle.set()

    def status(self):
        """/status's warm_up: whether one runs now, then the last one's reason, cost and outcome."""
        none = dict.fromkeys(("reason", "what", "tokens", "cached", "seconds", "outcome"))
        with self.lock:
            last = self.last or none
            if self.running:
                last = {**none, "reason": self.running["reason"], "what": self.running["what"],
                        "seconds": round(time.monotonic() - self.running["started"], 1)}
            return {"enabled": self.enabled, "running": bool(self.running), **last}


def shut_down(sock):
    """Shut a socket down both ways, waking a thread blocked on it; ignore a closed one."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


################ Server

class Server(BoundedServer):
    """The router: its settings, counters and /status, and what it knows of the upstreams'
    models; the vision bookkeeping (vision) and the prompt statistics (prompts).

    BoundedServer caps the connections; server_bind() and handle_error() adapt
    ThreadingHTTPServer further. Counters, which start_counters() sets up: count() a
    routed request, count_vision_call() (with add_vision_call), count_described(),
    note_model(), note_error(), request_started() and request_ended(); status() is the
    /status document, turns_status() its turns in flight. Models: known_models(),
    claim_refresh() and refresh_models() keep the upstreams' lists; model_info() and
    coder_context() read them; upstream_token_count() asks the coder's server for a count;
    check_upstream() and preload() run at startup. Warm-ups: refresh_models() has
    Warmer.check_coder() see the coder's cache gone, warm() starts one (Warmer.start),
    upstream_wanted() cancels it."""

    request_queue_size = 128    # past the default 5, bursts of connects wait 1 s for a SYN retry
    daemon_threads = True       # a stuck request never keeps Ctrl-C from ending the router

    def __init__(self, address, upstream_url=UPSTREAM_URL, vision_upstream_url="",
                 coder_model=CODER_MODEL, vision_model=VISION_MODEL, vision_mode=VISION_MODE,
                 cache_dir=None, token="", verbose=False, read_timeout=READ_TIMEOUT,
                 max_body_bytes=MAX_BODY_BYTES, connect_timeout=CONNECT_TIMEOUT,
                 models_ttl=MODELS_TTL, upstream_key="", warm=False, side_model="",
                 side_upstream_url="", max_connections=MAX_CONNECTIONS):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler, max_connections)
        self.host = address[0]
        self.upstream_url = upstream_url
        self.vision_upstream_url = vision_upstream_url or upstream_url
        self.coder_model = coder_model
        self.vision_model = vision_model
        self.vision_mode = vision_mode
        # Side requests go to the coder unless a side model or server is set.
        side = bool(side_model or side_upstream_url)
        self.side_model = side_model or coder_model if side else ""
        self.side_upstream_url = side_upstream_url or upstream_url if side else ""
        self.token = token
        self.verbose = verbose
        self.read_timeout = read_timeout
        self.request_timeout = REQUEST_TIMEOUT
        self.body_time_per_mb = BODY_TIME_PER_MB
        self.connect_timeout = connect_timeout
        self.max_body_bytes = max_body_bytes
        self.split_body_bytes = SPLIT_BODY_BYTES     # a body bigger is read as a SplitBody
        self.trim_idle_seconds = TRIM_IDLE_SECONDS   # a connection idle this long is trimmed
        self.models_ttl = models_ttl
        self.upstream_key = upstream_key        # sent to the model server(s); never shown
        self.vision = Vision(self, cache_dir)   # descriptions, claims and failures of images
        self.prompts = PromptMemory()
        self.encoded_parts = EncodedParts()     # prompt parts encoded by recent turns
        self.request_parts = RequestParts()     # request parts read and checked by recent turns
        self.warmer = Warmer(cache_dir, warm)   # off unless asked: main() asks, tests may
        self.coder_seen = None                  # (loaded, server start mark) at the last look
        self.documents = DocumentReader(cache_dir)
        self.start_counters()

    def start_counters(self):
        """Set the counters, and what is known of the upstreams, to what a new router knows."""
        self.upstream_counts_tokens = None      # unknown until the first count_tokens
        self.errors = []                        # the last unexpected exceptions, as text
        self.stats_lock = threading.Lock()      # guards stats, models, models_time, errors
        self.stats = {"requests": {}, "vision_calls": {}, "images_described": 0,
                      "vision_prompt_bytes": {}, "model_switches": 0,
                      "last_upstream_error": None,
                      "routes": {"coder": 0, "vision": 0, "describe": 0}, "last_request": None}
        self.started = time.monotonic()
        self.in_flight = 0                      # routed requests being answered now
        self.turns = {}                         # id(record) -> (start, record, client socket)
        self.request_ids = itertools.count(1)   # next() is atomic under the GIL
        self.last_model = None                  # the main upstream's last model
        self.models = None                      # {model id: info}, None: never seen
        self.models_time = float("-inf")
        self.listings = {}                      # upstream url -> (kind of server, models)
        self.startup = {"upstream_reachable": None, "problems": []}   # the startup check's

    def server_bind(self):
        """Bind without HTTPServer.server_bind's reverse DNS lookup, which stalls for
        seconds on some resolvers (cpython#106505, pypa/pip#13742)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        """Stay quiet when a client goes away; log anything else once, with its traceback.

        The record keeps text, and only the last few: an exception holds its frames, and
        with them the request body, so keeping each one grew the router without bound."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, *TIMEOUT_ERRORS)):
            return
        record = "%s: %s" % (type(error).__name__, escape_log(error)[:200])
        with self.stats_lock:
            self.errors.append(record)
            del self.errors[:-ERRORS_KEPT]
        trace = "".join(traceback.format_tb(error.__traceback__))
        log("! unexpected %s, on a request from %s; Traceback (most recent call last):\n%s"
            % (record, client_address[0], trace.rstrip()))

    # Counters.

    def count(self, route, model, upstream, prompt_bytes, record):
        """Count one routed request, and name its route and model in its record."""
        with self.stats_lock:
            requests = self.stats["requests"]
            requests[model] = requests.get(model, 0) + 1
            self.stats["routes"][route] = self.stats["routes"].get(route, 0) + 1
            record.update(route=route, model=model)
            if route == "vision":
                self.add_vision_call("answer", prompt_bytes)    # notes the model too
            else:
                self.note_model(upstream, model)

    def count_vision_call(self, mode, prompt_bytes):
        """Count one request to the vision model, of mode describe or fallback."""
        with self.stats_lock:
            self.add_vision_call(mode, prompt_bytes)

    def count_described(self, images):
        """Count images described, in either mode."""
        with self.stats_lock:
            self.stats["images_described"] += images

    def add_vision_call(self, mode, prompt_bytes):
        """Count one request to the vision model. Caller holds stats_lock."""
        calls, sent = self.stats["vision_calls"], self.stats["vision_prompt_bytes"]
        calls[mode] = calls.get(mode, 0) + 1
        if mode != "answer":
            self.stats["routes"]["describe"] += 1
        sent[mode] = sent.get(mode, 0) + prompt_bytes
        self.note_model(self.vision_upstream_url, self.vision_model)

    def note_model(self, upstream, model):
        """Count a change of model on the main upstream (a swap, on one machine). Caller holds
        stats_lock."""
        if upstream == self.upstream_url:
            if self.last_model not in (None, model):
                self.stats["model_switches"] += 1
            self.last_model = model

    def note_error(self, message, status=None):
        """Remember the last upstream problem for /status, in the upstream's own words."""
        with self.stats_lock:
            self.stats["last_upstream_error"] = {"message": message, "status": status,
                                                 "time": readable_time(time.time())}

    def request_started(self, client):
        """Count a routed request of client (its socket) in flight and as the last one;
        return (start, its record)."""
        record = {"id": request_id(), "time": readable_time(time.time()),
                  "route": None, "model": None, "status": None, "seconds": None}
        start = time.monotonic()
        with self.stats_lock:
            self.in_flight += 1
            self.turns[id(record)] = (start, record, client)
            self.stats["last_request"] = record
        return start, record

    def upstream_wanted(self, url):
        """Cancel a warm-up, if one runs, when a request is about to go to url, the coder's server.

        Only then: a side request for a side server, or a describe for a vision server
        of its own, does not queue behind the warm-up, and cancelling it for one threw
        away the minutes of reading it had done (Claude Code's title request comes with
        the first prompt of every session)."""
        if url == self.upstream_url:
            self.warmer.cancel("a turn arrived")

    def request_ended(self, started, status, left=False):
        """Count a routed request done (left: its client hung up first); return its seconds."""
        start, record = started
        seconds = time.monotonic() - start
        with self.stats_lock:
            self.in_flight -= 1
            del self.turns[id(record)]
            record.update(status=status, seconds=round(seconds, 2), **({"left": True} if left else {}))
        return seconds

    def turns_status(self):
        """/status's turns: each routed request in flight, with its seconds so far and whether
        its client has hung up already (the router sees that only at its next wait or write).
        Caller holds stats_lock, so no socket here is closed while it is looked at."""
        now = time.monotonic()
        return [{**record, "seconds": round(now - start, 1), "client_left": has_left(client)}
                for start, record, client in self.turns.values()]

    def status(self):
        """The /status document."""
        with self.stats_lock:
            stats = copy.deepcopy(self.stats)
            startup = copy.deepcopy(self.startup)
            activity = {"uptime_s": round(time.monotonic() - self.started),
                        "in_flight": self.in_flight, "turns": self.turns_status()}
        cache = self.vision.cache.status()
        return {"version": VERSION, "pid": os.getpid(), "upstream": self.upstream_url,
                "vision_upstream": self.vision_upstream_url, "vision_mode": self.vision_mode,
                "coder": {"model": self.coder_model,
                          **self.model_info(self.coder_model, self.upstream_url)},
                "vision": {"model": self.vision_model or None,
                           **(self.model_info(self.vision_model, self.vision_upstream_url)
                              if self.vision_model else {})},
                "cache": cache, "documents": self.documents.status(),
                "prompt_cache": self.prompts.prompt_status(), "startup": startup,
                "warm_up": self.warmer.status(),
                **({"side": {"model": self.side_model, "upstream": self.side_upstream_url}}
                   if self.side_model else {}),
                **activity, **stats}

    # The upstream's models.

    def known_models(self):
        """{model id: info} of both upstreams as last seen (None: never seen)."""
        return self.models

    def claim_refresh(self, ttl=None):
        """True for the one request that finds the model list older than models_ttl (or ttl,
        when shorter); it refreshes the list.

        The others go on with the list as it is, so no client waits for a slow listing."""
        ttl = self.models_ttl if ttl is None else min(ttl, self.models_ttl)
        with self.stats_lock:
            if time.monotonic() - self.models_time <= ttl:
                return False
            self.models_time = time.monotonic()
            return True

    def refresh_models(self):
        """Ask each upstream for its models; return {url: (kind, models)} as they answered.

        An upstream that does not answer keeps what it said last time."""
        with self.stats_lock:
            self.models_time = time.monotonic()
        urls = (self.upstream_url, self.vision_upstream_url, self.side_upstream_url)
        answers = {url: list_models(url, self.connect_timeout, self.upstream_key)
                   for url in dict.fromkeys(filter(None, urls))}
        with self.stats_lock:
            self.listings.update({url: a for url, a in answers.items() if a[1] is not None})
            if self.listings:
                merged = {}
                for url in (self.vision_upstream_url, self.upstream_url):   # the main one wins
                    merged.update(self.listings.get(url, (None, {}))[1])
                self.models = merged
        if self.warmer.enabled:
            self.warmer.check_coder(self)
        return answers

    # Warm-ups.

    def warm(self, reason, body=None):
        """Start a warm-up of the coder (Warmer.start); True if one started."""
        return self.warmer.start(self, reason, body)

    def coder_context(self):
        """The coder's context length as its server last said it, or None."""
        return self.model_info(self.coder_model, self.upstream_url).get("context_length")

    def model_info(self, model, url):
        """What the server at url last said of model ({} if nothing), kind of server included."""
        with self.stats_lock:
            kind, models = self.listings.get(url, (None, {}))
        info, served = find_model(models, kind, model)
        if info is None:
            return {"server": kind} if kind else {}
        return {**info, "server": kind, **({"served_by": served} if served != model else {})}

    def upstream_token_count(self, body):
        """The coder's server's count of body's input tokens; None when it cannot count them.

        A server that answers without a count is not asked again."""
        if self.upstream_counts_tokens is False:
            return None
        try:
            status, reply = fetch_json(self.upstream_url, "POST", "/v1/messages/count_tokens",
                                       body, key=self.upstream_key)
        except ProxyError:
            status, reply = 0, None
        if status == 200 and isinstance(reply, dict) and type(reply.get("input_tokens")) is int:
            self.upstream_counts_tokens = True
            return reply["input_tokens"]
        if status in (200, 404, 405, 501):
            # LM Studio answers 200 with an error text, Ollama 404 (backends.md).
            self.upstream_counts_tokens = False
        return None

    def check_upstream(self, preload=False):
        """Look at the upstreams' models now; return the banner lines: what was found, then
        each problem with its fix. Remembers the problems for /status (claude-local shows them)."""
        answers = self.refresh_models()
        lines = self.preload() if preload else []
        if lines:
            answers = self.refresh_models()
        problems = []
        for url, (kind, models) in answers.items():
            if models is None:
                problems.append("upstream %s is not reachable yet; requests get 529 until it is"
                                % url)
            elif kind == "needs-key":
                problems.append("upstream %s refused the model list: it needs %s" % (
                    url, "another key (--upstream-key)" if self.upstream_key
                    else "a key (--upstream-key or CLAUDE_ROUTER_UPSTREAM_KEY)"))
        for role, model, url in (("coder", self.coder_model, self.upstream_url),
                                 ("vision", self.vision_model, self.vision_upstream_url)):
            kind, models = answers[url]
            if models and model:     # a server without a model list (a bare fake) gets no advice
                line, found = model_report(role, model, kind, models)
                lines.append(line)
                problems += found
        with self.stats_lock:
            self.startup = {"upstream_reachable": answers[self.upstream_url][1] is not None,
                            "problems": problems}
        return lines + ["! " + p for p in problems]

    def preload(self):
        """Ask LM Studio to load each configured model that is not loaded; return messages."""
        said = []
        for model, url in ((self.coder_model, self.upstream_url),
                           (self.vision_model, self.vision_upstream_url)):
            info = (self.models or {}).get(model) if model else None
            if info is None or info["loaded"]:
                continue
            try:
                status, _ = fetch_json(url, "POST", "/api/v1/models/load", {"model": model},
                                       key=self.upstream_key)
            except ProxyError as e:
                status = str(e)
            said.append("preload %s: %s" % (model, "loaded" if status == 200 else status))
        return said


################ Status line and stopping

# What runs beside a router rather than in it: --statusline reads a running router's
# /status into one short line, --stop ends the router on a port.

def dig(obj, *names):
    """obj[name][name]..., or None where a level is missing or not an object."""
    for name in names:
        obj = obj.get(name) if isinstance(obj, dict) and isinstance(name, str) else None
    return obj


def dig_as(kind, obj, *names):
    """dig(obj, *names) when that is a kind (dict or list), else an empty kind."""
    value = dig(obj, *names)
    return value if isinstance(value, kind) else kind()


def is_seconds(value):
    """True for a number of seconds a turn can have taken: not a bool, NaN, infinite or absurd."""
    return type(value) in (int, float) and 0 <= value < 1e9


def activity_note(status, last):
    """The status line's word on what the router does now, or how its last turn ended ("")."""
    turns = dig(status, "turns")
    turns = [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else None
    # A turn whose client has hung up (Esc) is nobody's work any more, even before the
    # router's next look at it ends it.
    seconds = [t["seconds"] for t in turns or () if not t.get("client_left")
               and is_seconds(t.get("seconds"))]
    if seconds:
        return "working %d s" % max(seconds)
    if turns is None and dig(status, "in_flight"):      # a router from before "turns"
        return "working"
    if dig(status, "warm_up", "running"):
        return "warming"
    if not last.get("route") or not isinstance(last["route"], str):
        return ""
    model = "" if last["route"] == "coder" else " " + str(last.get("model"))
    took = " %.1f s" % last["seconds"] if is_seconds(last.get("seconds")) else ""
    if last.get("left") or any(t.get("client_left") and t.get("id") == last.get("id")
                               for t in turns or ()):
        return "last: %s%s interrupted%s" % (last["route"], model, took and " after" + took)
    outcome = "" if last.get("status") in (200, None) else " (%s)" % last["status"]
    return "last: %s%s%s%s" % (last["route"], model, outcome, took)


def status_line(status):
    """The one short line Claude Code shows as its status line, from a /status document.

    Reads what it can and skips the rest: a router of another version may lack a field."""
    coder = dig(status, "coder", "served_by") or dig(status, "coder", "model") or "?"
    last = dig_as(dict, status, "last_request")
    parts = ["router: coder %s" % coder, activity_note(status, last)]
    turn = dig_as(dict, status, "prompt_cache", last.get("model"), "last_turn")
    read, new = turn.get("cache_read_input_tokens"), turn.get("input_tokens")
    if isinstance(read, int) and isinstance(new, int):      # Anthropic's: new excludes read
        parts.append("prompt: %s cached, %s new" % (short_count(read), short_count(new)))
    elif isinstance(new, int):
        parts.append("prompt: %s tokens" % short_count(new))
    # Claude Code clears the screen as it starts, so what the startup check found is
    # shown here too: its first problem, without the fix (the log and /status have it).
    problems = [p for p in dig_as(list, status, "startup", "problems") if isinstance(p, str)]
    if problems:
        more = " (+%d more)" % (len(problems) - 1) if len(problems) > 1 else ""
        parts.append("! %s%s" % (re.split(r"; |\. ", problems[0])[0], more))
    # Escaped once more here: the document may come from a router of another version.
    return escape_log(" · ".join(p for p in parts if p))


def fetch_status(port, token, timeout=STATUSLINE_TIMEOUT):
    """Return (HTTP status, the /status document or None) of what answers on the loopback port,
    the whole exchange within timeout seconds.

    Raise OSError when nothing answers in time (or what answers does not speak HTTP). A
    socket timeout bounds each wait for bytes, not the exchange, and Claude Code runs the
    status line often: so each read here gets only what is left of one deadline."""
    deadline = time.monotonic() + timeout
    request = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if token:
        request += b"x-api-key: %s\r\n" % token.encode("latin-1", "replace")
    raw, length = b"", None
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(request + b"\r\n")
        while length is None or len(raw) < length:
            left = deadline - time.monotonic()
            if left <= 0 or len(raw) > MAX_ERROR_BODY_BYTES:
                raise socket.timeout("no whole answer in time")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                break
            raw += data
            head, blank, _ = raw.partition(b"\r\n\r\n")
            given = re.search(rb"\r\ncontent-length: *([0-9]{1,9})\r", head + b"\r", re.I)
            if blank and given:
                length = len(head) + 4 + int(given[1])
    head, _, body = raw.partition(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.[01] ([0-9]{3}) ", head)
    if not status:
        raise OSError("what answers on :%d does not speak HTTP" % port)
    try:
        document = json.loads(body) if status[1] == b"200" else None
    except (ValueError, RecursionError):
        document = None
    return int(status[1]), document if isinstance(document, dict) else None


def statusline(environ):
    """The status line for the router on CLAUDE_ROUTER_PORT, or a short note when none answers.

    It binds nothing and loads no cache; it waits at most STATUSLINE_TIMEOUT seconds."""
    port = environ.get("CLAUDE_ROUTER_PORT", "").strip()
    port = int(port) if port.isdigit() else PORT
    try:
        status, document = fetch_status(port, environ.get("CLAUDE_ROUTER_TOKEN", ""))
    except OSError:
        return "router: none on :%d" % port
    if status == 401:
        return "router on :%d: set CLAUDE_ROUTER_TOKEN to see it" % port
    if document is None:
        return "router: none on :%d (%d there)" % (port, status)
    return status_line(document)


def command_words(pid):
    """Process pid's command line as words; [] when this system does not let us see it.

    From /proc, the words exactly; from ps (macOS, BSD), split at spaces, so a word
    that held spaces comes in pieces."""
    if os.path.isdir("/proc/self"):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                return f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            return []
    try:    # -ww: BSD ps cuts the column to a terminal's width, and the router's re-start
            # as a module puts its path after ~330 characters
        return subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(pid)], text=True,
                              capture_output=True, timeout=STATUS_TIMEOUT).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []


def is_router_process(pid):
    """True when process pid runs claude-router, as far as this system lets us see.

    A router in a container reports its own pid namespace's number, which here may be
    anyone's process: only one whose command line shows the router is signalled. That
    is a file named claude_router.py, the module (-m claude_router), or the re-start as
    a module every router started as a script does (run_as_import: python, its options,
    -c, code that names the module 'claude_router', the file), whatever the file's
    name: a copy at ~/bin/claude-router is found, a program merely called so is not."""
    words = command_words(pid)
    code = words[words.index("-c") + 1:] if "-c" in words[1:] else []
    restarted = any("'claude_router'" in word for word in code)
    return restarted or any(os.path.basename(word) == "claude_router.py" or (before, word) == (
        "-m", "claude_router") for before, word in zip([""] + words, words))


def process_ended(pid):
    """True when no process pid is left (one of another user's is still there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def router_gone(port, token, pid, deadline):
    """True once the router pid has ended or its port no longer answers as it, before deadline.

    A /status that does not come in time says nothing: a router stopped with Ctrl-Z, or
    too busy, holds its port and answers nothing, and it is not gone."""
    while time.monotonic() < deadline:
        if process_ended(pid):
            return True
        try:
            _, document = fetch_status(port, token, min(STATUSLINE_TIMEOUT, max(
                deadline - time.monotonic(), 0.05)))
        except socket.timeout:
            pass
        except OSError:         # refused, reset or no HTTP: the port has been let go
            return True
        else:
            if dig(document, "pid") != pid:
                return True     # another server on the port now
        time.sleep(0.05)
    return False


def stop_router(port, token, wait=STOP_TIMEOUT, look=STATUS_TIMEOUT):
    """Stop the router on the loopback port with SIGTERM; return (exit status, what happened).

    The status: STOPPED; NOTHING_TO_STOP (nothing listens, or what answers is not
    claude-router); LEFT_RUNNING (a router, or what may be one, is still there)."""
    try:
        # Not the status line's second: a busy router (or machine) answers later, and taking
        # it for none said "nothing to stop" and left it running.
        status, document = fetch_status(port, token, look)
    except socket.timeout:
        status, document = None, None       # the port is held, and silent
    except OSError:
        return NOTHING_TO_STOP, "no router answers on :%d; nothing to stop" % port
    return stop_answering(port, token, status, document, wait)


def stop_answering(port, token, status, document, wait=STOP_TIMEOUT):
    """Stop the router whose /status on port answered status and document (status None:
    what holds the port gave no answer in time); as stop_router, waiting wait seconds for
    it to go."""
    if status is None:
        return LEFT_RUNNING, ("what holds :%d gave no answer to /status in time (a router "
                              "stopped with Ctrl-Z, or too busy?); not stopped" % port)
    if status == 401:
        return LEFT_RUNNING, ("the router on :%d wants its token: set CLAUDE_ROUTER_TOKEN to "
                              "its --token" % port)
    pid = dig(document, "pid")
    if type(pid) is not int or pid <= 0 or dig(document, "coder") is None:
        return NOTHING_TO_STOP, ("what answers on :%d is not claude-router (HTTP %d to "
                                 "/status); not stopped" % (port, status))
    if pid == os.getpid() or not is_router_process(pid):
        return LEFT_RUNNING, ("the router on :%d says it is process %d, which is not a "
                              "claude-router here (another machine, container or user?); "
                              "not stopped" % (port, pid))
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as e:
        return LEFT_RUNNING, "cannot stop the router on :%d (pid %d): %s" % (
            port, pid, e.strerror or e)
    if not router_gone(port, token, pid, time.monotonic() + wait):
        return LEFT_RUNNING, ("sent SIGTERM to the router on :%d (pid %d), but it is still "
                              "there" % (port, pid))
    # Escaped: the document came over the network, and this line goes to a terminal.
    return STOPPED, escape_log("stopped the router on :%d (pid %d; upstream %s, coder %s)" % (
        port, pid, dig(document, "upstream"), dig(document, "coder", "model")))


################ Main

def port_number(text):
    """argparse type: a TCP port."""
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("%r is not a port number" % text)
    return int(text)


def http_url(text):
    """argparse type: an http:// URL with a host."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise argparse.ArgumentTypeError("%r is not an http:// URL" % text)
    try:
        parts.port
    except ValueError:
        raise argparse.ArgumentTypeError("%r has a bad port" % text) from None
    return text.rstrip("/")


def env_flag(text):
    """argparse type: a yes/no setting (bool("0") is True, so this parses it)."""
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("%r is not 1 or 0" % text)


def add_model_options(add, env):
    """Add the options saying where the models are and how the router uses them."""
    add("--upstream", type=http_url, default=env("UPSTREAM", UPSTREAM_URL),
        help="the model server (default: %(default)s)")
    add("--vision-upstream", type=http_url, default=env("VISION_UPSTREAM", VISION_UPSTREAM_URL or None),
        help="the vision model's server (default: the upstream)")
    add("--coder-model", default=env("CODER_MODEL", CODER_MODEL),
        help="model for text turns (default: %(default)s)")
    add("--vision-model", default=env("VISION_MODEL", VISION_MODEL),
        help="model for turns with new images; none (or empty): text only, images reach "
             "the coder as a marker (default: %(default)s)")
    add("--vision-mode", choices=VISION_MODES, default=env("VISION_MODE", VISION_MODE),
        help="answer: the vision model answers the turn; describe: it only describes "
             "each new image and the coder answers (default: %(default)s)")
    add("--cache-dir", default=env("CACHE_DIR", CACHE_DIR),
        help="where image descriptions, PDF texts and the warm-up's prompt heads are kept "
             "(default: %(default)s)")


def build_parser(environ):
    """The command line; each default comes from environ, else the constant."""
    def env(name, default):
        return environ.get("CLAUDE_ROUTER_" + name, default)

    parser = argparse.ArgumentParser(
        prog="claude_router.py", description="Route Claude Code to local models.",
        epilog="Each option's default can be set with the CLAUDE_ROUTER_* variable named "
               "after it (--coder-model: CLAUDE_ROUTER_CODER_MODEL).")
    parser.error = lambda message: sys.exit("claude-router: " + message)
    add = parser.add_argument
    add("--host", default=env("HOST", HOST), help="address to listen on (default: %(default)s)")
    add("--port", type=port_number, default=env("PORT", str(PORT)),
        help="port to listen on (default: %(default)s)")
    add_model_options(add, env)
    add("--token", default=env("TOKEN", ""),
        help="require this x-api-key or Bearer token (needed to listen beyond loopback)")
    add("--upstream-key", default=env("UPSTREAM_KEY", ""),
        help="send this key to the model server(s) as Authorization: Bearer, for servers "
             "that require one (default: CLAUDE_ROUTER_UPSTREAM_KEY if set; never shown)")
    add("--preload", action="store_true", default=env_flag(env("PRELOAD", "0")),
        help="load missing models through LM Studio's API at startup")
    add("--no-warm", dest="warm", action="store_false",
        default=env_flag(env("WARM", "1" if WARM else "0")),
        help="do not warm the coder's prompt cache ahead of the first turn "
             "(CLAUDE_ROUTER_WARM=0 does the same)")
    add("--side-model", default=env("SIDE_MODEL", SIDE_MODEL),
        help="model for side requests (session titles, checks) (default: the coder)")
    add("--side-upstream", type=http_url, default=env("SIDE_UPSTREAM", SIDE_UPSTREAM_URL or None),
        help="the side model's server (default: the upstream)")
    add("--stop", action="store_true",
        help="stop the router running on --port (CLAUDE_ROUTER_PORT) and exit: 0 stopped, "
             "1 nothing to stop, 2 a router left running")
    add("--statusline", action="store_true",
        help="print one line on the router running on CLAUDE_ROUTER_PORT (for Claude Code's "
             "statusLine setting; claude-local offers it) and exit")
    add("--verbose", action="store_true", default=env_flag(env("VERBOSE", "0")),
        help="log every request line")
    return parser


def parse_settings(argv, environ):
    """Parse and check the settings; exit with one line when they are wrong."""
    try:
        parser = build_parser(environ)
    except argparse.ArgumentTypeError as e:
        sys.exit("claude-router: %s" % e)
    args = parser.parse_args(argv)
    if args.vision_mode not in VISION_MODES:
        parser.error("vision mode %r is not one of %s" % (args.vision_mode, ", ".join(VISION_MODES)))
    if not is_loopback_host(args.host) and not args.token:
        parser.error("listening on %s needs a token (--token or CLAUDE_ROUTER_TOKEN)" % args.host)
    if args.upstream_key and not re.fullmatch(r"[!-~]+", args.upstream_key):
        parser.error("the upstream key must be printable ASCII without spaces")   # never echo it
    if args.token and not re.fullmatch(r"[!-~]+", args.token):
        # Clients send it in a header, and header bytes have no agreed encoding beyond ASCII.
        parser.error("the token must be printable ASCII without spaces")
    if args.vision_model.strip().lower() in ("", "none"):
        args.vision_model = ""
    return args


def run_as_import():
    """Replace this process with one that imports this file and runs main (same pid, same
    arguments); return only if that cannot be done."""
    # Run as a script (python3 claude_router.py), the file's syntax tree, about 19 MiB,
    # lives until the script returns, which a server never does: CPython frees it only
    # after running the script's code. Imported, it is freed once the module is compiled.
    # The loader is named: from the path alone, importlib finds none for a file whose
    # name lacks .py (~/bin/claude-router). Read from stdin, there is no file to load.
    # The interpreter's options go too: -I, -X dev or -W error asked for this process.
    # -c puts "" (the working directory) first on sys.path where a script puts its own
    # directory; under -I or -P (3.11) neither is put there.
    boot = ("import os, sys, importlib.util as iu, importlib.machinery as im; "
            "sys.argv.pop(0); sys.path[0] = sys.path[0] or os.path.dirname(sys.argv[0]); "
            "spec = iu.spec_from_file_location('claude_router', sys.argv[0], "
            "loader=im.SourceFileLoader('claude_router', sys.argv[0])); "
            "sys.modules['claude_router'] = m = iu.module_from_spec(spec); "
            "spec.loader.exec_module(m); m.main()")
    if not os.path.isfile(__file__):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *interpreter_options(), "-c", boot,
                                  os.path.abspath(__file__)] + sys.argv[1:])
    except OSError:
        pass


def interpreter_options():
    """The options this process's interpreter was started with (-X, -W, -I, -O...), as
    arguments for starting another the same way."""
    if hasattr(sys, "orig_argv"):      # Python 3.10 on: the command line as it was
        return sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    return subprocess._args_from_interpreter_flags()   # sys.flags, -X and -W, as CPython's tests do


TRIM_AFTER_BYTES = 1024 * 1024     # a connection with a body this big hands memory back at its end
# ... or once it has idled this long. Kept per connection, a screenshot's memory stayed
# while the connection idled: Claude Code keeps its connection between turns (through a
# 12 s tool run here), so 16 idle connections that each sent an 8 MB body held 146 MiB
# (one per glibc arena: at most 8 per core). A request sent at once still finds the
# memory; Claude Code's next turn comes after the model's answer and its tools.
TRIM_IDLE_SECONDS = 1.0


KEEP_FREED_BYTES = 32 * 1024 * 1024     # free memory a thread's heap keeps for its next request
TRIM_FREE_BYTES = 256 * 1024            # freed to have a thread's heap trimmed (see below)
TRIM_LOCK = threading.Lock()            # one trim at a time: each lowers a global threshold


def release_freed_memory(start=False):
    """Hand the C heap's free pages back to the system, the calling thread's heap too; at
    start, set when glibc's malloc hands memory back itself (glibc only; else do nothing)."""
    # Compiling this file at start frees about 10 MiB that glibc's malloc keeps for
    # reuse. glibc maps a big block on its own, returned when freed, but after the first
    # is freed it raises that bar past it (its dynamic mmap threshold): a fixed one
    # (M_MMAP_THRESHOLD, -3 in malloc.h) keeps blocks of 4 MiB or more out of the heap.
    # The fixed bar also fixes glibc's trim threshold (M_TRIM_THRESHOLD, -1) at 128 KiB:
    # each thread's heap handed back a screenshot body's memory as it was freed, and
    # the next body on the connection took it back a page fault at a time (3,000
    # faults and 4-6 ms of CPU per 8 MB body, more than b490f54 spent in all). So a heap
    # keeps up to KEEP_FREED_BYTES until its connection ends or idles, then this trims it.
    # malloc_trim leaves the top of a thread's heap alone: a free of 64 KiB or more
    # there trims it, under a lowered threshold.
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    with TRIM_LOCK:
        if start:
            mallopt(-3, 4 * 1024 * 1024)
        else:
            mallopt(-1, 128 * 1024)
            bytearray(TRIM_FREE_BYTES)      # made and freed in this thread's heap
        mallopt(-1, KEEP_FREED_BYTES)
        malloc_trim(0)


def interrupt(signum, frame):
    """SIGTERM handler: end serve_forever as Ctrl-C does, so the router closes and exits 0."""
    raise KeyboardInterrupt


def log_start(server):
    """Load the description and document caches; log the banner saying what the router serves."""
    loaded = server.vision.cache.load()
    documents = server.documents.cache.load()
    log("🔀 claude-router on :%d" % server.server_port)
    log("coder → %s" % server.coder_model)
    log("vision → %s%s" % (server.vision_model or "none (text only: images reach the coder as "
                           "a marker)", "" if server.vision_mode == "answer" or not
                           server.vision_model else " (describe mode)"))
    log("cache: %d description(s) in %s" % (loaded, server.vision.cache.path))
    log("cache: %d document(s) in %s" % (documents, server.documents.cache.path))
    if server.side_model:
        log("side → %s on %s" % (server.side_model, server.side_upstream_url))


def main(argv=None, environ=None):
    """Run the router until Ctrl-C (or, with --statusline, print the status line)."""
    environ = os.environ if environ is None else environ
    if "--statusline" in (sys.argv[1:] if argv is None else argv):
        print(statusline(environ))
        return
    args = parse_settings(argv, environ)
    if args.stop:
        code, said = stop_router(args.port, args.token)
        print("claude-router: " + said, file=sys.stderr if code else sys.stdout)
        sys.exit(code)
    if argv is None and __name__ == "__main__" and __spec__ is None:
        run_as_import()
    try:
        server = Server((args.host, args.port), args.upstream, args.vision_upstream or "",
                        args.coder_model, args.vision_model, args.vision_mode, args.cache_dir,
                        args.token, args.verbose, upstream_key=args.upstream_key,
                        warm=args.warm, side_model=args.side_model,
                        side_upstream_url=args.side_upstream or "")
    except OSError as e:
        sys.exit("claude-router: cannot listen on %s:%d: %s" % (args.host, args.port,
                                                               e.strerror or e))
    log_start(server)
    server.warmer.load()
    for line in server.check_upstream(args.preload):
        log(line)
    server.warm("router start")
    release_freed_memory(start=True)
    with server:
        signal.signal(signal.SIGTERM, interrupt)    # --stop, kill, systemd: close and exit 0
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log("bye")


if __name__ == "__main__":
    main()
