"""The four unit types: what they accept, the number each text means, and what they refuse."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from toka.units import Bandwidth, ByteSize, CpuShare, Duration

KB, MB, GB, TB = 1024, 1024**2, 1024**3, 1024**4

# (type, text, number attribute, expected number)
VALID: list[tuple[type, Any, str, float]] = [
    # durations, in seconds
    (Duration, "30s", "seconds", 30),
    (Duration, "45m", "seconds", 2700),
    (Duration, "2h", "seconds", 7200),
    (Duration, "1d", "seconds", 86400),
    (Duration, "1w", "seconds", 604800),
    (Duration, "366d", "seconds", 366 * 86400),  # the longest a spec may give
    (Duration, "1h30m", "seconds", 5400),
    (Duration, "1h 30m", "seconds", 5400),
    (Duration, "1d2h3m4s", "seconds", 86400 + 7200 + 180 + 4),
    (Duration, "1.5h", "seconds", 5400),
    (Duration, "500ms", "seconds", 0.5),
    (Duration, "2H", "seconds", 7200),
    (Duration, "90 m", "seconds", 5400),
    # sizes, in bytes (binary multiples)
    (ByteSize, "512KB", "bytes", 524288),
    (ByteSize, "256MB", "bytes", 268435456),
    (ByteSize, "1GB", "bytes", 1073741824),
    (ByteSize, "1TB", "bytes", TB),
    (ByteSize, "100B", "bytes", 100),
    (ByteSize, "1.5GB", "bytes", 1610612736),
    (ByteSize, "512 MB", "bytes", 512 * MB),
    (ByteSize, "1gb", "bytes", GB),
    (ByteSize, "2KiB", "bytes", 2 * KB),
    (ByteSize, "1MiB", "bytes", MB),
    (ByteSize, "4G", "bytes", 4 * GB),
    (ByteSize, "64k", "bytes", 64 * KB),
    (ByteSize, "512Mi", "bytes", 512 * MB),  # Kubernetes' spelling
    (ByteSize, "2Gi", "bytes", 2 * GB),
    (ByteSize, "1024TB", "bytes", 1024 * TB),
    # CPU shares, in percent
    (CpuShare, "75%", "percent", 75.0),
    (CpuShare, "1%", "percent", 1.0),
    (CpuShare, "100%", "percent", 100.0),
    (CpuShare, "12.5%", "percent", 12.5),
    (CpuShare, "50 %", "percent", 50.0),
    # bandwidth, in bits per second (decimal multiples)
    (Bandwidth, "100Mbps", "bits_per_second", 100_000_000),
    (Bandwidth, "1Gbps", "bits_per_second", 1_000_000_000),
    (Bandwidth, "10Kbps", "bits_per_second", 10_000),
    (Bandwidth, "500bps", "bits_per_second", 500),
    (Bandwidth, "1.5Mbps", "bits_per_second", 1_500_000),
    (Bandwidth, "100mbps", "bits_per_second", 100_000_000),
    (Bandwidth, "25 Mbps", "bits_per_second", 25_000_000),
]


def _id(kind: type, value: Any) -> str:
    return f"{kind.__name__}-{value!r}"


@pytest.mark.parametrize(
    ("kind", "text", "attr", "number"),
    [pytest.param(*row, id=_id(row[0], row[1])) for row in VALID],
)
def test_valid_value_and_its_number(kind: type, text: str, attr: str, number: float) -> None:
    value = kind.parse(text)
    assert isinstance(value, kind)
    assert getattr(value, attr) == pytest.approx(number)
    assert str(value) == text  # the text the user wrote comes back unchanged
    assert kind.parse(str(value)) == value


@pytest.mark.parametrize(
    ("kind", "text"),
    [pytest.param(row[0], row[1], id=_id(row[0], row[1])) for row in VALID],
)
def test_valid_text_matches_the_json_schema_pattern(kind: type, text: str) -> None:
    """Editors validating against the JSON schema must not flag what the loader accepts."""
    assert re.match(kind._json_pattern, text), (kind._json_pattern, text)


@pytest.mark.parametrize(
    ("kind", "example"),
    [(Duration, "2h"), (ByteSize, "256MB"), (CpuShare, "75%"), (Bandwidth, "100Mbps")],
    ids=lambda v: v.__name__ if isinstance(v, type) else v,
)
def test_json_schema_examples_parse(kind: type, example: str) -> None:
    for text in kind._examples:
        assert str(kind.parse(text)) == text
    kind.parse(example)


def test_surrounding_whitespace_is_trimmed() -> None:
    assert Duration.parse(" 2h ") == Duration(seconds=7200, text="2h")
    assert str(ByteSize.parse("\t1GB\n")) == "1GB"


def test_cpu_fraction() -> None:
    assert CpuShare.parse("75%").fraction == 0.75
    assert CpuShare.parse("100%").fraction == 1.0


def test_values_are_frozen_and_comparable() -> None:
    value = Duration.parse("2h")
    assert value == Duration.parse("2h")
    assert hash(value) == hash(Duration.parse("2h"))
    assert Duration.parse("2h") != Duration.parse("120m")  # the text is part of the value
    with pytest.raises(AttributeError):
        value.seconds = 1  # type: ignore[misc]


_DURATION_SYNTAX = r"is not a duration; expected a number and a unit \(ms, s, m, h, d, w\), e\.g\. '30s', '45m', '2h', '1d'$"
_SIZE_SYNTAX = (r"is not a size; expected a number and a unit \(B, KB, MB, GB, TB, or KiB, Mi, G\.\.\.\), "
                r"e\.g\. '512KB', '256MB', '1GB'$")
_CPU = r"is not a percentage between 1% and 100%$"
_BANDWIDTH_SYNTAX = r"is not a bandwidth; expected a number and a unit \(bps, Kbps, Mbps, Gbps\), e\.g\. '100Mbps'$"

# (type, bad input, regex the whole message must match)
INVALID: list[tuple[type, Any, str]] = [
    (Duration, "0s", r"^'0s' is not a positive duration; it must be longer than zero$"),
    (Duration, "0h0m", r"^'0h0m' is not a positive duration"),
    (Duration, "forever", rf"^'forever' {_DURATION_SYNTAX}"),
    (Duration, "", rf"^'' {_DURATION_SYNTAX}"),
    (Duration, "-5m", r"^'-5m' must be positive"),
    (Duration, -5, r"^'-5' must be positive"),
    (Duration, "0", r"^'0' must be positive"),
    (Duration, "5 minutes", rf"^'5 minutes' {_DURATION_SYNTAX}"),
    (Duration, "1y", rf"^'1y' {_DURATION_SYNTAX}"),
    (Duration, "h", rf"^'h' {_DURATION_SYNTAX}"),
    (Duration, "2h-", rf"^'2h-' {_DURATION_SYNTAX}"),
    (Duration, True, r"^true is not a duration \(write it like '2h'\)$"),
    (Duration, None, r"^null is not a duration \(write it like '2h'\)$"),
    (Duration, ["2h"], r"^\[2h\] is not a duration \(write it like '2h'\)$"),
    (Duration, "99999999999999999999h", r"^'99999999999999999999h' is too large to be a duration: at most 366 days"),
    (Duration, "367d", r"^'367d' is too large to be a duration: at most 366 days \(e\.g\. '52w'\)$"),
    (Duration, "9" * 400, r"is too large to be a duration"),
    (ByteSize, "1025TB", r"^'1025TB' is too large to be a size: at most 1024 TB$"),
    (ByteSize, "999999999999999999999TB", r"is too large to be a size"),
    (ByteSize, "lots", rf"^'lots' {_SIZE_SYNTAX}"),
    (ByteSize, "0MB", r"^'0MB' is not a positive size; it must be larger than zero$"),
    (ByteSize, "0.0001KB", r"^'0.0001KB' is not a positive size"),  # rounds down to 0 bytes
    (ByteSize, "-1GB", r"^'-1GB' must be positive"),
    (ByteSize, "1XB", rf"^'1XB' {_SIZE_SYNTAX}"),
    (ByteSize, "1PB", rf"^'1PB' {_SIZE_SYNTAX}"),
    (ByteSize, "MB", rf"^'MB' {_SIZE_SYNTAX}"),
    (ByteSize, "512", rf"^'512' {_SIZE_SYNTAX}"),
    (ByteSize, 512, rf"^'512' {_SIZE_SYNTAX}"),
    (ByteSize, "1 GB RAM", rf"^'1 GB RAM' {_SIZE_SYNTAX}"),
    (ByteSize, False, r"^false is not a size \(write it like '256MB'\)$"),
    (ByteSize, {"mb": 1}, r"^\{mb: 1\} is not a size \(write it like '256MB'\)$"),
    (CpuShare, "150%", rf"^'150%' {_CPU}"),
    (CpuShare, "0%", rf"^'0%' {_CPU}"),
    (CpuShare, "0.5%", rf"^'0.5%' {_CPU}"),
    (CpuShare, "100.1%", rf"^'100.1%' {_CPU}"),
    (CpuShare, "-5%", rf"^'-5%' {_CPU}"),
    (CpuShare, "fast", rf"^'fast' {_CPU}"),
    (CpuShare, 0.75, rf"^'0.75' {_CPU}"),
    (CpuShare, "%", rf"^'%' {_CPU}"),
    (CpuShare, True, r"^true is not a percentage between 1% and 100% \(write it like '75%'\)$"),
    (CpuShare, None, r"^null is not a percentage between 1% and 100% \(write it like '75%'\)$"),
    (Bandwidth, "fast", rf"^'fast' {_BANDWIDTH_SYNTAX}"),
    (Bandwidth, "100MB", rf"^'100MB' {_BANDWIDTH_SYNTAX}"),
    (Bandwidth, "100MB/s", rf"^'100MB/s' {_BANDWIDTH_SYNTAX}"),
    (Bandwidth, "1Tbps", rf"^'1Tbps' {_BANDWIDTH_SYNTAX}"),
    (Bandwidth, "-1Mbps", rf"^'-1Mbps' {_BANDWIDTH_SYNTAX}"),
    (Bandwidth, "100", rf"^'100' {_BANDWIDTH_SYNTAX}"),
    (Bandwidth, "0Mbps", r"^'0Mbps' is not a positive bandwidth; it must be above zero$"),
    (Bandwidth, "0.1bps", r"^'0.1bps' is not a positive bandwidth"),  # rounds down to 0 bit/s
    (Bandwidth, True, r"^true is not a bandwidth \(write it like '100Mbps'\)$"),
    (Bandwidth, None, r"^null is not a bandwidth \(write it like '100Mbps'\)$"),
]


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [pytest.param(*row, id=_id(row[0], row[1])) for row in INVALID],
)
def test_invalid_value_message(kind: type, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kind.parse(value)


@pytest.mark.parametrize(
    ("kind", "value", "text", "number"),
    [(Duration, 1200, "1200s", 1200.0), (Duration, "90", "90s", 90.0), (Duration, 1.5, "1.5s", 1.5),
     (CpuShare, 50, "50%", 50.0), (CpuShare, "75", "75%", 75.0)],
)
def test_a_bare_number_is_read_in_the_usual_unit_with_a_note(kind: type, value: Any, text: str,
                                                               number: float) -> None:
    parsed = kind.parse(value)
    assert str(parsed) == text and (parsed.seconds if kind is Duration else parsed.percent) == number
    assert parsed.guessed is not None and "has no unit" in parsed.guessed
    assert parsed == kind.parse(text) and kind.parse(text).guessed is None


class _Limits(BaseModel):
    timeout: Duration
    max_memory: ByteSize | None = None
    max_cpu: CpuShare | None = None
    max_network_bandwidth: Bandwidth | None = None


class TestPydanticIntegration:
    def test_validates_and_serialises_back_to_text(self) -> None:
        limits = _Limits.model_validate(
            {"timeout": "1h30m", "max_memory": "1GB", "max_cpu": "75%", "max_network_bandwidth": "100Mbps"}
        )
        assert limits.timeout.seconds == 5400
        assert limits.max_memory == ByteSize(bytes=GB, text="1GB")
        assert limits.model_dump(mode="json") == {
            "timeout": "1h30m",
            "max_memory": "1GB",
            "max_cpu": "75%",
            "max_network_bandwidth": "100Mbps",
        }

    def test_accepts_an_already_parsed_value(self) -> None:
        duration = Duration.parse("2h")
        assert _Limits(timeout=duration).timeout is duration

    def test_error_is_the_plain_message(self) -> None:
        with pytest.raises(ValidationError) as info:
            _Limits.model_validate({"timeout": "0s", "max_cpu": "150%"})
        errors = {e["loc"]: (e["type"], e["msg"]) for e in info.value.errors()}
        assert errors == {
            ("timeout",): ("unit", "'0s' is not a positive duration; it must be longer than zero"),
            ("max_cpu",): ("unit", "'150%' is not a percentage between 1% and 100%"),
        }

    def test_json_schema_is_a_patterned_string(self) -> None:
        props = _Limits.model_json_schema()["properties"]
        assert props["timeout"]["type"] == "string"
        assert props["timeout"]["pattern"] == Duration._json_pattern
        assert props["timeout"]["examples"] == ["30s", "45m", "2h", "1d"]


@pytest.mark.parametrize("kind", [ByteSize, Bandwidth], ids=lambda k: k.__name__)
def test_huge_number_is_a_value_error(kind: type) -> None:
    unit = "MB" if kind is ByteSize else "Mbps"
    with pytest.raises(ValueError):
        kind.parse("9" * 400 + unit)
