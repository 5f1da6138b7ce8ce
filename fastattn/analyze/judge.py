"""A judge: any OpenAI-compatible chat-completions endpoint, with timeouts, retries and a cache.

    judge = Judge.from_env()          # FASTATTN_JUDGE_BASE_URL, FASTATTN_JUDGE_MODEL, FASTATTN_JUDGE_API_KEY
    text = judge.ask([{"role": "user", "content": "..."}])

POST ``{base_url}/chat/completions`` with ``{"model", "messages", "temperature": 0, "max_tokens"}``
and ``Authorization: Bearer <key>``; the answer is ``choices[0].message.content``.
Retried (with exponential backoff): timeouts, connection errors, HTTP 429 and 5xx, and bodies that
are not such a JSON object. Not retried: other HTTP 4xx (a wrong key or model will not improve).
After the last try :class:`JudgeError` says what went wrong. Answers are cached in a JSON-lines
file keyed by a hash of (model, messages, max_tokens), so a rerun asks nothing twice.
Standard library only (urllib).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

ENV_BASE_URL, ENV_MODEL, ENV_KEY = "FASTATTN_JUDGE_BASE_URL", "FASTATTN_JUDGE_MODEL", "FASTATTN_JUDGE_API_KEY"


class JudgeError(RuntimeError):
    """The judge could not give an answer (after retries)."""


class Judge:
    """See the module docstring. ``cache`` is a path (JSON lines) or None."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 1.0,
        cache: str | Path | None = None,
        max_tokens: int = 64,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base URL must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("judge model name is empty")
        if timeout <= 0 or retries < 0:
            raise ValueError("judge timeout must be positive and retries non-negative")
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.timeout, self.retries, self.backoff, self.max_tokens = timeout, retries, backoff, max_tokens
        self.cache_path = Path(cache) if cache else None
        self._cache: dict = {}
        self.calls = 0  # HTTP requests made (for reports and tests)
        if self.cache_path and self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self._cache[rec["key"]] = rec["answer"]

    @classmethod
    def from_env(cls, **kw) -> Judge:
        """From FASTATTN_JUDGE_BASE_URL / _MODEL / _API_KEY (the key may be empty for local servers)."""
        base, model = os.environ.get(ENV_BASE_URL, ""), os.environ.get(ENV_MODEL, "")
        if not base or not model:
            raise ValueError(
                f"set {ENV_BASE_URL} and {ENV_MODEL} (and {ENV_KEY} if the endpoint needs one) "
                "to an OpenAI-compatible chat endpoint"
            )
        return cls(base, model, os.environ.get(ENV_KEY, ""), **kw)

    def _key(self, messages, max_tokens) -> str:
        blob = json.dumps([self.model, messages, max_tokens], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _request(self, body: bytes) -> str:
        req = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
            },
        )
        self.calls += 1
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            raw = resp.read()
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Malformed(f"malformed response {raw[:200]!r}") from exc
        if not isinstance(content, str):
            raise _Malformed(f"message content is not a string: {content!r}")
        return content.strip()

    def ask(self, messages: list, max_tokens: int | None = None) -> str:
        """The judge's answer to a chat ``messages`` list (cached)."""
        max_tokens = max_tokens or self.max_tokens
        key = self._key(messages, max_tokens)
        if key in self._cache:
            return self._cache[key]
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        ).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._request(body)
                break
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(f"judge {self.base_url}: {last} (not retried)") from exc
            except TimeoutError as exc:
                last = f"timeout after {self.timeout:g} s ({exc})"
            except urllib.error.URLError as exc:
                last = (
                    f"timeout after {self.timeout:g} s"
                    if isinstance(exc.reason, TimeoutError)
                    else f"connection error ({exc.reason})"
                )
            except (ConnectionError, _Malformed) as exc:
                last = str(exc)
        else:
            raise JudgeError(f"judge {self.base_url}: no answer after {self.retries + 1} tries; last: {last}")
        self._cache[key] = answer
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
        return answer


class _Malformed(Exception):
    pass


def parse_yes_no(answer: str) -> bool | None:
    """True / False for an answer starting with yes / no (any case, punctuation after), else None."""
    words = answer.strip().lower().split()
    if not words:
        return None
    w = words[0].strip(".,!:;\"'*()[]")
    return True if w == "yes" else False if w == "no" else None
