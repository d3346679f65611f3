"""The exception tree: pickling with the declared fields, exit codes, the refusal base."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import cloudpickle
import pytest

from toka import errors
from toka.errors import (
    ApprovalDenied,
    BudgetExceededError,
    CommandRefused,
    ConfigError,
    GraphError,
    LimitRefused,
    PathRefused,
    Problem,
    Refusal,
    RunFailedError,
    SandboxRefused,
    SandboxViolation,
    SpecError,
    TokaError,
    ToolError,
    ToolTimeoutError,
    TransientModelError,
)
from toka.model import Usage

ERROR_CLASSES = sorted(
    (c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, TokaError)),
    key=lambda c: c.__name__,
)
USAGE = Usage(input_tokens=7, output_tokens=3, requests=1)


def make(cls: type[TokaError]) -> TokaError:
    """One instance of ``cls`` with every positional field set."""
    message = f"{cls.__name__}: 'x' went wrong"
    if issubclass(cls, SandboxViolation):
        return cls(message, ["a/.git/hooks/pre-commit"])
    if issubclass(cls, BudgetExceededError):
        return cls(message, "agent")
    if issubclass(cls, RunFailedError):
        return cls(message, {"agent": "a", "tasks": 3})
    return cls(message)


def test_every_class_is_exported() -> None:
    assert {c.__name__ for c in ERROR_CLASSES} == set(errors.__all__) - {"Problem"}


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_fields(cls: type[TokaError], dumps: Callable[[object], bytes]) -> None:
    error = make(cls)
    # Set on an existing error, the way the step loop and the Prefect task do.
    error.usage = USAGE
    error.attempt = 2
    back = pickle.loads(dumps(error))
    assert type(back) is cls
    assert back.args == error.args
    assert str(back) == str(error)
    assert back.problems == error.problems
    assert (back.usage, back.attempt) == (USAGE, 2)
    assert vars(back) == vars(error)


def test_fields_default_to_none_and_can_be_given_at_construction() -> None:
    assert (TokaError("x").usage, TokaError("x").attempt) == (None, None)
    error = BudgetExceededError("spent", "task", usage=USAGE, attempt=3)
    assert (error.scope, error.usage, error.attempt) == ("task", USAGE, 3)
    back = pickle.loads(pickle.dumps(error))
    assert (back.scope, back.usage, back.attempt) == ("task", USAGE, 3)


def test_tool_timeout_carries_the_command_usage() -> None:
    error = ToolTimeoutError("'sleep 9' ran past its 1s timeout", command_usage={"wall_s": 1.0})
    assert error.command_usage == {"wall_s": 1.0}
    assert ToolTimeoutError("t").command_usage is None
    back = pickle.loads(pickle.dumps(error))
    assert back.command_usage == {"wall_s": 1.0} and back.retryable


def test_transient_error_carries_retry_after() -> None:
    error = TransientModelError("429", retry_after=1.5)
    assert pickle.loads(pickle.dumps(error)).retry_after == 1.5
    assert TransientModelError("529").retry_after is None


def test_problems_survive_pickling() -> None:
    error = SpecError([Problem("bad", source="a.yaml", line=3, field="metadata.name")])
    assert str(pickle.loads(pickle.dumps(error))) == "a.yaml:3: metadata.name: bad"


# -- exit codes ----------------------------------------------------------------------------


BAD_INPUT = (SpecError, GraphError, ConfigError)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_exit_code_is_2_for_bad_input_and_1_for_everything_else(cls: type[TokaError]) -> None:
    assert cls.exit_code == (2 if issubclass(cls, BAD_INPUT) else 1)
    assert make(cls).exit_code == cls.exit_code


def test_bad_input_classes_and_their_subclasses() -> None:
    assert {c.__name__ for c in ERROR_CLASSES if c.exit_code == 2} == {
        "ConfigError", "DependencyCycleError", "DuplicateAgentError", "GraphError", "SpecError", "UnknownAgentError",
    }


# -- refusals ------------------------------------------------------------------------------


REFUSALS = (CommandRefused, ApprovalDenied, SandboxRefused, PathRefused, LimitRefused)


@pytest.mark.parametrize("cls", REFUSALS, ids=lambda c: c.__name__)
def test_refusals_share_one_base_and_are_never_retried(cls: type[Refusal]) -> None:
    assert issubclass(cls, Refusal) and issubclass(cls, ToolError)
    assert cls.retryable is False and cls.fatal is False
    assert "decision, not a failure" in (Refusal.__doc__ or "")


def test_the_old_import_paths_name_the_same_classes() -> None:
    from toka.commands import CommandRefused as FromCommands
    from toka.policy import ApprovalDenied as FromPolicy
    from toka.sandbox import SandboxRefused as FromSandbox
    from toka.workspace import PathRefused as FromWorkspace

    assert (FromCommands, FromPolicy, FromSandbox, FromWorkspace) == REFUSALS[:4]


def test_a_sandbox_violation_is_not_a_refusal() -> None:
    # It is found after the command ran, undone, and stops the run instead of going back to the model.
    assert not issubclass(SandboxViolation, Refusal)
    assert SandboxViolation.fatal is True
    assert {c for c in ERROR_CLASSES if issubclass(c, Refusal)} == {Refusal, *REFUSALS}


def test_the_tree_in_the_docstring_names_every_class() -> None:
    doc = errors.__doc__ or ""
    missing = [c.__name__ for c in ERROR_CLASSES if c.__name__ not in doc]
    assert not missing
