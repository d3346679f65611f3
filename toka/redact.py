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
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["REDACTED", "looks_like_token", "redact", "redact_data", "remember_secret", "secret_values"]

REDACTED = "[REDACTED]"

T = TypeVar("T")

# Each starts where a word does: "ta-sk-scheduler-implementation" is a file name, not a key. The
# generic `sk-` form also needs a digit: keys are random, kebab-case words (`sk-...-overview`) are not.
_PATTERNS = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    + "|".join(
        [
            r"sk-ant-[A-Za-z0-9_\-]{8,}",  # Anthropic
            r"sk-(?=[A-Za-z0-9_\-]*[0-9])(?:proj-)?[A-Za-z0-9_\-]{20,}",  # OpenAI-style
            r"gh[pousr]_[A-Za-z0-9]{20,}",  # GitHub tokens
            r"github_pat_[A-Za-z0-9_]{20,}",
            r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
            r"AKIA[0-9A-Z]{16}",  # AWS access key id
            r"glpat-[A-Za-z0-9_\-]{20,}",  # GitLab
            r"(?i:bearer)\s+[A-Za-z0-9._\-]{16,}",
        ]
    )
    + ")"
)
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
    return _PATTERNS.sub(REDACTED, text)


def looks_like_token(text: str) -> bool:
    """Whether ``text`` holds a string of a known token format (what :func:`redact` replaces unasked)."""
    return _PATTERNS.search(text) is not None


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
