"""An LLM judge on any OpenAI-compatible chat-completions endpoint (stdlib ``urllib``, no SDK).

Used optionally for open-QA verdicts (the paper used Gemini: question, gold answer, attempted
answer -> ``Correct: 1|0`` on the last line) and for the paper's two 0-2 coherence ratings
(relevance to the instruction, fluency), each ending in ``Rating: [[n]]``. Prompts are this
project's own wording of the paper's rubric. Transient failures (connection errors, HTTP 429 and
5xx, a non-``stop`` finish) are retried with exponential back-off; an item whose verdict cannot
be obtained or parsed is scored as wrong / 0 and counted in ``failures``.

The API key, if the endpoint needs one, is read from the environment variable the config names
(``eval.llm_api_key_env``); nothing else is looked up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class JudgeError(RuntimeError):
    """The endpoint did not give a usable answer after the retries."""


@dataclass
class ChatClient:
    """Minimal OpenAI-style ``POST {endpoint}/chat/completions`` client."""

    endpoint: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 350  # the reference judge's output cap (reference-spec 5.4)
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    calls: int = field(default=0, init=False)

    @property
    def url(self) -> str:
        e = self.endpoint.rstrip("/")
        return e if e.endswith("/chat/completions") else e + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=self._headers(), method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 (configured endpoint)
            return json.loads(resp.read().decode("utf-8"))

    def chat(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        """The assistant message text; raises :class:`JudgeError` after ``max_retries`` failed tries."""
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": max_tokens or self.max_tokens}
        last: Exception | None = None
        for attempt in range(self.max_retries):
            try:
                self.calls += 1
                body = self._post(payload)
                choice = body["choices"][0]
                finish = choice.get("finish_reason") or "stop"
                if finish not in ("stop", "length"):
                    raise JudgeError(f"finish_reason={finish}")
                return str(choice["message"]["content"] or "")
            except urllib.error.HTTPError as exc:
                last = exc
                if exc.code not in (408, 409, 429) and exc.code < 500:
                    raise JudgeError(f"{self.url}: HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError, JudgeError, KeyError,
                    IndexError, json.JSONDecodeError) as exc:
                last = exc
            time.sleep(self.backoff_s * (2**attempt))
        raise JudgeError(f"{self.url}: no usable answer after {self.max_retries} tries ({last})")


def client_from_config(cfg: Any) -> ChatClient:
    """A :class:`ChatClient` from an ``EvalConfig`` (``llm_endpoint`` must be set)."""
    if not cfg.llm_endpoint:
        from ember.errors import ConfigError

        raise ConfigError("eval.llm_endpoint is not set: give an OpenAI-compatible URL "
                          "(e.g. http://localhost:8000/v1) or use eval.open_judge=local")
    return ChatClient(
        endpoint=cfg.llm_endpoint, model=cfg.llm_model, api_key_env=getattr(cfg, "llm_api_key_env", "OPENAI_API_KEY"),
        temperature=float(getattr(cfg, "llm_temperature", 0.0)), timeout_s=float(getattr(cfg, "llm_timeout_s", 60.0)),
    )


def parallel_map(fn: Callable[[Any], T], items: Sequence[Any], threads: int = 8) -> list[T]:
    """``[fn(x) for x in items]`` on a thread pool (network-bound judge calls), order kept."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------------------------------
# open-QA verdicts

OPEN_QA_SYSTEM = "You grade short answers to quiz questions strictly and briefly."

OPEN_QA_PROMPT = """A model was asked a question. Compare its attempt with the reference answer.

Question: {question}
Reference answer: {gold}
Attempted answer: {pred}

The attempt counts as correct when it states the same answer as the reference (wording, extra detail \
or a longer sentence are fine). It is wrong when it gives a different answer, several competing \
answers, no answer, or only repeats the question.
Reply in exactly two lines: first one sentence of reasoning, then `Correct: 1` if the attempt is \
correct or `Correct: 0` if it is not."""

_CORRECT_RE = re.compile(r"Correct\s*:\s*\**\s*([01])", re.IGNORECASE)


def parse_correct(text: str) -> bool | None:
    """``Correct: 1|0`` from the last line, else the last occurrence anywhere; None when absent."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = _CORRECT_RE.search(lines[-1])
        if m:
            return m.group(1) == "1"
    found = _CORRECT_RE.findall(text)
    return found[-1] == "1" if found else None


def judge_open_answer(client: ChatClient, question: str, gold: str, pred: str) -> tuple[bool, str]:
    """(verdict, raw judge text); an empty attempt is wrong without a call; failures count as wrong."""
    if not pred.strip():
        return False, "<empty answer>"
    msgs = [{"role": "system", "content": OPEN_QA_SYSTEM},
            {"role": "user", "content": OPEN_QA_PROMPT.format(question=question, gold=gold, pred=pred.strip())}]
    try:
        text = client.chat(msgs)
    except JudgeError as exc:
        log.warning("open-QA judge failed: %s", exc)
        return False, f"<judge error: {exc}>"
    verdict = parse_correct(text)
    return bool(verdict), text


# --------------------------------------------------------------------------------------------------
# coherence ratings (0-2)

RELEVANCE_PROMPT = """Rate how closely the response addresses the instruction.
Judge only whether it is about what was asked; ignore grammar, fluency, correctness and how informative it is.

Instruction: {instruction}
Response: {completion}

0 = unrelated to the instruction, 1 = partly related, 2 = clearly addresses the instruction.
Give one sentence of reasoning, then end with `Rating: [[n]]` where n is 0, 1 or 2."""

FLUENCY_PROMPT = """Rate only the fluency of the text below: is it well-formed, readable language?
Ignore whether it is true, relevant or helpful. Markdown and lists count as fluent. The text may be cut \
off at a length limit: do not penalise an unfinished last sentence.

Text: {completion}

0 = not fluent (garbled, broken or repetitive), 1 = partly fluent, 2 = fluent.
Give one sentence of reasoning, then end with `Rating: [[n]]` where n is 0, 1 or 2."""

_RATING_RE = re.compile(r"Rating\s*:\s*\[\[\s*([0-2])\s*\]\]")


def parse_rating(text: str) -> int | None:
    found = _RATING_RE.findall(text)
    return int(found[-1]) if found else None


RETRY_LENGTHS = (150, 50)  # characters: the reference's fallback when a rating fails (reference-spec 5.5)


def rate(client: ChatClient, prompt: str) -> int | None:
    try:
        return parse_rating(client.chat([{"role": "user", "content": prompt}]))
    except JudgeError as exc:
        log.warning("coherence judge failed: %s", exc)
        return None


def rate_with_fallback(client: ChatClient, make_prompt: Callable[[str], str], completion: str) -> int | None:
    """A 0-2 rating of ``completion`` (``make_prompt`` puts it into the judge's prompt); when no rating
    comes back (a failed call or no ``Rating: [[n]]``), retried with the completion cut to 150, then 50
    characters, as the reference does; None when every try failed."""
    tries = [completion] + [completion[:n] for n in RETRY_LENGTHS if n < len(completion)]
    for text in tries:
        rating = rate(client, make_prompt(text))
        if rating is not None:
            return rating
    return None


def rate_coherence(client: ChatClient, instruction: str, completion: str) -> tuple[int, int, bool]:
    """(relevance 0-2, fluency 0-2, failed); an empty completion is 0/0 without a call.

    The fluency judge gets the completion with a ``.`` appended (the reference's wording, so a cut-off
    last sentence reads as ended). A rating that fails after the truncated retries counts 0 and sets
    ``failed``."""
    text = completion.strip()
    if not text:
        return 0, 0, False
    rel = rate_with_fallback(client, lambda t: RELEVANCE_PROMPT.format(instruction=instruction, completion=t), text)
    flu = rate_with_fallback(client, lambda t: FLUENCY_PROMPT.format(completion=t + "."), text)
    return rel or 0, flu or 0, rel is None or flu is None
