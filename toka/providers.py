"""Choosing the model for a run from its name and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import ConfigError
from .model import Model, current_model_override
from .offline import OfflineModel

__all__ = ["describe_choice", "resolve_model"]


def resolve_model(name: str = "auto", *, env: Mapping[str, str] | None = None) -> Model:
    """The model for ``name``: an override set in this context wins, then

    - ``offline``: the deterministic offline model;
    - ``auto``: the offline model when ``ANTHROPIC_API_KEY`` is not set.

    ``TOKA_OFFLINE_LATENCY`` (seconds), ``TOKA_OFFLINE_REQUEST_LOG`` (a file)
    and ``TOKA_OFFLINE_FAULTS`` (a file of ``agent:task`` lines) configure the
    offline model for benchmarks, tests and fault drills.
    """
    override = current_model_override()
    if override is not None:
        return override
    env = os.environ if env is None else env
    if name == "offline" or (name == "auto" and not env.get("ANTHROPIC_API_KEY")):
        try:
            latency = float(env.get("TOKA_OFFLINE_LATENCY", "0") or 0)
        except ValueError:
            raise ConfigError(
                f"TOKA_OFFLINE_LATENCY={env['TOKA_OFFLINE_LATENCY']!r} is not a number of seconds"
            ) from None
        return OfflineModel(
            latency=latency,
            request_log=env.get("TOKA_OFFLINE_REQUEST_LOG") or None,
            faults_file=env.get("TOKA_OFFLINE_FAULTS") or None,
        )
    raise ConfigError(
        f"model {name!r} needs the Anthropic provider, which this version does not include; "
        "use --model offline"
    )


def describe_choice(model: Model, requested: str) -> str:
    """One line telling the user which model runs and why."""
    if model.offline and model.name == "offline":
        why = "no ANTHROPIC_API_KEY set" if requested == "auto" else "--model offline"
        return (
            f"model: offline ({why}): deterministic placeholder results, no network, "
            "no language model involved"
        )
    return f"model: {model.name}"
