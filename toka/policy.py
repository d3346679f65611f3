"""What one agent may do in one run: capabilities, limits, approvals and write paths."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .config import DEFAULT_NEEDS_APPROVAL
from .errors import ApprovalDenied
from .spec import AgentSpec, ResourceLimits

__all__ = ["DEFAULT_NEEDS_APPROVAL", "AgentPolicy", "ApprovalDenied", "approval_keys", "check_unsandboxed"]


@dataclass(frozen=True)
class AgentPolicy:
    capabilities: frozenset[str]
    limits: ResourceLimits
    sandbox: bool = True
    allow_unsandboxed: bool = False
    write_paths: tuple[str, ...] = ()
    needs_approval: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_NEEDS_APPROVAL))
    approvals: frozenset[str] = frozenset()
    denials: frozenset[str] = frozenset()

    @classmethod
    def for_spec(cls, spec: AgentSpec, **options: object) -> AgentPolicy:
        sec = spec.security
        return cls(capabilities=frozenset(sec.capabilities_required), limits=sec.resource_limits,
                   sandbox=sec.sandbox, write_paths=tuple(sec.write_paths), **options)  # type: ignore[arg-type]

    def approved(self, key: str) -> bool:
        if key not in self.needs_approval:
            return True
        return key in self.approvals and key not in self.denials

    def require_approval(self, key: str, what: str) -> None:
        if self.approved(key):
            return
        how = "it was denied" if key in self.denials else "nobody approved it for this run"
        raise ApprovalDenied(
            f"{what} needs approval ({key!r}) and {how}; a person can allow it with "
            f"`toka run --approve {key}` or in the Prefect UI when the run pauses"
        )

    def check_write(self, relative_path: str) -> None:
        """Writes outside the spec's declared ``write_paths`` need approval."""
        if not self.write_paths or any(fnmatch.fnmatch(relative_path, g) for g in self.write_paths):
            return
        self.require_approval(
            "write-outside-paths",
            f"writing {relative_path!r} (outside the declared paths {', '.join(self.write_paths)})",
        )


def approval_keys(spec: AgentSpec, needs_approval: frozenset[str] | tuple[str, ...]) -> list[str]:
    """The approvals ``spec`` might need in a run (asked for before it starts)."""
    caps = set(spec.security.capabilities_required)
    keys = []
    if "network-access" in caps:
        keys.append("network-access")
    if "git-push" in caps:
        keys.append("git-push")
    from .capabilities import CAPABILITIES

    # Commands write too: what they change outside the paths needs the same approval.
    writes = caps & {"filesystem-write", "file-system-write"} or any(
        c in CAPABILITIES and CAPABILITIES[c].needs_sandbox for c in caps)
    if spec.security.write_paths and writes:
        keys.append("write-outside-paths")
    return [k for k in keys if k in needs_approval]


def check_unsandboxed(specs: list[AgentSpec], *, allowed: bool) -> None:
    """Agents that would run commands without the sandbox need the run's explicit consent.

    Raises:
        ConfigError: naming them, unless ``allowed``.
    """
    from .capabilities import CAPABILITIES
    from .errors import ConfigError

    risky = [s.name for s in specs if not s.security.sandbox and any(
        c in CAPABILITIES and CAPABILITIES[c].needs_sandbox for c in s.security.capabilities_required)]
    if risky and not allowed:
        raise ConfigError(
            f"{', '.join(risky)}: the spec sets sandbox: false and grants commands; "
            "run with --allow-unsandboxed (deployment parameter allow_unsandboxed) to let them run unconfined"
        )
