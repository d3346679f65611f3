from __future__ import annotations

import pickle

import pytest

from toka import (
    AgentGraph,
    AgentSpec,
    DependencyCycleError,
    DuplicateAgentError,
    UnknownAgentError,
    load_specs,
)

from .conftest import TOKA_SPECS, minimal_spec


def graph_of(*specs: dict) -> AgentGraph:
    return AgentGraph.build(AgentSpec.from_dict(s, source=f"{s['metadata']['name']}.yaml") for s in specs)


class TestTokaSpecs:
    """The nine real specs from Toka's v0.3 workstreams."""

    @pytest.fixture(scope="class")
    @classmethod
    def graph(cls) -> AgentGraph:
        return AgentGraph.build(load_specs([TOKA_SPECS]))

    def test_all_nine_load(self, graph: AgentGraph) -> None:
        assert len(graph) == 9
        assert graph.warnings == ()

    def test_build_system_stabilization_alone_in_first_wave(self, graph: AgentGraph) -> None:
        assert graph.waves()[0] == ["build-system-stabilization"]

    def test_every_optional_edge_is_respected(self, graph: AgentGraph) -> None:
        position = {name: i for i, name in enumerate(graph.order())}
        wave = {n: i for i, w in enumerate(graph.waves()) for n in w}
        optional = [
            (dep, spec.name)
            for spec in graph.agents.values()
            for dep in spec.dependencies.optional
        ]
        assert len(optional) == 11
        for dep, dependent in optional:
            assert position[dep] < position[dependent], (dep, dependent)
            assert wave[dep] < wave[dependent], (dep, dependent)

    def test_order_is_deterministic(self, graph: AgentGraph) -> None:
        again = AgentGraph.build(reversed(load_specs([TOKA_SPECS])))
        assert again.waves() == graph.waves()
        assert graph.waves() == [
            ["build-system-stabilization"],
            ["testing-infrastructure"],
            ["github-cicd-issues-resolution", "kernel-events-enhancement"],
            ["document-organization", "storage-advancement"],
            ["performance-observability", "security-extension"],
            ["llm-credentials-setup"],
        ]


class TestWaves:
    def test_priority_then_name_within_a_wave(self) -> None:
        graph = graph_of(
            minimal_spec("zeta", priority="critical"),
            minimal_spec("alpha", priority="low"),
            minimal_spec("beta", priority="high"),
            minimal_spec("gamma", priority="high"),
        )
        assert graph.waves() == [["zeta", "beta", "gamma", "alpha"]]

    def test_required_dependency_runs_in_an_earlier_wave(self) -> None:
        graph = graph_of(
            minimal_spec("a"),
            minimal_spec("b", required={"a": "needs a"}),
            minimal_spec("c", required=[{"b": "needs b"}]),
        )
        assert graph.waves() == [["a"], ["b"], ["c"]]

    def test_optional_edge_orders_agents_both_in_the_run(self) -> None:
        graph = graph_of(minimal_spec("a", optional={"b": "nice"}), minimal_spec("b"))
        assert graph.waves() == [["b"], ["a"]]


class TestErrors:
    def test_unknown_required_dependency_suggests_closest_name(self) -> None:
        with pytest.raises(UnknownAgentError) as info:
            graph_of(minimal_spec("build-system"), minimal_spec("docs", required={"buidl-system": "x"}))
        msg = str(info.value)
        assert "docs.yaml" in msg
        assert "dependencies.required" in msg
        assert "unknown required dependency 'buidl-system'" in msg
        assert "did you mean 'build-system'?" in msg
        assert "known agents: build-system, docs" in msg

    def test_unknown_dependency_error_has_line_number(self, write_specs) -> None:
        folder = write_specs(minimal_spec("docs", required=[{"nope": "x"}]))
        with pytest.raises(UnknownAgentError) as info:
            AgentGraph.build(load_specs([folder]))
        (problem,) = info.value.problems
        text = (folder / "docs.yaml").read_text().splitlines()
        assert "nope" in text[problem.line - 1]

    def test_all_unknown_dependencies_reported_together(self) -> None:
        with pytest.raises(UnknownAgentError) as info:
            graph_of(minimal_spec("a", required={"x": ""}), minimal_spec("b", required={"y": ""}))
        assert len(info.value.problems) == 2

    def test_unknown_optional_dependency_is_a_warning(self) -> None:
        graph = graph_of(minimal_spec("a", optional={"ghost": "maybe"}))
        (warning,) = graph.warnings
        assert warning.level == "warning"
        assert "unknown optional dependency 'ghost'" in warning.message
        assert graph.waves() == [["a"]]

    def test_duplicate_name_names_both_files(self, write_specs, tmp_path) -> None:
        one = write_specs(minimal_spec("same"), directory="one")
        two = write_specs(minimal_spec("same"), directory="two")
        with pytest.raises(DuplicateAgentError) as info:
            AgentGraph.build(load_specs([one, two]))
        msg = str(info.value)
        assert str(one / "same.yaml") in msg and str(two / "same.yaml") in msg
        assert "metadata.name" in msg

    def test_required_cycle_is_printed(self) -> None:
        with pytest.raises(DependencyCycleError, match=r"a -> b -> c -> a"):
            graph_of(
                minimal_spec("a", required={"b": ""}),
                minimal_spec("b", required={"c": ""}),
                minimal_spec("c", required={"a": ""}),
                minimal_spec("d"),
            )

    def test_self_dependency_is_a_cycle(self) -> None:
        with pytest.raises(DependencyCycleError, match=r"a -> a"):
            graph_of(minimal_spec("a", required={"a": ""}))

    def test_long_chain_does_not_hit_recursion_limit(self) -> None:
        n = 3000
        specs = [minimal_spec("n0")] + [minimal_spec(f"n{i}", required={f"n{i - 1}": ""}) for i in range(1, n)]
        specs[0] = minimal_spec("n0", required={f"n{n - 1}": ""})
        with pytest.raises(DependencyCycleError):
            graph_of(*specs)

    def test_optional_edge_closing_a_cycle_is_dropped_with_warning(self) -> None:
        graph = graph_of(
            minimal_spec("a"),
            minimal_spec("b", required={"a": ""}),
            minimal_spec("a2", required={"b": ""}),
            minimal_spec("c", optional={"a2": ""}),
        )
        assert graph.warnings == ()
        graph = graph_of(
            minimal_spec("a", optional={"b": "would loop"}),
            minimal_spec("b", required={"a": ""}),
        )
        (warning,) = graph.warnings
        assert "optional dependency 'b' would close a cycle" in warning.message
        assert warning.source == "a.yaml"
        assert graph.waves() == [["a"], ["b"]]
        assert [(e.dependency, e.dependent) for e in graph.dropped] == [("b", "a")]

    def test_both_required_and_optional_warns_and_keeps_required(self) -> None:
        graph = graph_of(minimal_spec("a"), minimal_spec("b", required={"a": ""}, optional={"a": ""}))
        assert [e.kind for e in graph.edges] == ["required"]
        assert "both a required and an optional" in graph.warnings[0].message

    def test_errors_pickle(self) -> None:
        with pytest.raises(DependencyCycleError) as info:
            graph_of(minimal_spec("a", required={"a": ""}))
        clone = pickle.loads(pickle.dumps(info.value))
        assert type(clone) is DependencyCycleError
        assert str(clone) == str(info.value)


class TestSelect:
    @pytest.fixture
    def graph(self) -> AgentGraph:
        return graph_of(
            minimal_spec("base"),
            minimal_spec("mid", required={"base": ""}),
            minimal_spec("top", required={"mid": ""}, optional={"side": ""}),
            minimal_spec("side", required={"base": ""}),
            minimal_spec("other"),
        )

    def test_pulls_required_dependencies_transitively(self, graph: AgentGraph) -> None:
        assert graph.select(["top"]).waves() == [["base"], ["mid"], ["top"]]

    def test_optional_only_when_selected_too(self, graph: AgentGraph) -> None:
        sub = graph.select(["top", "side"])
        assert sorted(sub.agents) == ["base", "mid", "side", "top"]
        assert sub.upstream("top") == ["mid", "side"]
        assert graph.select(["top"]).upstream("top") == ["mid"]

    def test_unknown_selection_suggests(self, graph: AgentGraph) -> None:
        with pytest.raises(UnknownAgentError, match=r"unknown agent 'tpo'; did you mean 'top'\?"):
            graph.select(["tpo"])
