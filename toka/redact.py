"""Keeping secrets out of everything the runtime writes.

Known secret values (the API key, values of secret-looking environment
variables) are replaced wherever they appear; tokens of common formats are
replaced even when their value is unknown. :func:`redact` takes one text;
:func:`redact_data` takes structured data (a result, a report, an event
payload) and redacts every string in it, so a writer can pass what it is
about to write through one call.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["REDACTED", "looks_like_token", "redact", "redact_data", "remember_secret", "secret_values"]

REDACTED = "[REDACTED]"

T = TypeVar("T")

# Each starts where a word does: "ta-sk-scheduler-implementation" is a file name, not a key.
# No pattern may look ahead over what follows or be retried inside its own match: a spec value
# may be 65,536 characters of "sk-sk-sk-...", and a lookahead scanning to the end of the run at
# each "sk-" in it took 4 s for one value. What the prefix alone cannot tell (is the rest random?)
# is decided in Python, once per candidate (:func:`_is_token`).
_PATTERNS = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    + "|".join(
        [
            r"sk-ant-[A-Za-z0-9_\-]{8,}",  # Anthropic
            r"gh[pousr]_[A-Za-z0-9]{20,}",  # GitHub tokens
            r"github_pat_[A-Za-z0-9_]{20,}",
            r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
            r"AKIA[0-9A-Z]{16}",  # AWS access key id
            r"glpat-[A-Za-z0-9_\-]{20,}",  # GitLab
            # Checked for randomness: "Bearer token-authentication" is prose.
            r"(?i:bearer)\s+(?P<bearer>[A-Za-z0-9._\-]{16,})",
        ]
    )
    # OpenAI-style, checked for randomness too ("sk-learn-compatible-pipelines-v2" is a name), and
    # only where a token starts (the text's start, a space, a quote, '=', ':', a bracket): in
    # "v2-sk-2024-release-candidate-1" it is the middle of a name.
    + r""")|(?<![^\s"'`=:,(\[{<])(?P<sk>sk-(?:proj-)?[A-Za-z0-9_\-]{20,})"""
)
_SEPARATORS = re.compile(r"[-_.]+")
_DIGIT = re.compile(r"[0-9]")
_LETTER = re.compile(r"[A-Za-z]")
#: A run of letters and digits this long, holding both, is random, not a word ("Abc123DEF456...").
_RANDOM_RUN = 16


def _looks_random(value: str) -> bool:
    """Whether ``value`` (a bearer token or an ``sk-`` key's body) looks generated, not written.

    Keys and tokens mix letters and digits, in a long run (``abc123def456ghi789``, a JWT's
    ``eyJhbGciOiJIUzI1NiJ9``) or in most of their parts (a UUID); names joined by hyphens have
    digits in a version or a date at most (``learn-compatible-pipelines-v2``,
    ``2024-release-candidate-1``).
    """
    if _LETTER.search(value) is None:
        return False
    parts = [part for part in _SEPARATORS.split(value) if part]
    with_digit = [part for part in parts if _DIGIT.search(part) is not None]
    return 2 * len(with_digit) > len(parts) or any(
        len(part) >= _RANDOM_RUN and _LETTER.search(part) is not None for part in with_digit)


def _is_token(match: re.Match[str]) -> bool:
    if match["sk"] is not None:
        return _looks_random(match["sk"][3:])
    if match["bearer"] is not None:
        return _looks_random(match["bearer"])
    return True


def _token_spans(text: str) -> Iterator[tuple[int, int]]:
    """Where the token-shaped strings of ``text`` are, first to last.

    A candidate found not random is searched again from just past its prefix ("Bearer " or
    "sk-"), so that a token inside it is still found ("Bearer sk-ant-..."); each character is
    looked at a bounded number of times, and the time taken stays linear in the text's length.
    """
    pos = 0
    while (match := _PATTERNS.search(text, pos)) is not None:
        if _is_token(match):
            yield match.span()
            pos = match.end()
        else:
            pos = match.start("bearer") if match["bearer"] is not None else match.start() + 3


_SECRET_NAME = re.compile(r"(?i)(key|token|secret|password|passwd|credential|auth)")


# Secrets the process learnt elsewhere than its environment (a Prefect Secret block).
_REMEMBERED: set[str] = set()


def remember_secret(value: str) -> None:
    """Redact ``value`` from now on in this process, wherever it appears."""
    if len(value) >= 8:
        _REMEMBERED.add(value)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (long enough to be worth hiding),
    and the secrets remembered with :func:`remember_secret`."""
    env = os.environ if env is None else env
    return [*(v for k, v in env.items() if _secret_name(k) and len(v) >= 8), *sorted(_REMEMBERED)]


@functools.lru_cache(maxsize=4096)
def _secret_name(name: str) -> bool:
    # Cached: a run asks several times a task, and the case-insensitive search over every
    # variable's name was two thirds of the cost (the values are read each time: they may change).
    return _SECRET_NAME.search(name) is not None


def _known(secrets: Iterable[str]) -> list[str]:
    # Longest first: a secret that contains another is replaced whole.
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def _redact(text: str, known: list[str]) -> str:
    for secret in known:
        text = text.replace(secret, REDACTED)
    out, last = [], 0
    for start, end in _token_spans(text):
        out += [text[last:start], REDACTED]
        last = end
    return "".join(out) + text[last:] if out else text


def looks_like_token(text: str) -> bool:
    """Whether ``text`` holds a string of a known token format (what :func:`redact` replaces unasked)."""
    return next(_token_spans(text), None) is not None


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known ``secrets`` and token-shaped strings replaced by ``[REDACTED]``."""
    return _redact(text, _known(secrets))


def redact_data(value: T, secrets: Iterable[str] = ()) -> T:
    """``value`` with every string in it redacted as by :func:`redact`.

    Walks dicts (keys too), lists and tuples; other values are returned as
    they are. Use it on what a writer is about to write (a dumped result,
    a summary, an event payload).
    """
    return _walk(value, _known(secrets))  # type: ignore[no-any-return]


def _walk(value: Any, known: list[str]) -> Any:
    if isinstance(value, str):
        return _redact(value, known)
    if isinstance(value, Mapping):
        return {_walk(k, known): _walk(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, known) for v in value]
    if isinstance(value, tuple):
        return tuple(_walk(v, known) for v in value)
    return value
