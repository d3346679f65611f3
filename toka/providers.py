"""Choosing and building the model for a run from its settings and the environment."""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .config import ProviderSettings
from .context import context_window
from .errors import ConfigError
from .limits import LimitSettings, RequestLimiter
from .model import Model, current_model_override
from .offline import OfflineModel
from .redact import remember_secret

__all__ = ["ModelChoice", "choose_model", "describe_choice", "get_model"]


@dataclass(frozen=True)
class ModelChoice:
    provider: Literal["override", "offline", "anthropic"]
    model: str
    why: str

    @property
    def offline(self) -> bool:
        return self.provider == "offline"


def choose_model(settings: ProviderSettings, *, env: Mapping[str, str] | None = None) -> ModelChoice:
    """Which model ``settings`` choose, without building it.

    An override set in this context wins; ``offline`` is the offline model;
    ``auto`` is Anthropic's default model when a key is available (the
    ``ANTHROPIC_API_KEY`` variable or a Secret block named in the settings), the
    offline model otherwise; anything else is an Anthropic model id.
    """
    override = current_model_override()
    if override is not None:
        return ModelChoice("override", override.name, "set by override_model()")
    env = os.environ if env is None else env
    has_key = bool(env.get("ANTHROPIC_API_KEY") or settings.api_key_secret)
    if settings.model == "offline":
        return ModelChoice("offline", "offline", "--model offline")
    if settings.model == "auto" and not has_key:
        return ModelChoice("offline", "offline", "no ANTHROPIC_API_KEY set")
    from .claude import default_model

    name = default_model() if settings.model == "auto" else settings.model
    if not has_key:
        raise ConfigError(
            f"model {name!r} needs an Anthropic API key: set ANTHROPIC_API_KEY, name a Prefect "
            "Secret block with --api-key-secret, or use --model offline"
        )
    source = f"Secret block {settings.api_key_secret!r}" if settings.api_key_secret else "ANTHROPIC_API_KEY"
    return ModelChoice("anthropic", name, f"key from {source}")


def describe_choice(choice: ModelChoice) -> str:
    """One line telling the user which model runs and why."""
    if choice.offline:
        return (
            f"model: offline ({choice.why}): deterministic placeholder results, no network, "
            "no language model involved"
        )
    return f"model: {choice.model} ({choice.provider}, {choice.why})"


# One model per event loop and settings: the in-process request cap and the
# HTTP connection pool must be shared by every task of the process, and async
# clients cannot outlive the loop they were made on.
_built: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[object, ...], Model]] = (
    weakref.WeakKeyDictionary()
)


async def get_model(settings: ProviderSettings, *, env: Mapping[str, str] | None = None) -> Model:
    """The model instance for ``settings`` (built once per event loop and settings)."""
    override = current_model_override()
    if override is not None:
        return override
    env = os.environ if env is None else env
    choice = choose_model(settings, env=env)
    if choice.offline:
        return _offline(env)
    key = (choice.model, settings.api_key_secret, settings.request_timeout, settings.max_tokens, settings.temperature,
           settings.max_attempts, settings.max_retry_wait, settings.requests_per_minute, settings.concurrent_requests,
           settings.in_process_requests, settings.context_management, settings.context_window,
           settings.context_threshold, env.get("ANTHROPIC_BASE_URL"))
    per_loop = _built.setdefault(asyncio.get_running_loop(), {})
    if key not in per_loop:
        from .claude import AnthropicModel

        limits = LimitSettings(settings.requests_per_minute, settings.concurrent_requests, settings.in_process_requests)
        per_loop[key] = AnthropicModel(
            choice.model,
            api_key=await _api_key(settings, env),
            base_url=env.get("ANTHROPIC_BASE_URL") or None,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            request_timeout=settings.request_timeout,
            max_attempts=settings.max_attempts,
            max_retry_wait=settings.max_retry_wait,
            limiter=RequestLimiter(limits) if (limits.uses_server or limits.in_process) else None,
            context_edit_trigger=int(settings.context_threshold * context_window(
                choice.model, settings.context_window)) if settings.context_management == "server" else None,
        )
    return per_loop[key]


def _offline(env: Mapping[str, str]) -> OfflineModel:
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


async def _api_key(settings: ProviderSettings, env: Mapping[str, str]) -> str:
    if settings.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            block = await Secret.aload(settings.api_key_secret)
        except ValueError:
            raise ConfigError(f"no Prefect Secret block named {settings.api_key_secret!r}") from None
        key = str(block.get())
        remember_secret(key)  # not in the environment, so redaction must be told
        return key
    return env["ANTHROPIC_API_KEY"]
