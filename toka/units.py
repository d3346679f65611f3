"""Typed values for the unit strings specs use: durations, sizes, CPU, bandwidth.

Each type keeps the text the user wrote (``str(value)`` gives it back, so a
spec round-trips) next to the number the runtime needs. Parsing is strict:
``"150%"``, ``"0s"`` and ``"lots"`` are errors whose message says what was
expected. Sizes use binary multiples (1 MB = 1024 KB), as memory limits in
cgroups and container runtimes do; bandwidth uses decimal bits (1 Mbps =
10**6 bit/s), as network rates always do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, ClassVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

from .yaml_source import WrittenInt

__all__ = ["Bandwidth", "ByteSize", "CpuShare", "Duration"]


class _UnitValue:
    """Shared pydantic plumbing: validate from text, serialise back to text."""

    text: str
    _json_pattern: ClassVar[str]
    _examples: ClassVar[list[str]]
    _description: ClassVar[str]

    @classmethod
    def parse(cls, value: object) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def _validate(cls, value: object) -> Any:
        if isinstance(value, cls):
            return value
        try:
            return cls.parse(value)
        except ValueError as e:
            # A custom error type keeps pydantic from prefixing "Value error, ".
            raise PydanticCustomError("unit", str(e)) from None

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        return {
            "type": "string",
            "pattern": cls._json_pattern,
            "examples": cls._examples,
            "description": cls._description,
        }

    def __str__(self) -> str:
        return self.text


def _text(value: object, kind: str, example: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{as_written(value)} is not {kind} (write it like {example!r})")
    return str(value).strip()


def as_written(value: object) -> str:
    """A YAML value as a spec's author would write it, for messages: ``null``, ``true``, a date's
    ISO form, a list or mapping in YAML's flow style (``[{description: List the files}]``); text
    quoted, and anything else as Python shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, WrittenInt):  # text as written where text is meant (a name, a description)
        return repr(value.text)
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, (dict, list)) and _at_most(value, 64):
        import yaml

        try:
            dumped = str(yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True,
                                        sort_keys=False)).strip()
        except yaml.YAMLError:  # a value of a type YAML has no tag for
            dumped = ""
        if dumped and "\n" not in dumped:  # text with line breaks: one line, as Python shows it
            return dumped
    return repr(value)


def _at_most(value: object, nodes: int) -> bool:
    """Whether ``value`` holds at most ``nodes`` values (a shared or recursive one counts each time)."""
    stack, seen = [value], 0
    while stack:
        seen += 1
        if seen > nodes:
            return False
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return True


_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_DURATION_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w)\s*)+$", re.IGNORECASE)
#: The longest duration a spec may give (a timeout or an estimate): longer is a typo, not a plan.
MAX_DURATION_SECONDS = 366 * 86400


@dataclass(frozen=True, slots=True)
class Duration(_UnitValue):
    """A positive length of time such as ``30s``, ``45m``, ``2h``, ``1d`` or ``1h30m``."""

    seconds: float
    text: str
    guessed: str | None = field(default=None, compare=False)
    """Why the value's meaning is a guess (a bare number), for a warning; None when it is not."""

    _json_pattern: ClassVar[str] = r"^\s*((\d+(\.\d+)?\s*(ms|s|m|h|d|w|MS|S|M|H|D|W)\s*)+|\d+(\.\d+)?)$"
    _examples: ClassVar[list[str]] = ["30s", "45m", "2h", "1d"]
    _description: ClassVar[str] = ("A duration: a number and a unit (ms, s, m, h, d, w), e.g. '2h' or '1h30m'; "
                                   "a bare number is seconds.")

    @classmethod
    def parse(cls, value: object) -> Duration:
        text = _text(value, "a duration", "2h")
        if _NUMBER.match(text):
            seconds = float(text)
            if seconds <= 0:
                raise ValueError(f"{text!r} must be positive: a duration longer than zero, e.g. '30s'")
            _at_most_a_year(text, seconds)
            return cls(seconds=seconds, text=f"{text}s",
                       guessed=f"{text!r} has no unit; read as {text} seconds (write '{text}s' to say so)")
        if text.startswith("-") and (_DURATION_WHOLE.match(text[1:].strip()) or _NUMBER.match(text[1:].strip())):
            raise ValueError(f"{text!r} must be positive: a duration longer than zero, e.g. '30s'")
        if not _DURATION_WHOLE.match(text):
            raise ValueError(
                f"{text!r} is not a duration; expected a number and a unit "
                "(ms, s, m, h, d, w), e.g. '30s', '45m', '2h', '1d'"
            )
        seconds = sum(
            float(n) * _DURATION_UNITS[u.lower()] for n, u in _DURATION_PART.findall(text)
        )
        if seconds <= 0:
            raise ValueError(f"{text!r} is not a positive duration; it must be longer than zero")
        _at_most_a_year(text, seconds)
        return cls(seconds=seconds, text=text)


def _at_most_a_year(text: str, seconds: float) -> None:
    if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is too large to be a duration: at most 366 days (e.g. '52w')")


_SIZE_UNITS = {  # and Kubernetes' Ki, Mi, Gi, Ti
    "b": 1,
    "kb": 1024, "kib": 1024, "k": 1024, "ki": 1024,
    "mb": 1024**2, "mib": 1024**2, "m": 1024**2, "mi": 1024**2,
    "gb": 1024**3, "gib": 1024**3, "g": 1024**3, "gi": 1024**3,
    "tb": 1024**4, "tib": 1024**4, "t": 1024**4, "ti": 1024**4,
}  # fmt: skip
#: The largest size: far beyond any machine's memory or disk, and within what setrlimit takes.
MAX_SIZE_BYTES = 1024**5
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ByteSize(_UnitValue):
    """A positive amount of memory or disk such as ``512KB``, ``256MB`` or ``1GB`` (binary multiples)."""

    bytes: int
    text: str

    _json_pattern: ClassVar[str] = r"^\s*\d+(\.\d+)?\s*([KkMmGgTt][Ii]?[Bb]?|[Bb])\s*$"
    _examples: ClassVar[list[str]] = ["512KB", "256MB", "1GB"]
    _description: ClassVar[str] = "A size: a number and a unit (B, KB, MB, GB, TB; 1 MB = 1024 KB)."

    @classmethod
    def parse(cls, value: object) -> ByteSize:
        text = _text(value, "a size", "256MB")
        if text.startswith("-") and _SIZE.match(text[1:].strip()):
            raise ValueError(f"{text!r} must be positive: a size larger than zero, e.g. '256MB'")
        m = _SIZE.match(text)
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(
                f"{text!r} is not a size; expected a number and a unit "
                "(B, KB, MB, GB, TB, or KiB, Mi, G...), e.g. '512KB', '256MB', '1GB'"
            )
        number = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if not math.isfinite(number) or number > MAX_SIZE_BYTES:
            raise ValueError(f"{text!r} is too large to be a size: at most 1024 TB")
        size = int(number)
        if size <= 0:
            raise ValueError(f"{text!r} is not a positive size; it must be larger than zero")
        return cls(bytes=size, text=text)


_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)\s*%$")


#: Bare numbers up to this are refused for ``max_cpu``: "2" may as well mean two CPUs as 2%.
_CORES = 16


@dataclass(frozen=True, slots=True)
class CpuShare(_UnitValue):
    """A share of one CPU between ``1%`` and ``100%``."""

    percent: float
    text: str
    guessed: str | None = field(default=None, compare=False)
    """Why the value's meaning is a guess (a bare number), for a warning; None when it is not."""

    _json_pattern: ClassVar[str] = r"^\s*\d+(\.\d+)?\s*%?\s*$"
    _examples: ClassVar[list[str]] = ["25%", "75%"]
    _description: ClassVar[str] = "A share of one CPU, between 1% and 100%."

    @classmethod
    def parse(cls, value: object) -> CpuShare:
        text = _text(value, "a percentage between 1% and 100%", "75%")
        bare = _NUMBER.match(text) is not None
        m = _PERCENT.match(f"{text}%" if bare else text)
        percent = float(m.group(1)) if m else None
        if percent is None or not 1 <= percent <= 100:
            raise ValueError(f"{text!r} is not a percentage between 1% and 100%")
        if bare and percent <= _CORES:
            raise ValueError(f"{text!r} has no unit: a number of CPUs or a percentage? Write '{text}%' for "
                             f"{text}% of one CPU ('100%' is one whole CPU, the most an agent gets)")
        if bare:
            return cls(percent=percent, text=f"{text}%",
                       guessed=f"{text!r} has no unit; read as {text}% of one CPU (write '{text}%' to say so)")
        return cls(percent=percent, text=text)

    @property
    def fraction(self) -> float:
        """The share as a fraction of one CPU (0.75 for ``75%``)."""
        return self.percent / 100


_BANDWIDTH_UNITS = {"bps": 1, "kbps": 10**3, "mbps": 10**6, "gbps": 10**9}
_BANDWIDTH = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Bandwidth(_UnitValue):
    """A positive network rate such as ``100Mbps`` (decimal bits per second)."""

    bits_per_second: int
    text: str

    _json_pattern: ClassVar[str] = r"^\s*\d+(\.\d+)?\s*([KkMmGg]?[Bb][Pp][Ss])\s*$"
    _examples: ClassVar[list[str]] = ["10Mbps", "100Mbps", "1Gbps"]
    _description: ClassVar[str] = "A network rate: a number and bps, Kbps, Mbps or Gbps."

    @classmethod
    def parse(cls, value: object) -> Bandwidth:
        text = _text(value, "a bandwidth", "100Mbps")
        m = _BANDWIDTH.match(text)
        if m is None or m.group(2).lower() not in _BANDWIDTH_UNITS:
            raise ValueError(
                f"{text!r} is not a bandwidth; expected a number and a unit "
                "(bps, Kbps, Mbps, Gbps), e.g. '100Mbps'"
            )
        number = float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2).lower()]
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is too large to be a bandwidth")
        rate = int(number)
        if rate <= 0:
            raise ValueError(f"{text!r} is not a positive bandwidth; it must be above zero")
        return cls(bits_per_second=rate, text=text)
