"""Generation backends: ``openai`` (any OpenAI-compatible chat endpoint) and ``template`` (offline).

The openai backend reads its API key from the environment variable named in the config and
keeps it only in the request header: it is never logged, cached, or put in an error
message. ``check()`` runs before any user is processed, so a missing key or an
unreachable endpoint fails at once. Requests time out, and 429/5xx/network errors are
retried with exponential backoff (``Retry-After`` wins when the server sends it); a
malformed response is reported as a failure of that request and never cached.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rayrec.config.joint import PrefsConfig
from rayrec.errors import ConfigError, RayrecError
from rayrec.prefs.prompts import Request

log = logging.getLogger(__name__)


class BackendError(RayrecError):
    """A request failed for good (after retries, or a response that cannot be used)."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIBackend:
    """POST {base_url}/chat/completions with bounded retries; one instance is shared by threads."""

    name = "openai"

    def __init__(self, cfg: PrefsConfig) -> None:
        import requests

        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"prefs.backend=openai reads its API key from the environment variable "
                              f"{cfg.api_key_env}, which is not set; export it (or set prefs.api_key_env to the "
                              "variable that holds it). The key is never stored in config, logs, cache or MLflow.")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:  # never show the session's headers
        return f"OpenAIBackend(base_url={self.url!r}, model={self.cfg.model!r})"

    def check(self) -> None:
        """Fail fast when the endpoint cannot be reached or rejects the key (GET /models)."""
        import requests

        try:
            r = self._session.get(f"{self.url}/models", timeout=min(10.0, self.cfg.timeout_s))
        except requests.RequestException as e:
            raise RayrecError(f"LLM endpoint {self.url} is unreachable ({type(e).__name__}); start the server or "
                              "fix prefs.base_url (or use prefs.backend=template, offline)") from None
        if r.status_code in (401, 403):
            raise RayrecError(f"LLM endpoint {self.url} rejected the API key from ${self.cfg.api_key_env} "
                              f"(HTTP {r.status_code})")

    def complete(self, req: Request) -> Completion:
        """One chat completion with retries on 429, 5xx, timeouts and connection errors."""
        import requests

        body = {"model": self.cfg.model, "messages": list(req.messages), "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            wait = self.cfg.backoff_s * 2**attempt
            try:
                r = self._session.post(f"{self.url}/chat/completions", json=body, timeout=self.cfg.timeout_s)
            except requests.RequestException as e:
                last = type(e).__name__
            else:
                if r.status_code == 429 or r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                    wait = _retry_after(r.headers.get("Retry-After"), wait)
                elif r.status_code >= 400:
                    raise BackendError(f"{req.kind} {req.idx}: HTTP {r.status_code}: {r.text[:200]}")
                else:
                    return parse_completion(r, req)
            if attempt < self.cfg.max_retries:
                log.debug("%s %d: %s, retrying in %.2fs", req.kind, req.idx, last, wait)
                time.sleep(wait)
        raise BackendError(f"{req.kind} {req.idx}: gave up after {self.cfg.max_retries + 1} attempts (last: {last})")


def _retry_after(header: str | None, default: float) -> float:
    try:
        return max(0.0, float(header)) if header is not None else default
    except ValueError:
        return default


def parse_completion(response, req: Request) -> Completion:
    """Text and token usage of a chat-completions response; BackendError when malformed."""
    try:
        data = response.json()
        text = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BackendError(f"{req.kind} {req.idx}: malformed response (no choices[0].message.content): "
                           f"{response.text[:200]!r}") from None
    if not isinstance(text, str) or not text.strip():
        raise BackendError(f"{req.kind} {req.idx}: malformed response (empty content)")
    usage = data.get("usage") or {}
    return Completion(text.strip(), int(usage.get("prompt_tokens", 0) or 0), int(usage.get("completion_tokens", 0) or 0))


STOPWORDS = frozenset("""a an and the of in on at to for with by from as is it its into through when meets will find
expect story fate shape follows call critics fans full mixes finale feels that this be are was who what""".split())


class TemplateBackend:
    """Offline: taste summaries from the genres and frequent words of the user's training items."""

    name = "template"

    def __init__(self, facts: dict[int, dict[str, str]]) -> None:
        self.facts = facts

    def check(self) -> None:
        pass

    def complete(self, req: Request) -> Completion:
        if req.kind == "item":
            f = self.facts[req.facts["item"]]
            genres = f["genres"].replace("|", ", ")
            text = f"{f['title']}." + (f" Genres: {genres}." if genres else "") + (f" {f['text']}" if f["text"] else "")
            return Completion(text.strip())
        return Completion(user_summary([self.facts[i] for i in req.facts["items"]]))


def user_summary(items: list[dict[str, Any]]) -> str:
    """2-3 sentences: the top genres by count, the most frequent content words, the latest titles."""
    genres = Counter(g for f in items for g in f["genres"].split("|") if g)
    words = Counter(w for f in items for w in re.findall(r"[a-z]{3,}", f["text"].lower()) if w not in STOPWORDS)
    top = [g for g, _ in genres.most_common(3)]
    out = []
    if top:
        out.append(f"Mostly into {top[0].lower()}" + (f", also {', '.join(g.lower() for g in top[1:])}" if top[1:] else "") + ".")
    if words:
        out.append(f"Drawn to {', '.join(w for w, _ in words.most_common(5))}.")
    out.append(f"Recently enjoyed {', '.join(f['title'] for f in items[-2:][::-1])}.")
    return " ".join(out)


def make_backend(cfg: PrefsConfig, facts: dict[int, dict[str, str]]):
    return OpenAIBackend(cfg) if cfg.backend == "openai" else TemplateBackend(facts)
