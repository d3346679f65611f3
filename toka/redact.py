"""Keeping secrets out of everything the runtime writes.

Known secret values (the API key, values of secret-looking environment
variables) are replaced wherever they appear; tokens of common formats are
replaced even when their value is unknown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

__all__ = ["REDACTED", "redact", "secret_values"]

REDACTED = "[REDACTED]"

_PATTERNS = re.compile(
    "|".join(
        [
            r"sk-ant-[A-Za-z0-9_\-]{8,}",  # Anthropic
            r"sk-(?:proj-)?[A-Za-z0-9_\-]{20,}",  # OpenAI-style
            r"gh[pousr]_[A-Za-z0-9]{20,}",  # GitHub tokens
            r"github_pat_[A-Za-z0-9_]{20,}",
            r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
            r"AKIA[0-9A-Z]{16}",  # AWS access key id
            r"glpat-[A-Za-z0-9_\-]{20,}",  # GitLab
            r"(?i:bearer)\s+[A-Za-z0-9._\-]{16,}",
        ]
    )
)
_SECRET_NAME = re.compile(r"(?i)(key|token|secret|password|passwd|credential|auth)")


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (long enough to be worth hiding)."""
    env = os.environ if env is None else env
    return [v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known ``secrets`` and token-shaped strings replaced by ``[REDACTED]``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _PATTERNS.sub(REDACTED, text)
