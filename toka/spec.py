"""The agent spec: pydantic models for Toka's YAML format, as written in the wild.

Real files use several shapes for the same thing (three for
``dependencies``, two for ``reporting.metrics``); each is normalised into
one internal shape here, at the edge, once. Known blocks reject unknown keys
(a typo such as ``timout`` must not silently drop a limit); unknown
*top-level* blocks are domain context and are kept, in order, for the agent.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
import reprlib
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from .errors import Problem, SpecError, has_control
from .redact import REDACTED, looks_like_token
from .units import Bandwidth, ByteSize, CpuShare, Duration, as_written
from .yaml_source import (
    MAX_PROBLEMS,
    MAX_TASKS,
    WrittenFloat,
    WrittenInt,
    YamlSource,
    load_yaml,
    read_spec_text,
)

__all__ = [
    "PRIORITIES",
    "AgentSpec",
    "Budget",
    "Capabilities",
    "Dependencies",
    "Metadata",
    "Metric",
    "Objective",
    "Priority",
    "Reporting",
    "ResourceLimits",
    "Risk",
    "RiskMitigation",
    "Security",
    "SpecInfo",
    "Task",
    "Tasks",
    "read_spec_text",
]

Priority = Literal["critical", "high", "medium", "low"]
#: Priorities from most to least urgent; the index is the sort key.
PRIORITIES: tuple[Priority, ...] = ("critical", "high", "medium", "low")


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


#: A priority as written: ``Critical`` and ``HIGH`` mean what they say.
PriorityText = Annotated[Priority, BeforeValidator(_lower, json_schema_input_type=str)]


def _when(value: Any) -> date | datetime:
    # A YAML timestamp arrives as a date or datetime, a quoted one as text: both say when.
    if isinstance(value, (date, datetime)):
        return value
    if isinstance(value, str):
        text = value.strip()
        for parse in (date.fromisoformat, datetime.fromisoformat):
            try:
                return parse(text)
            except ValueError:
                continue
    raise PydanticCustomError("date_parsing", "not a date")


#: A date, or an ISO 8601 date-time (``2025-07-06T03:24:55+00:00``, ``2026-03-02T10:15:00Z``).
When = Annotated[
    date | datetime,
    PlainValidator(_when),
    PlainSerializer(lambda v: v.isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "description": "A date (YYYY-MM-DD) or an ISO 8601 date-time."}),
]


@functools.cache
def _takes_text(model: type[BaseModel], name: Any) -> bool:
    field = model.model_fields.get(name) if isinstance(name, str) else None
    if field is None:
        return False
    kinds = set(get_args(field.annotation)) or {field.annotation}
    return str in kinds or any(get_origin(k) is Annotated and get_args(k)[0] is str for k in kinds)


def _date_as_text(value: Any) -> Any:
    # `version: 2025-07-04` unquoted is a YAML date; the version is what was written.
    return value.isoformat() if isinstance(value, (date, datetime)) else value


#: Text that may be written as an unquoted date (a version named for its day).
VersionText = Annotated[str, BeforeValidator(_date_as_text, json_schema_input_type=str)]

Frequency = Literal[
    "real-time", "hourly", "daily", "weekly", "on-milestone", "on-completion", "continuous"
]

def _not_blank(value: str) -> str:
    if value and not value.strip():
        raise ValueError("must not be blank (only spaces)")
    return value


NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]


#: A YAML 1.1 octal integer (``010``, ``-0_17``): a decimal number, or text, in YAML 1.2.
_LEADING_ZERO = re.compile(r"[-+]?0[0-7_]+")


def _yaml_1_2_int(text: str) -> int | None:
    """The decimal integer YAML 1.2 (core schema) reads from ``text``, if it reads one."""
    return int(text) if re.fullmatch(r"[-+]?[0-9]+", text) else None


class _Block(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        coerce_numbers_to_str=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _numbers_as_written(cls, data: Any) -> Any:
        """A number where text is expected is the text as written: ``version: 1.10`` is '1.10' (a
        :class:`toka.yaml_source.WrittenFloat` keeps what YAML read as 1.1)."""
        # Every float, not only those read from YAML: a spec given as data says the same.
        if not isinstance(data, dict) or not any(isinstance(v, float) for v in data.values()):
            return data
        return {k: str(v) if isinstance(v, float) and _takes_text(cls, k) else v for k, v in data.items()}

    @field_validator("*", mode="before")
    @classmethod
    def _integers_as_yaml_reads_them(cls, value: Any, info: ValidationInfo) -> Any:
        """An integer YAML 1.1 reads from ``0x1f``, ``1_000``, ``+5`` or ``010`` is its text where a field
        takes text (``str()`` gives it), and where a number is meant the number YAML 1.1 reads (YAML 1.2
        reads hex the same, and ``1_000`` as nothing else); but ``010`` is 8 in YAML 1.1 and 10 in YAML
        1.2, so it is refused (which was meant is a guess)."""
        if not isinstance(value, WrittenInt) or info.field_name is None or _takes_text(cls, info.field_name):
            return value
        decimal = _yaml_1_2_int(value.text)
        if _LEADING_ZERO.fullmatch(value.text) and decimal != int(value):
            other = "as text" if decimal is None else f"as {decimal}"
            raise PydanticCustomError("octal", f"{value.text!r} has a leading zero: YAML 1.1 reads it as the octal "
                                      f"number {int(value)}, YAML 1.2 {other} (which was meant is a guess); write "
                                      "it in decimal digits without the leading zero")
        # A plain int from here on: a unit's parser (a timeout's seconds) reads str(), the text.
        return int(value)


class _Open(_Block):
    """A block that keeps fields the runtime does not read: shown to the agent, listed as warnings.

    Toka's own files add fields freely (a risk's ``owner``, a report's ``format``). In the
    blocks whose fields the runtime acts on (metadata, security, tasks), one that looks like a
    misspelling of a missing field is still an error (:func:`_misspelt_fields`): its value would
    otherwise be lost quietly; elsewhere its warning names the field it may have meant.
    """

    model_config = ConfigDict(extra="allow")


def _single_key_maps_to_dict(value: Any, what: str) -> Any:
    """``[{a: x}, {b: y}]`` -> ``{a: x, b: y}``; other shapes pass through.

    ``None`` (a key written with nothing after it) means empty, and a list of
    bare names is accepted with empty reasons.
    """
    if value is None:
        return {}
    if not isinstance(value, list):
        return value
    merged: dict[Any, Any] = {}
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {item: ""}
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(
                f"item {i} is {_shown(item)}; each {what} entry must be one "
                "'name: reason' pair (or write a plain map 'name: reason')"
            )
        ((name, reason),) = item.items()
        if name in merged:
            raise ValueError(f"{name!r} is listed twice")
        merged[name] = reason
    return merged


def _normalise_deps(value: Any) -> Any:
    value = _single_key_maps_to_dict(value, "dependency")
    if isinstance(value, dict):
        return {k: "" if v is None else v for k, v in value.items()}
    return value


DependencyMap = Annotated[
    dict[str, str],
    BeforeValidator(
        _normalise_deps,
        json_schema_input_type=dict[str, str | None] | list[dict[str, str | None] | str] | None,
    ),
]


class Metadata(_Open):
    """Identity and provenance of the agent."""

    name: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=63)
    """Kebab-case id, unique across a set of specs; names the Prefect flow."""
    version: VersionText | None = None
    """Spec version, e.g. ``v0.3.0`` (or a date)."""
    created: When | None = None
    """Date (or date-time) the spec was written."""
    modified: When | None = None
    """Date (or date-time) the spec was last changed."""
    workstream: str | None = None
    """Human title of the workstream; a Prefect tag."""
    branch: str | None = None
    """Branch the workstream delivers to."""
    schema_version: VersionText | None = None
    """Version of the spec schema the file was written against."""
    checksum: str | None = None
    """Checksum recorded by tooling that generated the file."""


class SpecInfo(_Open):
    """What the agent is: title, domain and urgency."""

    name: NonEmptyText
    """Human title, e.g. ``Build System Stabilization Agent``."""
    domain: NonEmptyText
    """Free-text domain; a Prefect tag."""
    priority: PriorityText
    """Agent priority; breaks ties when concurrency slots are short."""
    description: str | None = None
    """Optional longer description."""


class Capabilities(_Open):
    """Skills the agent has (descriptive labels, not permissions)."""

    primary: list[str] = []
    """Main skills."""
    secondary: list[str] = []
    """Supporting skills."""


class Objective(_Open):
    """One outcome the agent works toward."""

    description: NonEmptyText
    """What to achieve."""
    deliverable: NonEmptyText
    """What is produced."""
    validation: NonEmptyText
    """How success is checked."""
    priority: PriorityText | None = None
    """Optional urgency of this objective."""


class Task(_Open):
    """One step of the agent; becomes one Prefect task."""

    description: NonEmptyText
    """What to do; the short form names the task in the Prefect UI."""
    priority: PriorityText = "medium"
    """critical/high failures stop the agent; medium/low failures are recorded and the agent goes on."""
    estimated_duration: Duration | None = None
    """Rough effort, e.g. ``4h``."""
    estimated_time: Duration | None = None
    """Synonym of ``estimated_duration`` seen in some files."""
    max_turns: int | None = Field(default=None, ge=1, le=10_000)
    """Model requests this task may make (default: the run's ``max_turns``, 100)."""
    tools_required: list[str] = []
    """Tools the author expects the task to need (informational)."""
    dependencies: list[str] = []
    """Free-text prerequisites of this task (informational)."""


class Tasks(_Block):
    """The ordered task list, plus tasks switched on by named contexts."""

    default: list[Task] = Field(min_length=1)
    """Tasks run in this order on every run."""
    conditional: dict[str, list[Task]] = {}
    """Context name -> tasks that only run when that context is switched on."""

    @model_validator(mode="before")
    @classmethod
    def _none_is_empty(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("conditional", {}) is None:
            data = {**data, "conditional": {}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _at_most_max_tasks(cls, data: Any) -> Any:
        # Counted before any task is validated: a list over the limit costs nothing more.
        if isinstance(data, dict):
            lists = [data.get("default")]
            if isinstance(data.get("conditional"), dict):
                lists += data["conditional"].values()
            n = sum(len(tasks) for tasks in lists if isinstance(tasks, list))
            if n > MAX_TASKS:
                raise ValueError(
                    f"{n:,} tasks (default and conditional together); the limit for an agent is {MAX_TASKS:,}"
                )
        return data


class Dependencies(_Block):
    """Other agents this one builds on, each with the reason."""

    required: DependencyMap = {}
    """Agents that must complete first; this agent does not run if one fails."""
    optional: DependencyMap = {}
    """Agents to run first when both are in the run; their results are passed along."""


def _normalise_metrics(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        value = [{k: v} if isinstance(v, str) or v is None else {"name": k, **v} if isinstance(v, dict) else {k: v}
                 for k, v in value.items()]
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for item in value:
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
            ((name, description),) = item.items()
            out.append({"name": name, "description": description})
        else:
            out.append(item)
    return out


class Metric(_Open):
    """A figure the agent reports; the structured result is keyed by ``name``."""

    name: NonEmptyText
    """Metric id, e.g. ``build-success-rate``."""
    description: str | None = None
    """What it measures."""
    type: str | None = None
    """Kind of value (``gauge``, ``counter``, ``percentage``...)."""
    unit: str | None = None
    """Unit of the value."""


MetricList = Annotated[
    list[Metric],
    BeforeValidator(
        _normalise_metrics,
        json_schema_input_type=list[dict[str, str] | Metric | str] | dict[str, str | None] | None,
    ),
]


class Reporting(_Open):
    """How the agent reports progress."""

    frequency: Frequency | None = None
    """How often to report."""
    channels: list[str] = []
    """Where reports go."""
    metrics: MetricList = []
    """Figures to report; written either as ``[{name: description}]`` or as ``[{name, description, type, unit}]``."""


class ResourceLimits(_Block):
    """Limits enforced on the agent's run and on the commands it starts."""

    timeout: Duration
    """Wall-clock limit of the whole agent run, e.g. ``2h``."""
    max_memory: ByteSize | None = None
    """Memory limit of each command the agent runs, e.g. ``512MB``."""
    max_cpu: CpuShare | None = None
    """CPU share of each command, between ``1%`` and ``100%`` of one CPU."""
    max_disk_usage: ByteSize | None = None
    """How much the workspace may grow during the run."""
    max_network_bandwidth: Bandwidth | None = None
    """Network rate for agents granted network access, e.g. ``100Mbps``."""
    max_processes: int | None = Field(default=None, ge=1, le=100_000, strict=True)
    """Most processes a command may have at once (stops fork bombs)."""


class Security(_Open):
    """Permissions and resource limits."""

    sandbox: bool = True
    """Run commands in a sandbox; ``false`` needs ``--allow-unsandboxed``."""
    capabilities_required: list[NonEmptyText] = []
    """Permission names, e.g. ``filesystem-read``; they decide which tools the agent gets."""
    resource_limits: ResourceLimits
    """Limits enforced while the agent runs."""
    write_paths: list[NonEmptyText] = []
    """Workspace globs the agent writes to; writes elsewhere need approval (empty: anywhere)."""


class Budget(_Block):
    """Token budgets; a request that would start after one is spent is refused."""

    task_tokens: int | None = Field(default=None, ge=1)
    """Most tokens (input, output and cache) one task may spend."""
    agent_tokens: int | None = Field(default=None, ge=1)
    """Most tokens the whole agent may spend in one run (resumed runs included)."""


class BehavioralDirectives(_Open):
    """Guidance for how the agent works, passed verbatim to the model."""

    operational_focus: list[str] = []
    """What to prioritise."""
    error_handling: list[str] = []
    """How to react to failures."""
    coordination: list[str] = []
    """How to work with other agents."""


class Risk(_Open):
    """A known risk and how to mitigate it."""

    risk: NonEmptyText
    """What could go wrong."""
    mitigation: NonEmptyText
    """How to avoid or contain it."""
    probability: str | None = None
    """Likelihood, free text."""
    impact: str | None = None
    """Impact, free text."""


class RiskMitigation(_Open):
    """Risks the agent must keep in mind."""

    high_priority_risks: list[Risk] = []
    """The risks that matter most."""
    monitoring: list[str] = []
    """What to watch."""


class SuccessCriteria(_Block):
    """Phased criteria for judging the agent's work; further ``phase_N`` lists are allowed."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, list[str]] = Field(init=False)  # type: ignore[assignment]

    phase_1: list[str] = []
    """First-phase criteria."""
    phase_2: list[str] = []
    """Second-phase criteria."""
    final_validation: list[str] = []
    """Criteria for the finished work."""


class AgentSpec(BaseModel):
    """One agent, as declared in one YAML file."""

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        use_attribute_docstrings=True,
        title="Toka agent spec",
    )

    metadata: Metadata
    """Identity: name, version, workstream."""
    spec: SpecInfo
    """Title, domain and priority."""
    capabilities: Capabilities = Capabilities()
    """Skills (descriptive)."""
    objectives: list[Objective] = []
    """Outcomes to work toward."""
    tasks: Tasks
    """The ordered tasks."""
    dependencies: Dependencies = Dependencies()
    """Required and optional agents to run first."""
    reporting: Reporting = Reporting()
    """Reporting frequency, channels and metrics."""
    security: Security
    """Permissions and resource limits."""
    behavioral_directives: BehavioralDirectives = BehavioralDirectives()
    """Guidance passed to the model."""
    risk_mitigation: RiskMitigation = RiskMitigation()
    """Risks and their mitigations."""
    success_criteria: SuccessCriteria = SuccessCriteria()
    """Phased success criteria."""
    budget: Budget = Budget()
    """Token budgets for each task and for the agent (optional)."""

    _source_name: str | None = PrivateAttr(default=None)
    _yaml: YamlSource | None = PrivateAttr(default=None)
    _digest: str | None = PrivateAttr(default=None)
    #: Warnings found in the data as read, before validation (about unknown top-level blocks).
    _load_warnings: tuple[Problem, ...] = PrivateAttr(default=())

    _KNOWN_BLOCKS: ClassVar[tuple[str, ...]] = (
        "metadata", "spec", "capabilities", "objectives", "tasks", "dependencies",
        "reporting", "security", "behavioral_directives", "risk_mitigation", "success_criteria",
        "budget",
    )  # fmt: skip

    @property
    def name(self) -> str:
        """The agent id (``metadata.name``)."""
        return self.metadata.name

    @property
    def priority(self) -> Priority:
        """The agent priority (``spec.priority``)."""
        return self.spec.priority

    def task_list(self, contexts: Iterable[str] = ()) -> list[Task]:
        """The tasks to run, in order: the default ones, then those of each switched-on context."""
        on = set(contexts)
        tasks = list(self.tasks.default)
        for context, extra in self.tasks.conditional.items():
            if context in on:
                tasks.extend(extra)
        return tasks

    def digest(self) -> str:
        """A hash of the spec's content (every block, in order); changes when the spec does."""
        if self._digest is None:  # the spec is frozen: its digest never changes
            blob = self.model_dump_json(by_alias=True).encode()
            self._digest = hashlib.sha256(blob).hexdigest()
        return self._digest

    @property
    def context_blocks(self) -> dict[str, Any]:
        """Domain-specific blocks, in file order, shown to the agent as context: unknown top-level
        blocks, then fields of ``metadata`` and ``security`` the runtime does not read."""
        blocks = dict(self.model_extra or {})
        for path, block in self._keeping_blocks():
            blocks[_field_path(path)] = plain_data(block.model_extra)
        return blocks

    def _keeping_blocks(self) -> list[tuple[tuple[str | int, ...], BaseModel]]:
        """The blocks that describe the agent and keep fields the runtime does not read (the tasks'
        aside: theirs are shown with their task), with where each is."""
        blocks: list[tuple[tuple[str | int, ...], BaseModel]] = [
            ((name,), getattr(self, name)) for name in
            ("metadata", "spec", "capabilities", "reporting", "security", "behavioral_directives", "risk_mitigation")]
        blocks += [(("objectives", i), o) for i, o in enumerate(self.objectives)]
        blocks += [(("reporting", "metrics", i), m) for i, m in enumerate(self.reporting.metrics)]
        blocks += [(("risk_mitigation", "high_priority_risks", i), r)
                   for i, r in enumerate(self.risk_mitigation.high_priority_risks)]
        return [(path, block) for path, block in blocks if block.model_extra]

    @property
    def warnings(self) -> list[Problem]:
        """What loads but deserves a look: values whose meaning is a guess, fields the runtime does not read."""
        found: list[Problem] = list(self._load_warnings)

        def warn(message: str, *path: str | int) -> None:
            found.append(Problem(message, source=self.source, line=self.line_of(*path),
                                 field=_shown_path(path), level="warning"))

        limits = self.security.resource_limits
        for field_name in ("timeout", "max_cpu"):
            value = getattr(limits, field_name)
            if value is not None and value.guessed:
                warn(value.guessed, "security", "resource_limits", field_name)
        if limits.timeout.seconds < 1:
            warn(f"{limits.timeout.text!r} is under a second: the agent would time out before its first "
                 "model request is answered", "security", "resource_limits", "timeout")
        for path, block in self._keeping_blocks():
            known = list(type(block).model_fields)
            for key in block.model_extra or {}:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                warn(f"not understood by the runtime; kept and shown to the agent as context{hint}", *path, key)
        from .capabilities import CAPABILITIES

        granted = set(self.security.capabilities_required)
        for kind in ("primary", "secondary"):
            for i, skill in enumerate(getattr(self.capabilities, kind)):
                if skill in CAPABILITIES and skill not in granted:
                    warn(f"{skill!r} is a permission name, but 'capabilities' lists skills and grants nothing; "
                         "to grant it, add it to security.capabilities_required", "capabilities", kind, i)
        lists = [("default", self.tasks.default), *(("conditional", c) for c in self.tasks.conditional.items())]
        for kind, tasks in lists:
            prefix: tuple[str | int, ...] = ("tasks", "default") if kind == "default" else ("tasks", "conditional",
                                                                                          tasks[0])  # type: ignore[index]
            items = tasks if kind == "default" else tasks[1]  # type: ignore[index]
            for i, task in enumerate(items):
                for key in task.model_extra or {}:
                    warn("not understood by the runtime; kept and shown to the agent with the task",
                         *prefix, i, key)
                for key in ("estimated_duration", "estimated_time"):
                    value = getattr(task, key)
                    if value is not None and value.guessed:
                        warn(value.guessed, *prefix, i, key)
                    if value is not None and value.seconds < 1:
                        # An estimate is also the limit of each attempt (unless --task-timeout is given).
                        warn(f"{value.text!r} is under a second, and a task's estimate is also the time limit of "
                             "each of its attempts (toka run --task-timeout sets another): the task would time "
                             "out", *prefix, i, key)
        return found

    @property
    def source(self) -> str | None:
        """The file this spec was read from, as the user named it."""
        return self._source_name

    def line_of(self, *path: str | int) -> int | None:
        """The line in the source file where ``path`` is written, when known."""
        return None if self._yaml is None else self._yaml.line_of(path)

    # -- constructors -------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> AgentSpec:
        """Read and validate one spec file.

        Raises:
            SpecError: the file cannot be read, is not YAML, or is not a valid
                spec; every problem found is listed with its line.
        """
        return cls.from_text(read_spec_text(path), source=str(path))

    @classmethod
    def from_text(cls, text: str, *, source: str = "<string>") -> AgentSpec:
        """Validate a spec given as YAML text; ``source`` names it in errors."""
        return cls.from_texts([(source, text)])[0]

    @classmethod
    def from_texts(cls, named_texts: Sequence[tuple[str, str]]) -> list[AgentSpec]:
        """Validate several specs given as ``(source, text)``; all problems are reported together.

        Every call parses and validates every text. A process-wide cache of valid
        specs by ``(source, text)`` was removed: side by side (bench/plan_scale.py,
        median of 7 rounds) it gained nothing on one load (0.89-1.10x, noise) and
        halved a second load of the same files (0.50-0.56x), which only ``toka run``
        did; loading once and passing the plan on is as fast (0.91-1.01x of two
        loads with the cache) and holds nothing between calls.

        Raises:
            SpecError: with every problem of every bad text, each located.
        """
        specs, problems = cls.load_texts(named_texts)
        if problems:
            raise SpecError(problems)
        return specs

    @classmethod
    def load_texts(cls, named_texts: Sequence[tuple[str, str]]) -> tuple[list[AgentSpec], list[Problem]]:
        """Like :meth:`from_texts`, but returns the specs that are valid and the problems of the rest."""
        specs: list[AgentSpec] = []
        problems: list[Problem] = []
        for source, text in named_texts:
            yaml_source = YamlSource(source, text)
            try:
                specs.append(cls._validate_located(load_yaml(yaml_source), yaml_source))
            except SpecError as e:  # not YAML, duplicate keys, over a limit, or not a valid spec
                problems.extend(e.problems)
        return specs, problems

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> AgentSpec:
        """Validate an already-parsed spec (errors carry no line numbers)."""
        return cls._validate_located(data, None, source_name=source)

    @classmethod
    def _validate_located(
        cls, data: Any, yaml_source: YamlSource | None, *, source_name: str | None = None
    ) -> AgentSpec:
        name = yaml_source.name if yaml_source is not None else source_name
        if not isinstance(data, dict):
            kind = "an empty file" if data is None else _kind(data)
            raise SpecError(
                [Problem(f"a spec must be a mapping of blocks (metadata, spec, tasks, ...), got {kind}", source=name)]
            )
        blocks = cls._misspelt_blocks(data, yaml_source, name) + _token_shaped(data, yaml_source, name)
        problems = ([p for p in blocks if p.level == "error"] + _misspelt_fields(data, yaml_source, name)
                    + _misspelt_capabilities(data, yaml_source, name))
        try:
            spec = cls.model_validate(data)
        except ValidationError as e:
            errors = e.errors()
            # A misspelt required field in a block that takes no other fields is one defect: the
            # unknown field's problem already says what it may have meant.
            unknown = {_loc(err) for err in errors if err["type"] == "extra_forbidden"}
            errors = [err for err in errors if err["type"] != "missing"
                      or (*_loc(err)[:-1], _misspelling(err, data)) not in unknown]
            # dict.fromkeys: one defect that fails several alternatives of a type is one problem
            problems += list(dict.fromkeys(_problem(err, yaml_source, name, data) for err in errors[:MAX_PROBLEMS]))
            if len(errors) > MAX_PROBLEMS:  # each costs a line lookup, and nobody reads 40,000 lines
                problems.append(Problem(f"{len(errors) - MAX_PROBLEMS:,} more problems not listed "
                                        f"(the first {MAX_PROBLEMS} of a file are)", source=name))
            spec = None
        if problems:
            raise SpecError(problems)
        assert spec is not None
        spec._source_name = name
        spec._yaml = yaml_source
        spec._load_warnings = tuple(p for p in blocks if p.level == "warning")
        return spec

    @classmethod
    def _misspelt_blocks(
        cls, data: dict[Any, Any], yaml_source: YamlSource | None, name: str | None
    ) -> list[Problem]:
        """Unknown blocks are kept as context; one that would surely be lost there (a field of a known
        block, another case of one, a typo of a missing one) is an error, and one that looks like a
        setting but changes nothing (another framework's run setting, a near-namesake of a block that
        is also there) a warning."""
        problems = []
        for key in data:
            if not isinstance(key, str) or key in cls._KNOWN_BLOCKS:
                continue

            def problem(message: str, level: Literal["error", "warning"] = "error") -> None:
                problems.append(Problem(message, source=name, line=yaml_source.line_of([key]) if yaml_source
                                        else None, field=key, level=level))

            shown, lower = repr(key), key.lower()
            field = key if key in _NESTED_FIELDS else lower
            place = _NESTED_FIELDS.get(field)
            if place is not None:  # kept as a block of context, it would change nothing: surely misplaced
                problem(f"{shown} is a field of {place!r}, not a block: move it under {place} "
                        f"({place}.{field}); at the top level it would be ignored")
                continue
            if lower in cls._KNOWN_BLOCKS:
                problem(f"{shown} is another case of the block {lower!r}: block names are lower-case, and at the "
                        "top level it would be kept as context and change nothing" + (
                            f"; merge it into {lower!r}" if lower in data else f"; write {lower!r}"))
                continue
            setting = _UNREAD_SETTINGS.get(lower)
            if setting is not None:
                problem(f"{shown} is not read by the runtime: kept and shown to the agent as context only, it "
                        f"changes nothing; {setting}", "warning")
                continue
            # Other frameworks' names for the dependencies block: kept as context, the agent would
            # run without waiting for what it needs.
            alias = "dependencies" if lower in _DEPENDENCY_ALIASES else None
            close = [alias] if alias else difflib.get_close_matches(key, cls._KNOWN_BLOCKS, n=1, cutoff=0.85)
            if close and close[0] not in data:
                problem(f"unknown block {shown}; did you mean {close[0]!r}?")
            elif close:  # beside the block it looks like: what it holds is read from neither
                problem(f"unknown block {shown}, beside {close[0]!r}: kept and shown to the agent as context "
                        f"only; nothing in it is read as part of {close[0]!r}", "warning")
        return problems


_DEPENDENCY_ALIASES = frozenset({"dependency", "depends_on", "depends-on", "dependson", "depends", "requires"})

#: Run settings of other frameworks (and of ``toka run``) that specs copied from them carry at the
#: top level: the runtime reads none of them from a spec, so each is named with where it is set.
_UNREAD_SETTINGS: dict[str, str] = {
    **dict.fromkeys(("model", "llm", "llm_config"),
                    "the model and how it is called are set for a run: toka run --model (or TOKA_MODEL), "
                    "--temperature, --max-tokens"),
    **dict.fromkeys(("temperature", "max_tokens"), "set for a run: toka run --temperature, --max-tokens"),
    **dict.fromkeys(("max_turns", "max_iter", "max_iterations"),
                    "model requests per task are set by a task's own max_turns or toka run --max-turns; "
                    "token budgets go in the 'budget' block"),
    "tools": "the tools an agent gets follow from security.capabilities_required",
    "allow_unsandboxed": "it is an option of the run: toka run --allow-unsandboxed",
}


def plain_data(value: Any) -> Any:
    """YAML-safe plain data (dates and other scalars as text)."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


#: Fields that change what an agent may do or how it runs, by the block they belong in: written
#: at the top level by mistake, they would be kept as context and do nothing.
_NESTED_FIELDS: dict[str, str] = {
    **dict.fromkeys(Security.model_fields, "security"),
    **dict.fromkeys(ResourceLimits.model_fields, "security.resource_limits"),
    **dict.fromkeys(Dependencies.model_fields, "dependencies"),
    **dict.fromkeys(Budget.model_fields, "budget"),
    **dict.fromkeys(Tasks.model_fields, "tasks"),
    "priority": "spec",
}


def _misspelt_capabilities(data: dict[Any, Any], yaml_source: YamlSource | None, name: str | None) -> list[Problem]:
    """Declared capabilities that are surely a misspelling of one the runtime knows (another case,
    spaces, a typo): as written they would grant nothing, and the agent would run without its tools."""
    from .capabilities import CAPABILITIES

    security = data.get("security")
    declared = security.get("capabilities_required") if isinstance(security, dict) else None
    if not isinstance(declared, list):
        return []
    known = list(CAPABILITIES)
    problems = []
    for i, capability in enumerate(declared):
        if not isinstance(capability, str) or capability in CAPABILITIES:
            continue
        line = yaml_source.line_of(["security", "capabilities_required", i]) if yaml_source else None
        field = f"security.capabilities_required[{i}]"
        if has_control(capability):
            # Printed by plan and validate, it could hide the capabilities listed after it.
            problems.append(Problem(f"capability name {capability!r} holds a control character; a capability "
                                    "is a name such as 'filesystem-read'", source=name, line=line, field=field))
            continue
        plain = capability.strip().lower().replace("_", "-").replace(" ", "-")
        close = [plain] if plain in CAPABILITIES else difflib.get_close_matches(plain, known, n=1, cutoff=0.85)
        if close:
            problems.append(Problem(
                f"unknown capability {capability!r}; did you mean {close[0]!r}? (a name the runtime does "
                "not know grants no tool)", source=name, line=line, field=field))
    return problems


def _token_shaped(data: dict[Any, Any], yaml_source: YamlSource | None, name: str | None) -> list[Problem]:
    """Values (and keys) that look like an API key or token: pasted from another framework's config,
    one would reach the model with the spec (the prompt redacts it) and everyone who reads the file."""
    found: list[Problem] = []
    # Each distinct text is checked once: an alias is the very string it names, and 19,000 aliases
    # of one 65,000-character value took 17 s checked one by one. Each place is still warned of.
    checked: dict[str, bool] = {}

    def token(text: str) -> bool:
        known = checked.get(text)
        if known is None:
            known = checked[text] = looks_like_token(text)
        return known

    def walk(value: Any, path: tuple[object, ...], shown: tuple[str | int, ...]) -> None:
        # ``path`` holds the keys as read, to find the line; ``shown`` the field path as printed.
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and token(key):
                    # Not printed in the field path either, here or under it.
                    found.append(warning((*path, key), (*shown, REDACTED)))
                    walk(item, (*path, key), (*shown, REDACTED))
                else:
                    walk(item, (*path, key), (*shown, _key_shown(key)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, (*path, i), (*shown, i))
        elif isinstance(value, str) and token(value):
            found.append(warning(path, shown))

    def warning(path: tuple[object, ...], shown: tuple[str | int, ...]) -> Problem:
        # The value itself is not repeated: the message would spread it further.
        return Problem("looks like an API key or token: it is redacted from the prompt, but the spec file "
                       "holds it; remove it from the spec and revoke it", source=name,
                       line=yaml_source.line_of(path) if yaml_source else None, field=_field_path(shown),
                       level="warning")

    walk(data, (), ())
    return found


def _key_shown(key: object) -> str:
    """A mapping key as a part of a field path: text as it is; another key (``true:``, ``5:``) as
    written, never as a list's ``[5]``."""
    if isinstance(key, str):
        return key
    if isinstance(key, (WrittenInt, WrittenFloat)):
        return str(key)  # the text written: 0x10, 1.10
    return as_written(key)


def _shown_path(path: tuple[str | int, ...]) -> str:
    """``path`` as a warning prints it: a key that looks like a token is not repeated."""
    return _field_path(tuple(REDACTED if isinstance(p, str) and looks_like_token(p) else p for p in path))


def _misspelt_fields(data: dict[Any, Any], yaml_source: YamlSource | None, name: str | None) -> list[Problem]:
    """In blocks that keep unknown fields: the ones that look like a misspelt missing field."""
    places: list[tuple[tuple[str | int, ...], Any, type[BaseModel]]] = [
        (("metadata",), data.get("metadata"), Metadata), (("security",), data.get("security"), Security)]
    tasks = data.get("tasks")
    if isinstance(tasks, dict):
        if isinstance(tasks.get("default"), list):
            places += [(("tasks", "default", i), t, Task) for i, t in enumerate(tasks["default"])]
        if isinstance(tasks.get("conditional"), dict):
            places += [(("tasks", "conditional", c, i), t, Task) for c, ts in tasks["conditional"].items()
                       if isinstance(ts, list) for i, t in enumerate(ts)]
    problems = []
    for path, block, model in places:
        if not isinstance(block, dict):
            continue
        fields = list(model.model_fields)
        for key in block:
            if not isinstance(key, str) or key in model.model_fields:
                continue
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            # A required field's misspelling is told with the field's own "missing" (:func:`_problem`).
            if close and close[0] not in block and not model.model_fields[close[0]].is_required():
                problems.append(Problem(
                    f"unknown field {key!r}; did you mean {close[0]!r}? expected one of: {', '.join(fields)}",
                    source=name, line=yaml_source.line_of([*path, key]) if yaml_source else None,
                    field=_field_path((*path, key))))
    return problems


# -- turning pydantic errors into located, readable problems -----------------


def _field_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _kind(value: Any) -> str:
    """What a YAML value is, in the words of a spec's author: a mapping, a list, text..."""
    kinds = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", type(None): "nothing",
             int: "a number", float: "a number", date: "a date", datetime: "a date-time"}
    return kinds.get(type(value)) or next((name for t, name in kinds.items() if isinstance(value, t)),
                                          f"a {type(value).__name__}")


def _describe(value: Any) -> str:
    kind = _kind(value)
    return kind if value is None else f"{kind} ({_shown(value)})"


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 120, 120


def _shown(value: Any) -> str:
    """The value as written (:func:`toka.units.as_written`), abridged when long: a whole block or a
    60,000-character value in one message helps nobody."""
    shown = as_written(value)
    return shown if len(shown) <= 200 else _SHORT.repr(value)


def _message(err: ErrorDetails, model_fields: list[str]) -> str:
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        key = err["loc"][-1]
        close = difflib.get_close_matches(str(key), model_fields, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field {key!r}; {hint}expected one of: {', '.join(model_fields)}"
    if kind == "literal_error":
        return f"{_shown(value)} is not one of {ctx.get('expected', '')}"
    if kind == "string_pattern_mismatch" and err["loc"][-1] == "name":
        return f"{_shown(value)} is not a kebab-case name (lowercase letters, digits and single hyphens, e.g. 'build-system')"
    if kind in ("string_type", "string_sub_type"):
        return f"expected text, got {_describe(value)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} item(s), got {_describe(value)}"
    if kind == "list_type":
        return f"expected a list, got {_describe(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if err["loc"] == ("tasks",) and isinstance(value, list):
            return (f"expected a mapping, got {_describe(value)}; a list of tasks goes under 'default:' "
                    "(tasks: {default: [...]}), and context-dependent ones under 'conditional:'")
        return f"expected a mapping, got {_describe(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_describe(value)}"
    if kind in ("date_type", "date_parsing", "date_from_datetime_parsing", "date_from_datetime_inexact"):
        return f"{_shown(str(value) if isinstance(value, date) else value)} is not a date (write YYYY-MM-DD, or an ISO 8601 date-time such as 2026-03-02T10:15:00Z)"
    if kind == "invalid_key":
        return f"a field name must be text, got {_describe(value)}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    if kind in ("unit", "octal"):
        return err["msg"]
    return f"{err['msg'][:1].lower()}{err['msg'][1:]} (got {_describe(value)})"


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """The field names the model at ``loc``'s parent accepts (for 'did you mean')."""
    model: Any = AgentSpec
    for part in loc[:-1]:
        info = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if info is not None:
            model = _model_in(info.annotation)
        # Anything else is a list index or a mapping key (a context name): stay on the model.
    return list(getattr(model, "model_fields", {}))


def _at(data: Any, loc: tuple[str | int, ...]) -> Any:
    """The value at ``loc`` in the spec's data, or None when the path does not lead anywhere."""
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _loc(err: ErrorDetails) -> tuple[str | int, ...]:
    """Where the error is in the spec's data. Before-validators on a whole field report at the
    field itself; unions and nested types add pseudo-locations (e.g. 'function-after[...]')."""
    return tuple(p for p in err["loc"] if isinstance(p, int) or "[" not in str(p))


def _misspelling(err: ErrorDetails, data: Any) -> str | None:
    """For a missing field: the key beside it that looks like it misspelt (no field of the block)."""
    loc = _loc(err)
    if err["type"] != "missing" or not loc or not isinstance(loc[-1], str):
        return None
    block = _at(data, loc[:-1])
    if not isinstance(block, dict):
        return None
    known = _fields_at(loc)
    unknown = [k for k in block if isinstance(k, str) and k not in known]
    close = difflib.get_close_matches(loc[-1], unknown, n=1, cutoff=0.6)
    return close[0] if close else None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _problem(err: ErrorDetails, yaml_source: YamlSource | None, name: str | None, data: Any = None) -> Problem:
    loc = _loc(err)
    field = _field_path(loc)
    if loc and ((len(err["loc"]) > 1 and err["loc"][-1] == "[key]") or err["type"] == "invalid_key"):
        # A mapping key pydantic could not read: its location holds it as text or a number
        # (null as 'None', true as 1); the key itself is the input, named as written.
        key = err.get("input")
        shown = key if isinstance(key, str) else as_written(key)
        field = f"{_field_path(loc[:-1])}.{shown}" if loc[:-1] else shown
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            loc = loc[:-1]  # the line of the mapping that holds it
    message = _message(err, _fields_at(loc))
    typo = _misspelling(err, data)
    if typo is not None:  # point at the key the author wrote, not at the block missing the field
        message += f"; {typo!r} looks like a misspelling of it"
        loc = (*loc[:-1], typo)
    return Problem(
        message,
        source=name,
        line=yaml_source.line_of(loc) if yaml_source else None,
        field=field,
    )

