"""Reading spec YAML: safe loading, duplicate keys as errors, limits, and line lookup.

Loading uses libyaml when present (it is, with the PyYAML wheels) because
``toka plan`` over a thousand specs must stay fast. Line numbers are only
needed when something is wrong, so the node tree that holds them is composed
lazily, on the first lookup, instead of on every load. Files are parsed one
after another, in this process. Parsing them in forked workers, one per core,
was removed: side by side with this (bench/plan_scale.py, two shared cores,
median of 7 rounds), a cold ``make_plan`` of 1,000 files took 0.92x as long
with the original forked code and 1.19x with its re-creation in the bench,
and the real sets (9 and 5 files) never reached the 200 files it started at.

A spec must not be able to hang the loader or exhaust its memory, so what one
file may hold is bounded (the ``MAX_*`` constants below, the one place they are
defined). Each bound is checked as early as it can be: the file's size before
it is read, the rest while the node tree is composed, node by node, so that a
file over a bound costs at most about one bound's worth of work. Aliases are
counted as the copies they stand for: a "billion laughs" file is small as text
but its aliases expand to billions of nodes in anything that walks the data
(validation, error messages, hashing, the prompt). The bounds are two orders of
magnitude above what real specs use: the nine Toka specs and the five in
``agent_specs/`` are at most 8.5 kB, 400 nodes, 5 levels of nesting, 137
characters in a value and 9 tasks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent, MappingEndEvent, ScalarEvent, SequenceEndEvent, SequenceStartEvent, StreamEndEvent

from .errors import Problem, SpecError

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_PROBLEMS",
    "MAX_SPEC_BYTES",
    "MAX_TASKS",
    "MAX_VALUE_CHARS",
    "WrittenFloat",
    "WrittenInt",
    "YamlSource",
    "load_yaml",
    "read_spec_text",
]

# -- limits: what one spec file may hold -------------------------------------------

#: Size of one spec file, checked before it is read (the largest real spec: 8.5 kB).
MAX_SPEC_BYTES = 1024 * 1024
#: Nodes in one spec: every mapping, list, key and scalar, an alias counting as a copy
#: of what it names (real specs: at most 400). Composing this many takes 0.1-0.2 s.
MAX_NODES = 20_000
#: Levels of mappings and lists inside one another, through aliases too (real specs: 5).
#: Well below Python's recursion limit, for everything that walks the data afterwards.
MAX_DEPTH = 64
#: Characters in one scalar, key or value (real specs: at most 137; the prompt shows
#: every value to the model, and this is already about 16,000 tokens).
MAX_VALUE_CHARS = 65_536
#: Characters of text in one spec once its aliases are expanded, each a copy of what it names
#: (real specs: about 8,000). The prompt holds every value: 20,000 aliases of one 65,536-character
#: value are 1.3 GB of it, which building the prompt took minutes and gigabytes to write out.
MAX_EXPANDED_CHARS = 2 * MAX_SPEC_BYTES
#: Tasks of one agent, ``tasks.default`` and every ``tasks.conditional`` list together
#: (real specs: at most 9); each is a Prefect task and at least one model request.
#: Checked by the spec model (``toka.spec.Tasks``).
MAX_TASKS = 1_000
#: Problems listed for one file; the rest are counted in one more line. A file of
#: 12,000 malformed objectives has 48,000 problems, which took 23 s to print.
MAX_PROBLEMS = 100

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        self.key, self.line, self.first_line = key, line, first_line


class _BadScalar(Exception):
    def __init__(self, node: yaml.ScalarNode, error: Exception) -> None:
        self.node, self.error = node, error


_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"


class WrittenFloat(float):
    """A number as YAML read it, and as text the way the author wrote it: ``version: 1.10`` is
    ``1.10`` where a spec field takes text, not ``1.1``."""

    __slots__ = ("text",)

    def __new__(cls, value: float, text: str) -> WrittenFloat:
        made = super().__new__(cls, value)
        made.text = text
        return made

    def __str__(self) -> str:
        return self.text

    def __reduce__(self) -> tuple[type[WrittenFloat], tuple[float, str]]:
        return WrittenFloat, (float(self), self.text)


class WrittenInt(int):
    """A YAML 1.1 integer not written in plain decimal (``010``, ``0x1f``, ``1_000``, ``0b11``, ``+5``),
    with the text the author wrote: where a spec field takes text it is that text, not 8, 31 or 1000;
    where it takes a number it is the number YAML 1.1 reads, except a leading-zero ``010``, which
    is refused (YAML 1.2 reads it as 10: which one the author meant is a guess)."""

    text: str  # an int subclass cannot have __slots__ for it

    def __new__(cls, value: int, text: str) -> WrittenInt:
        made = super().__new__(cls, value)
        made.text = text
        return made

    def __str__(self) -> str:
        return self.text

    def __reduce__(self) -> tuple[type[WrittenInt], tuple[int, str]]:
        return WrittenInt, (int(self), self.text)


#: An integer as YAML 1.1 and 1.2 both read it, and as Python writes it back (``10``, ``0``, ``-5``):
#: ``+5`` read as 5 would reach the prompt as ``5``.
_PLAIN_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)")


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
            if not node.style and tag in (_INT, _FLOAT) and ":" in node.value:
                # YAML 1.1's base 60 (`1:30` is 90): text as written, as YAML 1.2 reads it, so that a
                # duration says what is wrong with the value the author wrote.
                return node.value
            try:
                value = self._safe.construct_object(node, deep=True)
            except yaml.YAMLError:
                raise
            except Exception as e:  # PyYAML lets ValueError & co. escape for bad scalars
                raise _BadScalar(node, e) from None
            if type(value) is float and not node.style:
                return WrittenFloat(value, node.value)
            if type(value) is int and not node.style and not _PLAIN_DECIMAL.fullmatch(node.value):
                return WrittenInt(value, node.value)
            if isinstance(value, bytes):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise _BadScalar(node, ValueError("the data is not UTF-8 text (a spec holds text)")) from None
            return value
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


class _OverLimit(Exception):
    """A bound was exceeded while composing, at ``mark``; ``path`` is filled in on the way out."""

    def __init__(self, message: str, mark: yaml.Mark) -> None:
        super().__init__(message)
        self.message, self.mark = message, mark
        self.path: list[Any] = []


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    """libyaml's parser and PyYAML's resolver; the node tree composed here, every bound checked.

    libyaml's own composer (in C) cannot count as it goes: it took 3.5 s and 150 MB
    to compose a 1 MiB file of ``[1,1,1,...]``, and what the aliases of a file expand
    to is never known before something walks them. This one builds the same nodes
    from libyaml's events, in Python, stopping at the first node over a bound.
    Measured here, parsing and building the data of a spec took 1.4 ms against 1.2 ms
    with libyaml's composer (bench/plan_scale.py's specs, best of ten runs).
    Anchors and aliases keep their meaning: an alias is the very node it names.
    """

    def get_single_node(self) -> yaml.Node | None:
        # anchor -> (node, nodes it expands to, levels it spans); None while it is composed
        self._anchors: dict[str, tuple[yaml.Node, int | None, int, int]] = {}
        self._nodes = 0
        self._chars = 0  # of the scalars, aliases expanded
        #: Aliases met inside the collection they name, ``(anchor, mark)``: the data would
        #: contain itself. Refused once the data is built, so that a defect earlier in
        #: the file (a duplicate key) is still reported first, where it is.
        self.recursive_aliases: list[tuple[str, yaml.Mark]] = []
        self.get_event()  # stream start
        root = None
        if not self.check_event(StreamEndEvent):
            self.get_event()  # document start
            root, _ = self._node(self.get_event(), 0)
            self.get_event()  # document end
            if not self.check_event(StreamEndEvent):
                another = self.peek_event().start_mark
                if not self._only_empty_documents_follow():
                    raise ComposerError("expected a single document in the stream", root.start_mark,
                                        "but found another document", another)
        self.get_event()  # stream end
        return root

    def _only_empty_documents_follow(self) -> bool:
        """Consume what follows the document if it is only empty documents (a closing ``---``)."""
        while not self.check_event(StreamEndEvent):
            self.get_event()  # document start
            if not self.check_event(ScalarEvent):
                return False
            empty = self.peek_event()
            if empty.value or empty.anchor or empty.tag or not empty.implicit[0]:
                return False
            self.get_event()
            self.get_event()  # document end
        return True

    def _node(self, event: yaml.Event, level: int) -> tuple[yaml.Node, int]:
        """The node ``event`` starts, inside ``level`` collections, and how many levels of collections it spans."""
        if type(event) is AliasEvent:
            return self._alias(event, level)
        anchor = event.anchor
        if anchor is not None and anchor in self._anchors:
            first = self._anchors[anchor][0].start_mark.line + 1
            raise ComposerError(None, None, f"anchor &{anchor} is defined twice (first on line {first})", event.start_mark)
        start, start_chars = self._nodes, self._chars
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _OverLimit(
                f"more than {MAX_NODES:,} nodes (keys, values and list items); "
                f"the limit for a spec is {MAX_NODES:,}", event.start_mark,
            )
        tag = event.tag
        if type(event) is ScalarEvent:
            if len(event.value) > MAX_VALUE_CHARS:
                raise _OverLimit(
                    f"a value of {len(event.value):,} characters; the limit for one value "
                    f"is {MAX_VALUE_CHARS:,}", event.start_mark,
                )
            self._chars += len(event.value)
            self._check_chars(event.start_mark)
            if tag is None or tag == "!":
                tag = self.resolve(yaml.ScalarNode, event.value, event.implicit)
            scalar = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
            if anchor is not None:
                self._anchors[anchor] = (scalar, 1, 0, len(event.value))
            return scalar, 0
        if level >= MAX_DEPTH:
            raise _OverLimit(
                f"mappings and lists nested more than {MAX_DEPTH} levels deep; "
                f"the limit for a spec is {MAX_DEPTH}", event.start_mark,
            )
        # One call into the parser per event: this loop is most of the time spent loading.
        next_event = self.get_event
        node: yaml.SequenceNode | yaml.MappingNode
        height = 0
        if type(event) is SequenceStartEvent:
            if tag is None or tag == "!":
                tag = self.resolve(yaml.SequenceNode, None, event.implicit)
            node = yaml.SequenceNode(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if anchor is not None:
                self._anchors[anchor] = (node, None, 0, 0)
            items = node.value
            while type(event := next_event()) is not SequenceEndEvent:
                try:
                    item, spans = self._node(event, level + 1)
                except _OverLimit as e:
                    e.path.insert(0, len(items))
                    raise
                if type(event) is AliasEvent:  # the item is the node it names, written elsewhere
                    _alias_lines(node)[len(items)] = event.start_mark.line + 1
                items.append(item)
                if spans > height:
                    height = spans
        else:
            if tag is None or tag == "!":
                tag = self.resolve(yaml.MappingNode, None, event.implicit)
            node = yaml.MappingNode(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if anchor is not None:
                self._anchors[anchor] = (node, None, 0, 0)
            pairs = node.value
            while type(event := next_event()) is not MappingEndEvent:
                key, spans = self._node(event, level + 1)
                if spans > height:
                    height = spans
                try:
                    value, spans = self._node(next_event(), level + 1)
                except _OverLimit as e:
                    e.path.insert(0, key.value if isinstance(key, yaml.ScalarNode) else "?")
                    raise
                pairs.append((key, value))
                if spans > height:
                    height = spans
        node.end_mark = event.end_mark
        if anchor is not None:
            self._anchors[anchor] = (node, self._nodes - start, height + 1, self._chars - start_chars)
        return node, height + 1

    def _check_chars(self, mark: yaml.Mark, alias: tuple[str, int] | None = None) -> None:
        """Refuse the spec past :data:`MAX_EXPANDED_CHARS`, at ``mark`` (an ``alias``: its anchor and
        the characters it stands for)."""
        if self._chars > MAX_EXPANDED_CHARS:
            why = f"alias *{alias[0]} stands for {alias[1]:,} characters, which makes " if alias else ""
            raise _OverLimit(
                f"{why}more than {MAX_EXPANDED_CHARS:,} characters of text in all (an alias counts as a copy of "
                f"what it names); the limit for a spec is {MAX_EXPANDED_CHARS:,}", mark,
            )

    def _alias(self, event: AliasEvent, level: int) -> tuple[yaml.Node, int]:
        anchor = event.anchor
        if anchor not in self._anchors:
            raise ComposerError(None, None, f"found undefined alias {anchor!r}", event.start_mark)
        node, size, height, chars = self._anchors[anchor]
        if size is None:  # inside the collection it names
            self.recursive_aliases.append((anchor, event.start_mark))
            return node, 0
        self._nodes += size
        self._chars += chars
        self._check_chars(event.start_mark, (anchor, chars))
        if self._nodes > MAX_NODES:
            raise _OverLimit(
                f"alias *{anchor} stands for {size:,} nodes, which makes more than {MAX_NODES:,} "
                f"in all (an alias counts as a copy of what it names); the limit for a spec is {MAX_NODES:,}",
                event.start_mark,
            )
        if level + height > MAX_DEPTH:
            raise _OverLimit(
                f"alias *{anchor} nests mappings and lists {level + height} levels deep here; "
                f"the limit for a spec is {MAX_DEPTH}", event.start_mark,
            )
        return node, height


def _compose(text: str) -> tuple[yaml.Node | None, list[tuple[str, yaml.Mark]]]:
    """The node tree of ``text`` and its recursive aliases; raises :class:`_OverLimit` past a bound."""
    loader = _Loader(text)
    try:
        return loader.get_single_node(), loader.recursive_aliases
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
                self._root, _ = _compose(self.text)
            except (yaml.YAMLError, _OverLimit):
                self._root = None
        return self._root

    def line_of(self, path: Sequence[object]) -> int | None:
        """The 1-based line of the deepest node along ``path`` that exists.

        A path into a missing field points at its parent mapping, which is
        where the user must add it. A string key met at a list is looked up
        among the list's single-key maps, the shape several spec blocks use.
        A key that is not text (``true:``, ``null:``) is found by what YAML reads.
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


def _alias_lines(node: yaml.SequenceNode) -> dict[int, int]:
    """The lines of a list's items that are aliases, by index (kept on the node, made when one is met)."""
    lines: dict[int, int] | None = getattr(node, "toka_alias_lines", None)
    if lines is None:
        lines = {}
        node.toka_alias_lines = lines  # type: ignore[attr-defined]
    return lines


def _child(node: yaml.Node, part: object) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and _is_key(key_node, part):
                return key_node.start_mark.line + 1, value_node
    elif isinstance(node, yaml.SequenceNode):
        if isinstance(part, int):
            if 0 <= part < len(node.value):
                item = node.value[part]
                aliased = getattr(node, "toka_alias_lines", None)
                return (aliased.get(part, item.start_mark.line + 1) if aliased else item.start_mark.line + 1), item
        else:
            for item in node.value:
                found = _child(item, part)
                if found is not None:
                    return found
    return None


def _is_key(node: yaml.ScalarNode, part: object) -> bool:
    """Whether the key written as ``node`` is ``part``, a key of the data built from it."""
    if isinstance(part, str) or (isinstance(part, int) and not isinstance(part, bool)):
        return node.value == str(part)  # a WrittenInt's str() is its text
    # A key YAML reads as another type (`true:`, `yes:`, `null:`, `1.5:`, a date): compared as read,
    # since its text is one of several spellings (True is `true`, `True` or `yes`).
    try:
        read = yaml.constructor.SafeConstructor().construct_object(node)
    except Exception:  # PyYAML lets ValueError & co. escape for bad scalars
        return False
    return isinstance(read, bool) == isinstance(part, bool) and bool(read == part)


def _invisible_cause(text: str, line: int) -> str:
    """What on line ``line`` (0-based) or the one before, where YAML errors land, a reader cannot
    see: a tab or a non-breaking space where YAML takes only spaces."""
    lines = text.splitlines()
    for number in (line, line - 1):
        if not 0 <= number < len(lines):
            continue
        content = lines[number]
        indent = content[:len(content) - len(content.lstrip(" \t\u00a0"))]
        if "\t" in indent:
            return f" (line {number + 1} is indented with a tab: YAML indents with spaces only)"
        if "\u00a0" in content:
            return (f" (line {number + 1} holds a non-breaking space, U+00A0, at column "
                    f"{content.index(chr(0xa0)) + 1}: YAML takes plain spaces only)")
    return ""


def load_yaml(source: YamlSource) -> Any:
    """Parse ``source`` safely; malformed YAML, duplicate keys and specs over a limit raise :class:`SpecError`."""
    size = _utf8_size_over_limit(source.text)
    if size is not None:
        raise SpecError([Problem(f"spec is {size:,} bytes; {_SIZE_LIMIT}", source=source.name)])
    try:
        root, recursive = _compose(source.text)
        data = None if root is None else _Builder().build(root)
    except RecursionError:
        raise SpecError([Problem("YAML nested too deeply to be a spec", source=source.name)]) from None
    except _OverLimit as e:
        raise SpecError(
            [
                Problem(
                    e.message,
                    source=source.name,
                    line=source.clamp_line(e.mark.line + 1),
                    field=_dotted(e.path[:8]) + ("..." if len(e.path) > 8 else "") or None,
                )
            ]
        ) from None
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
        if what == "but found another document":
            what = "a spec file holds one YAML document, and this one has another after '---'"
        elif mark is not None:
            what += _invisible_cause(source.text, mark.line)
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
    if recursive:
        # Built data with a cycle is harmless; walking it (validation, hashing) is not.
        anchor, mark = recursive[0]
        line = mark.line + 1
        raise SpecError(
            [
                Problem(
                    f"alias *{anchor} is inside the collection it names, so the data would contain itself",
                    source=source.name,
                    line=line,
                    field=source.path_at(line),
                )
            ]
        )
    return data


_SIZE_LIMIT = f"the limit for a spec file is {MAX_SPEC_BYTES // 1024 // 1024} MiB"


def _utf8_size_over_limit(text: str) -> int | None:
    """The size of ``text`` in UTF-8 when it is over :data:`MAX_SPEC_BYTES`, else None."""
    if len(text) * 4 <= MAX_SPEC_BYTES:  # no character takes more than 4 bytes
        return None
    if text.isascii():  # known without a look at the characters
        size = len(text)
    else:  # counted in slices: a 10 MB text is not copied whole to be measured
        step = 1 << 16
        size = sum(len(text[i : i + step].encode("utf-8", "surrogatepass")) for i in range(0, len(text), step))
    return size if size > MAX_SPEC_BYTES else None


def _dotted(path: Sequence[Any]) -> str:
    """``["tasks", "default", 3]`` -> ``tasks.default[3]``, as problems name fields."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file, read only when it is within :data:`MAX_SPEC_BYTES`.

    Raises:
        SpecError: the file is missing, a directory, unreadable, too large or
            not UTF-8 (located by line and column).
    """
    name = str(path)
    data = b""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= MAX_SPEC_BYTES:
                data = f.read(MAX_SPEC_BYTES + 1)  # bounded even if the file grows meanwhile
                size = len(data)
    except FileNotFoundError:
        raise SpecError([Problem("no such file", source=name)]) from None
    except IsADirectoryError:
        raise SpecError([Problem("is a directory, not a spec file", source=name)]) from None
    except OSError as e:
        raise SpecError([Problem(f"cannot read: {e}", source=name)]) from None
    if size > MAX_SPEC_BYTES:
        raise SpecError([Problem(f"file is {size:,} bytes; {_SIZE_LIMIT}", source=name)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([_not_utf8(data, e, name)]) from None
    # As text mode reads it: YAML ends lines at \r too, line numbers here count \n.
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _not_utf8(data: bytes, e: UnicodeDecodeError, name: str) -> Problem:
    """Where the first undecodable byte is, as an editor shows it: line, and column in characters."""
    line_start = data.rfind(b"\n", 0, e.start) + 1
    column = len(data[line_start : e.start].decode("utf-8", "replace")) + 1
    bad = " ".join(f"0x{b:02x}" for b in data[e.start : e.end])
    return Problem(
        f"cannot read: byte {bad} at column {column} is not UTF-8 ({e.reason}); save the file as UTF-8",
        source=name,
        line=data.count(b"\n", 0, e.start) + 1,
    )

