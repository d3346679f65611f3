"""The run settings are declared once (toka.config) and reach every place a run is configured:
the flows' parameters (the Prefect UI form), ``toka run``'s options, and the resolved RunConfig."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.agent import agent
from flows.pipeline import pipeline
from toka import cli
from toka.config import GROUPS, Approvals, Limits, ProviderSettings, RunConfig, RunOptions, grouped, settings
from toka.errors import ConfigError
from toka.pipeline import pipeline_flow

from .conftest import AGENT_SPECS

#: RunConfig fields that are not settings a person gives: resolved by the pipeline.
RESOLVED = {"retries", "pause_for_approval", "checkout"}

#: A valid value other than the default, per setting, and how to write it on the command line.
SAMPLES: dict[str, tuple[Any, list[str]]] = {
    "run_key": ("nightly-7", ["nightly-7"]),
    "contexts": (("publish",), ["publish"]),  # a context an agent of agent_specs/ has tasks for
    "max_concurrency": (2, ["2"]),
    "base": ("release-1.2", ["release-1.2"]),
    "include_uncommitted": (True, []),
    "in_place": (True, []),
    "push": ("origin", ["origin"]),
    "result_storage": ("local-file-system/shared", ["local-file-system/shared"]),
    "model": ("offline", ["offline"]),
    "max_tokens": (512, ["512"]),
    "temperature": (0.5, ["0.5"]),
    "request_timeout": (30.0, ["30"]),
    "max_attempts": (3, ["3"]),
    "max_retry_wait": (5.0, ["5"]),
    "api_key_secret": ("anthropic-key", ["anthropic-key"]),
    "requests_per_minute": (50, ["50"]),
    "concurrent_requests": (3, ["3"]),
    "in_process_requests": (2, ["2"]),
    "context_window": (40_000, ["40000"]),
    "context_management": ("off", ["off"]),
    "context_threshold": (0.5, ["0.5"]),
    "tool_output_limit": (4096, ["4096"]),
    "max_turns": (7, ["7"]),
    "task_timeout": (90.0, ["90"]),
    "retry_delay_seconds": (1.5, ["1.5"]),
    "task_token_budget": (1000, ["1000"]),
    "agent_token_budget": (2000, ["2000"]),
    "pipeline_token_budget": (3000, ["3000"]),
    "allow_unsandboxed": (True, []),
    "approve": (("git-push",), ["git-push"]),
    "deny": (("network-access",), ["network-access"]),
    "needs_approval": (("git-push", "network-access"), ["git-push", "network-access"]),
}


def test_every_setting_lives_in_exactly_one_group() -> None:
    names = [s.name for s in settings()]
    assert len(names) == len(set(names)), "a setting name is used by two groups"
    assert set(RunConfig.model_fields) == set(RunOptions.model_fields) | set(GROUPS) - {"run"} | RESOLVED


@pytest.mark.parametrize("fl", [pipeline, pipeline_flow, agent], ids=["pipeline", "pipeline_flow", "agent"])
def test_flows_take_the_groups_not_loose_settings(fl: Any) -> None:
    """A setting added as a loose flow parameter (in one place only) fails here; ``toka run``'s flow
    has the deployment entrypoint's parameters."""
    params = inspect.signature(fl.fn).parameters
    own = {"agent", "specs"} if fl is agent else {"specs", "agents"}
    assert fl.name == ("toka-agent" if fl is agent else "toka-pipeline")
    assert set(params) == own | set(GROUPS)
    for group, model in GROUPS.items():
        assert params[group].annotation in (model, model.__name__), group
        assert params[group].default == model()


def test_every_setting_has_a_command_line_option_or_says_why_not() -> None:
    import typer.main

    command = typer.main.get_command(cli.app).commands["run"]  # type: ignore[attr-defined]
    flags = {opt for param in command.params for opt in param.opts}
    for setting in settings():
        assert (setting.flag in flags) != bool(setting.cli.skip), setting.name
        assert setting.field.description, f"{setting.name}: no description (UI form and --help use it)"
    assert set(SAMPLES) == {s.name for s in settings() if not s.cli.skip} - {"workspace"}


def test_every_option_reaches_its_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``toka run`` option lands in its group of the RunConfig the pipeline gets."""
    seen: list[RunConfig] = []

    def capture(plan: Any, config: RunConfig) -> Any:  # the last step before the run starts
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_settle_approvals", capture)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKA_MODEL", raising=False)
    args = [str(AGENT_SPECS), "--workspace", str(tmp_path)]
    for setting in settings():
        if setting.name in SAMPLES:
            _, words = SAMPLES[setting.name]
            args += [setting.flag] if not words else [part for w in words for part in (setting.flag, w)]
    result = CliRunner().invoke(cli.app, ["run", *args])
    assert seen, result.output
    config = seen[0]
    for setting in settings():
        if setting.name in SAMPLES:
            group = config if setting.group == "run" else getattr(config, setting.group)
            assert getattr(group, setting.name) == SAMPLES[setting.name][0], setting.name
    assert config.workspace == str(tmp_path)


def test_bad_values_name_their_group_and_field() -> None:
    with pytest.raises(ConfigError) as e:
        grouped({"max_turns": 0, "temperature": 3, "approve": ["rm-rf"]})
    text = str(e.value)
    assert "limits.max_turns: 0: input should be greater than or equal to 1" in text
    assert "provider.temperature: 3" in text and "approvals.approve: 'rm-rf'" in text
    with pytest.raises(ConfigError, match="unknown run setting 'max_turn'"):
        grouped({"max_turn": 3})


@pytest.mark.parametrize("key", ["night 1", "a/b", "a..b", "-x", "x.", "x.lock", "nuit-é", "k" * 101])
def test_a_run_key_that_git_or_a_file_name_would_change_is_refused(key: str) -> None:
    # "night 1" and "night-1" would share toka/night-1/... and each other's records.
    with pytest.raises(ConfigError, match=r"run\.run_key: .*not a run key: letters, digits"):
        grouped({"run_key": key})
    with pytest.raises((ConfigError, ValueError), match="not a run key"):
        RunConfig.from_flat({"run_key": key})


def test_a_blank_run_key_from_a_form_is_no_key() -> None:
    assert RunOptions(run_key="").run_key is None  # the flow run's id, as for None
    with pytest.raises((ConfigError, ValueError), match="run_key"):  # resolved settings always have one
        RunConfig.from_flat({"run_key": ""})


@pytest.mark.parametrize("key", ["night-1", "nightly_2026.12.02", "0b5e6c2d-1f7a-4c3e-9d2b-5a6f7e8d9c0b", "k" * 100])
def test_run_keys_git_and_file_names_take_as_they_are_pass(key: str) -> None:
    assert RunConfig.from_flat({"run_key": key}).run_key == key


def test_groups_are_what_the_flows_get() -> None:
    groups = grouped({"max_turns": 3, "model": "offline", "run_key": "k"})
    assert groups["limits"] == Limits(max_turns=3) and groups["provider"] == ProviderSettings(model="offline")
    config = RunConfig.from_flat({"max_turns": 3, "run_key": "k"})
    assert config.limits.max_turns == 3 and config.approvals == Approvals() and config.run_key == "k"
