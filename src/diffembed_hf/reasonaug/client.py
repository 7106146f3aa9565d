"""Chat requests to any OpenAI-compatible server (vLLM's `vllm serve`, a hosted API) with the `openai` client.

Requests run in a bounded thread pool (`workers` at a time). Failures that a later try can fix are retried with
exponential back-off (the server's Retry-After honoured): HTTP 429, HTTP 5xx, a timeout, a refused or dropped
connection, and an answer that is not a chat completion (not JSON, no choices). The retry loop is ours, not the
client's (`max_retries=0`), because every failure is named and counted in the run's summary. Any other HTTP error
(400 bad request, 401 key, 404 model) cannot be fixed by asking again: it stops the run with the server's message.
A request that still fails after its retries stops the run too, once the requests in flight have answered (their
answers are journaled): the journal keeps what arrived, and a rerun sends the rest.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ServerError
from .prompts import CORE_FIELDS

logger = logging.getLogger(__name__)

# The causes a request is retried for, and how the summary names them.
TRANSIENT = {
    "rate_limited": "HTTP 429 (rate limited)",
    "server_error": "HTTP 5xx (server error)",
    "timeout": "timed out",
    "connection": "connection failed",
    "bad_response": "not a chat completion (not JSON, or no choices)",
}
_MAX_DELAY = 60.0



class RequestFailed(Exception):
    """One request failed after every retry; `cause` is a TRANSIENT key."""

    def __init__(self, cause: str, detail: str):
        super().__init__(f"{TRANSIENT[cause]}: {detail}")
        self.cause = cause


@dataclass
class Traffic:
    """What went over the wire: answers, tokens, and the failures by cause (retried, and given up on)."""

    answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retried: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)

    def add_usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)


def answer_of(response) -> dict:
    """The journal's form of a chat completion: what the pipeline reads, nothing that varies between calls."""
    if isinstance(response, str):  # the openai client returns the body as text when it is not JSON
        raise ValueError(f"the body is not JSON: {response[:80]!r}")
    choices = getattr(response, "choices", None)
    if not choices:
        raise ValueError("no choices in the answer")
    choice = choices[0]
    message = choice.message
    usage = getattr(response, "usage", None)
    return {
        "content": message.content,
        "refusal": getattr(message, "refusal", None),
        "finish_reason": choice.finish_reason,
        "model": getattr(response, "model", None),
        "usage": None if usage is None else {"prompt_tokens": usage.prompt_tokens,
                                              "completion_tokens": usage.completion_tokens},
    }


def _retry_after(error) -> float | None:
    response = getattr(error, "response", None)
    value = None if response is None else response.headers.get("retry-after")
    try:
        return None if value is None else min(max(float(value), 0.0), _MAX_DELAY)
    except ValueError:
        return None


def _server_message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message", body)
    return str(body or error)[:300]


class ChatClient:
    """An `openai.OpenAI` client with our retry loop, failure counts and a bounded worker pool."""

    def __init__(self, base_url: str | None, api_key: str | None, *, timeout: float = 300.0, max_retries: int = 5,
                 workers: int = 8, retry_delay: float = 1.0):
        import openai

        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.base_url = str(self.client.base_url)
        self.max_retries = max_retries
        self.workers = workers
        self.retry_delay = retry_delay
        self.traffic = Traffic()

    def _with_retries(self, call: Callable):
        """call() until it succeeds, retrying the TRANSIENT failures; other API errors become ServerError."""
        openai = self._openai
        for attempt in range(self.max_retries + 1):
            wait_for = None
            try:
                return call()
            except openai.RateLimitError as err:
                cause, detail, wait_for = "rate_limited", _server_message(err), _retry_after(err)
            except openai.InternalServerError as err:
                cause, detail, wait_for = "server_error", f"HTTP {err.status_code}: {_server_message(err)}", \
                    _retry_after(err)
            except openai.APITimeoutError:
                cause, detail = "timeout", f"no answer within {self.client.timeout} s"
            except openai.APIConnectionError as err:
                cause, detail = "connection", f"{self.base_url}: {err.__cause__ or err}"
            except (openai.APIResponseValidationError, ValueError, AttributeError, TypeError) as err:
                cause, detail = "bad_response", f"{type(err).__name__}: {str(err)[:200]}"
            except openai.APIStatusError as err:
                raise ServerError(f"{self.base_url} refused the request: HTTP {err.status_code}: "
                                  f"{_server_message(err)}") from None
            if attempt == self.max_retries:
                self.traffic.failed[cause] += 1
                raise RequestFailed(cause, detail)
            self.traffic.retried[cause] += 1
            delay = wait_for if wait_for is not None else min(self.retry_delay * 2 ** attempt, _MAX_DELAY)
            logger.debug("%s; retrying in %.1f s", detail, delay)
            time.sleep(delay * (1 if wait_for is not None else 0.75 + random.random() / 4))

    def check_server(self, model: str) -> None:
        """Before any request: the server answers and, if it lists its models, serves `model`."""
        openai = self._openai
        try:
            served = self._with_retries(lambda: [m.id for m in self.client.models.list()])
        except RequestFailed as err:
            raise ServerError(f"cannot use the server at {self.base_url}: {err}") from None
        except ServerError as err:
            if isinstance(err.__context__, openai.NotFoundError) or "HTTP 404" in str(err):
                return  # a server without /models: the first request will tell
            raise
        if served and model not in served:
            raise ServerError(f"the server at {self.base_url} does not serve the model {model!r}; it serves: "
                              f"{', '.join(served[:10])}")

    def complete(self, body: dict) -> dict:
        """One chat completion with retries; returns answer_of(response)."""
        core = {key: value for key, value in body.items() if key in CORE_FIELDS}
        extra = {key: value for key, value in body.items() if key not in CORE_FIELDS}  # sent as they are
        answer = self._with_retries(lambda: answer_of(self.client.chat.completions.create(**core,
                                                                                          extra_body=extra or None)))
        self.traffic.answered += 1
        self.traffic.add_usage(answer["usage"])
        return answer

    def run(self, bodies: list[tuple[str, dict]], on_answer: Callable[[str, dict], None]) -> None:
        """Send (key, body) requests, `workers` at a time; on_answer(key, answer) runs in this thread for each
        answer as it arrives. The first request that fails for good (RequestFailed after its retries, or
        ServerError) stops new sends; the ones in flight finish and are handed over, then that error is raised."""
        pending = iter(bodies)
        in_flight: dict[Future, str] = {}
        failure: RequestFailed | ServerError | None = None
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="reasonaug")
        try:
            while True:
                while failure is None and len(in_flight) < self.workers:
                    item = next(pending, None)
                    if item is None:
                        break
                    in_flight[pool.submit(self.complete, item[1])] = item[0]
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    key = in_flight.pop(future)
                    try:
                        answer = future.result()
                    except (RequestFailed, ServerError) as err:
                        failure = failure or err
                        continue
                    on_answer(key, answer)
        except KeyboardInterrupt:  # stop at once: the requests in flight are not journaled and will be sent again
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if failure is not None:
            raise failure
