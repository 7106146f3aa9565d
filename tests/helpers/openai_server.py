"""A deterministic OpenAI-compatible chat server on 127.0.0.1 for driving the real `openai` client in tests.

It speaks the subset of the protocol that `openai.OpenAI().chat.completions.create` and `models.list` use:

    GET  /v1/models              {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}
    POST /v1/chat/completions    {"model", "messages", ...} -> {"id", "object": "chat.completion", "created",
                                 "model", "choices": [{"index", "message": {"role", "content", "refusal"},
                                 "finish_reason"}], "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}

Answers come from a `responder(body) -> str` (a pure function of the request, so the same request always gets the
same answer) and usage counts words. Faults are added per request with `fail(kind, match, times)`:

    transport: "429" and "500" (with Retry-After: 0), "timeout" (no answer for `stall` seconds), "not_json"
               (HTTP 200 with an HTML page)
    content:   "empty" (content ""), "refusal" (OpenAI's `refusal` field, content null), "no_sections" (prose
               without the section tags), "no" (a checker's verdict against), "length" (finish_reason length)

The server logs every request it handled: its key (SHA-256 of the body's canonical JSON, computed here), the fault
applied, and whether a chat completion was sent back whole (`answered`). It listens on loopback only and stops
itself after `lifetime` seconds.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

TRANSPORT_FAULTS = ("429", "500", "timeout", "not_json")
CONTENT_FAULTS = ("empty", "refusal", "no_sections", "no", "length")


def body_key(body: dict) -> str:
    """SHA-256 of the request body in canonical JSON (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Fault:
    kind: str
    match: Callable[[dict], bool]
    times: int | None  # None: every matching request
    used: int = 0


class ChatServer:
    def __init__(self, responder: Callable[[dict], str], *, model: str = "test-model", delay: float = 0.0,
                 stall: float = 3.0, lifetime: float = 600.0, serve_models: bool = True):
        self.responder = responder
        self.model = model
        self.delay = delay  # seconds before each answer (so that a test can kill a client mid-run)
        self.stall = stall
        self.serve_models = serve_models
        self.faults: list[Fault] = []
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, name="chat-server", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    def start(self) -> ChatServer:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail(self, kind: str, match: Callable[[dict], bool] = lambda body: True, times: int | None = None) -> None:
        assert kind in TRANSPORT_FAULTS + CONTENT_FAULTS, kind
        with self._lock:
            self.faults.append(Fault(kind, match, times))

    def answered_keys(self) -> list[str]:
        with self._lock:
            return [entry["key"] for entry in self.log if entry["answered"]]

    def _fault_for(self, body: dict) -> str | None:
        with self._lock:
            for fault in self.faults:
                if (fault.times is None or fault.used < fault.times) and fault.match(body):
                    fault.used += 1
                    return fault.kind
        return None

    def _completion(self, body: dict, fault: str | None) -> dict:
        content, refusal, finish = self.responder(body), None, "stop"
        if fault == "empty":
            content = ""
        elif fault == "refusal":
            content, refusal = None, "I can't help with that."
        elif fault == "no_sections":
            content = "Here is an interesting idea, described in prose without any of the requested headings."
        elif fault == "no":
            content = "NO"
        elif fault == "length":
            content, finish = content[: len(content) // 2], "length"
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion_words = len((content or "").split())
        return {
            "id": "chatcmpl-" + body_key(body)[:24], "object": "chat.completion", "created": 0, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_words, "completion_tokens": completion_words,
                      "total_tokens": prompt_words + completion_words},
        }

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, payload: bytes, content_type: str = "application/json",
                      headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()

            def _error(self, status: int, message: str, headers: dict | None = None) -> None:
                payload = json.dumps({"error": {"message": message, "type": "test", "code": status}}).encode()
                self._send(status, payload, headers=headers)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models" and server.serve_models:
                    data = [{"id": server.model, "object": "model", "created": 0, "owned_by": "tests"}]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                if length > 10_000_000:
                    self._error(413, "request too large")
                    return
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._error(404, f"no route {self.path}")
                    return
                body = json.loads(raw)
                if body.get("model") != server.model:
                    self._error(404, f"The model `{body.get('model')}` does not exist.")
                    return
                fault = server._fault_for(body)
                entry = {"key": body_key(body), "fault": fault, "answered": False, "body": body}
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    if fault == "429":
                        self._error(429, "Rate limit reached", {"Retry-After": "0"})
                    elif fault == "500":
                        self._error(500, "The server had an error", {"Retry-After": "0"})
                    elif fault == "timeout":
                        time.sleep(server.stall)
                        self._error(504, "too late")
                    elif fault == "not_json":
                        self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                    else:
                        self._send(200, json.dumps(server._completion(body, fault)).encode())
                        entry["answered"] = True
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed
                with server._lock:
                    server.log.append(entry)

        return Handler


# ------------------------------------------------------------------------------------------------------------
# A deterministic responder that answers the default ReasonAug prompts the way a cooperative model would.
# ------------------------------------------------------------------------------------------------------------

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def pseudo_words(seed: str, count: int) -> list[str]:
    """`count` made-up words (never English stopwords, never a concept's name) derived from `seed`."""
    words = []
    for i in range(count):
        digest = hashlib.sha256(f"{seed}/{i}".encode()).digest()
        words.append("".join(_SYLLABLES[b % len(_SYLLABLES)] for b in digest[:3]))
    return words


def concept_vocabulary(concept: str) -> list[str]:
    return pseudo_words("concept:" + concept, 8)


class ReasonAugResponder:
    """Answers by stage (told apart by the system prompts of the prompts in use) from the request alone: the
    concept's made-up vocabulary, mixed with words of the request's seed, so that BM25 has something to rank."""

    def __init__(self, prompts, concepts_by_domain: dict[str, list[str]]):
        self.stage_of = {prompts.data[stage]["system"]: stage for stage in ("definition", "problem", "check")}
        self.concepts_by_domain = concepts_by_domain

    def stage(self, body: dict) -> str:
        return self.stage_of[body["messages"][0]["content"]]

    @staticmethod
    def concept(body: dict) -> tuple[str, str]:
        match = re.search(r'the (.+?) "(.+?)"', body["messages"][-1]["content"])
        return match.group(1), match.group(2)

    @staticmethod
    def problem_text(body: dict) -> str:
        return re.search(r"\*\*Problem\*\*\n(.*?)\n\*\*Solution\*\*", body["messages"][-1]["content"], re.S).group(1)

    def __call__(self, body: dict) -> str:
        stage = self.stage(body)
        domain, concept = self.concept(body)
        own = concept_vocabulary(concept)
        coding = "```python" in body["messages"][-1]["content"]
        if stage == "definition":
            text = f"**Concept**\n{concept}\n**Definition**\n" + " ".join(own) + " applies when " + " ".join(own[:3])
            return text + ("\n**Implementation Code**\n```python\ndef run(x):\n    return x\n```" if coding else "")
        if stage == "check":
            docstring = '"""' + self.problem_text(body)[:80] + '"""'
            return (f"```python\n{docstring}\ndef solve(data):\n    return sorted(data)\n```" if coding
                    else "YES, the solution is correct.")
        seed = body.get("seed", 0)
        others = [w for name in self.concepts_by_domain[domain] if name != concept for w in concept_vocabulary(name)]
        noise = pseudo_words(f"noise:{seed}", 4)
        rng = random.Random(seed)
        words = rng.sample(own, 4) + rng.sample(others, min(3, len(others))) + noise
        rng.shuffle(words)
        problem = "Consider the following task: " + " ".join(words) + f". Report the value for case {seed % 97}."
        solution = (f"```python\ndef solve(case):\n    return {seed % 97} + len('{own[0]}')\n```" if coding
                    else f"Work through {own[1]} and {noise[0]} step by step; the answer is {seed % 97}.")
        return f"**Problem**\n{problem}\n**Solution**\n{solution}"
