"""Reading spec YAML: safe loading, duplicate keys as errors, and line lookup.

Loading uses libyaml when present (it is, with the PyYAML wheels) because
``toka plan`` over a thousand specs must stay fast. Line numbers are only
needed when something is wrong, so the node tree that holds them is composed
lazily, on the first lookup, instead of on every load. libyaml holds the
GIL, so a large set of files is parsed in forked worker processes, one per
core.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import Problem, SpecError

__all__ = ["YamlSource", "load_yaml", "load_yaml_many"]

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        self.key, self.line, self.first_line = key, line, first_line


class _BadScalar(Exception):
    def __init__(self, node: yaml.ScalarNode, error: Exception) -> None:
        self.node, self.error = node, error


_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"


class _Builder:
    """Turns a composed node tree into Python objects, refusing duplicate keys.

    PyYAML's own constructor keeps the last of two equal keys silently (in a
    spec that would drop, say, a timeout without a word), and its generic
    machinery costs more than libyaml's parsing. Spec files are plain maps,
    lists and scalars, so those take a direct path; every other tag goes to
    PyYAML's safe constructor, which stays the authority on what is safe.
    """

    def __init__(self) -> None:
        self._safe = yaml.constructor.SafeConstructor()
        self._memo: dict[int, Any] = {}

    def build(self, node: yaml.Node) -> Any:
        tag = node.tag
        if isinstance(node, yaml.ScalarNode):
            if tag == _STR:
                return node.value
            try:
                return self._safe.construct_object(node, deep=True)
            except yaml.YAMLError:
                raise
            except Exception as e:  # PyYAML lets ValueError & co. escape for bad scalars
                raise _BadScalar(node, e) from None
        known = self._memo.get(id(node))
        if known is not None:
            return known
        if isinstance(node, yaml.SequenceNode) and tag == _SEQ:
            items: list[Any] = []
            self._memo[id(node)] = items
            items.extend(self.build(child) for child in node.value)
            return items
        if isinstance(node, yaml.MappingNode) and tag == _MAP:
            explicit = len(node.value)
            if any(k.tag == _MERGE for k, _ in node.value):
                explicit -= sum(1 for k, _ in node.value if k.tag == _MERGE)
                self._safe.flatten_mapping(node)
            merged = len(node.value) - explicit  # merged pairs come first
            mapping: dict[Any, Any] = {}
            self._memo[id(node)] = mapping
            lines: dict[Any, int] = {}
            for i, (key_node, value_node) in enumerate(node.value):
                key = self.build(key_node)
                if i < merged:  # '<<: *anchor' values may be overridden below
                    mapping[key] = self.build(value_node)
                    continue
                try:
                    first = lines.get(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        "found an unhashable key", key_node.start_mark,
                    ) from None
                if first is not None:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
                lines[key] = key_node.start_mark.line + 1
                mapping[key] = self.build(value_node)
            return mapping
        return self._safe.construct_object(node, deep=True)


def _compose(text: str) -> yaml.Node | None:
    loader = _BaseLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


@dataclass
class YamlSource:
    """The text of one spec file and how to find the line of a field in it."""

    name: str
    text: str
    _root: yaml.Node | None = field(default=None, repr=False)
    _composed: bool = field(default=False, repr=False)

    def _root_node(self) -> yaml.Node | None:
        if not self._composed:
            self._composed = True
            try:
                self._root = _compose(self.text)
            except yaml.YAMLError:
                self._root = None
        return self._root

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The 1-based line of the deepest node along ``path`` that exists.

        A path into a missing field points at its parent mapping, which is
        where the user must add it. A string key met at a list is looked up
        among the list's single-key maps, the shape several spec blocks use.
        """
        node = self._root_node()
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            key_line, node = child
            line = key_line
        return line

    def clamp_line(self, line: int) -> int:
        """Parsers report problems at end of input one line past the last one; point at the last."""
        return max(1, min(line, len(self.text.splitlines()) or 1))

    def path_at(self, line: int) -> str | None:
        """The dotted path of the mapping key written on ``line``, if any."""
        root = self._root_node()
        if root is None:
            return None
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        seen: set[int] = set()
        while stack:
            node, prefix = stack.pop()
            if id(node) in seen:  # an alias may make the tree contain itself
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                    if key_node.start_mark.line + 1 == line:
                        return path
                    stack.append((value_node, path))
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{prefix}[{i}]") for i, item in enumerate(node.value))
        return None


def _child(node: yaml.Node, part: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node.start_mark.line + 1, value_node
    elif isinstance(node, yaml.SequenceNode):
        if isinstance(part, int):
            if 0 <= part < len(node.value):
                item = node.value[part]
                return item.start_mark.line + 1, item
        else:
            for item in node.value:
                found = _child(item, part)
                if found is not None:
                    return found
    return None


def load_yaml(source: YamlSource) -> Any:
    """Parse ``source`` safely; malformed YAML and duplicate keys raise :class:`SpecError`."""
    try:
        root = _compose(source.text)
        return None if root is None else _Builder().build(root)
    except RecursionError:
        raise SpecError([Problem("YAML nested too deeply to be a spec", source=source.name)]) from None
    except _BadScalar as e:
        line = e.node.start_mark.line + 1
        kind = e.node.tag.rsplit(":", 1)[-1]
        raise SpecError(
            [
                Problem(
                    f"cannot read {e.node.value!r} as a YAML {kind}: {e.error}",
                    source=source.name,
                    line=line,
                    field=source.path_at(line),
                )
            ]
        ) from None
    except _DuplicateKey as e:
        raise SpecError(
            [
                Problem(
                    f"duplicate key {e.key!r} (first defined on line {e.first_line}); "
                    "YAML would silently keep only the last value",
                    source=source.name,
                    line=e.line,
                    field=source.path_at(e.line),
                )
            ]
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "malformed YAML"
        raise SpecError(
            [
                Problem(
                    f"invalid YAML: {what}",
                    source=source.name,
                    line=None if mark is None else source.clamp_line(mark.line + 1),
                )
            ]
        ) from None
    except yaml.reader.ReaderError as e:
        raise SpecError(
            [
                Problem(
                    f"invalid YAML: character {chr(e.character)!r} is not allowed in YAML"
                    if isinstance(e.character, int) else f"invalid YAML: {e.reason}",
                    source=source.name,
                    line=source.clamp_line(source.text.count("\n", 0, e.position) + 1),
                )
            ]
        ) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(f"invalid YAML: {e}", source=source.name)]) from None


#: Below this many files, starting worker processes costs more than it saves: a spec
#: file takes about 1 ms to parse (bench/plan_scale.py), and a pool of two about 20 ms to start.
PARALLEL_MIN_FILES = 200
_CHUNK = 50


def load_yaml_many(sources: Sequence[YamlSource]) -> Iterator[Any]:
    """Parse each of ``sources`` in order, yielding its data or the :class:`SpecError` it raised.

    Results come as they are ready, so the caller can validate one chunk while
    the workers parse the next.
    """
    workers = _parse_workers(len(sources))
    done = 0
    if workers > 1:
        chunks = [sources[i : i + _CHUNK] for i in range(0, len(sources), _CHUNK)]
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                for results in pool.map(_parse_chunk, [[(s.name, s.text) for s in c] for c in chunks]):
                    for parsed in results:
                        yield parsed[1] if parsed[0] else SpecError(parsed[1])
                        done += 1
        except (BrokenProcessPool, OSError):
            pass  # a worker died or could not start: parse the rest here
    for source in sources[done:]:
        yield _load_or_error(source)


def _load_or_error(source: YamlSource) -> Any:
    try:
        return load_yaml(source)
    except SpecError as e:
        return e


def _parse_chunk(named_texts: list[tuple[str, str]]) -> list[tuple[bool, Any]]:
    """In a worker: data, or the problems (a SpecError does not survive pickling whole)."""
    out: list[tuple[bool, Any]] = []
    for name, text in named_texts:
        result = _load_or_error(YamlSource(name, text))
        out.append((False, result.problems) if isinstance(result, SpecError) else (True, result))
    return out


def _parse_workers(n_files: int) -> int:
    """How many processes to parse ``n_files`` with; 1 means here, in this one."""
    if n_files < PARALLEL_MIN_FILES or not hasattr(os, "fork"):
        return 1
    # Forking copies only the calling thread: with other threads running (a Prefect
    # flow's event loop, say) a lock one of them held would stay held in the child.
    if threading.active_count() > 1 or multiprocessing.current_process().daemon:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_files // (PARALLEL_MIN_FILES // 2), 8))
