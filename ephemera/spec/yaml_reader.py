"""Reading a job file's YAML safely: bounded size, depth, values and text (aliases
cannot blow a small file up), and every value's line and column kept for error
messages. Used by :mod:`ephemera.spec.jobfile`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ephemera.errors import ConfigError

Path_ = tuple[str | int, ...]

# Bounds on what a job file may hold. A real one has a few dozen values, a few levels
# deep; these stop YAML aliases (each repeats its anchor's whole value) and nesting
# from turning a small file into gigabytes or a stack overflow.
MAX_JOB_FILE_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_VALUES = 10_000
MAX_TEXT_CHARS = 2_000_000
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_SHOWN_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    line: int | None       # 1-based
    column: int | None     # 1-based
    path: str              # dotted field path ("suite.timeout"), "" for the whole file
    message: str

    def render(self, filename: str) -> str:
        where = filename
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        field_part = f" {self.path}:" if self.path else ""
        return f"{where}:{field_part} {self.message}"


class JobFileError(ConfigError):
    """A job file that cannot be used. ``problems`` lists every error found."""

    kind = "invalid job file"

    def __init__(self, filename: str, problems: list[Problem]) -> None:
        self.filename = filename
        self.problems = problems
        lines = [p.render(filename) for p in problems[:MAX_SHOWN_PROBLEMS]]
        if len(problems) > MAX_SHOWN_PROBLEMS:
            lines.append(f"... and {len(problems) - MAX_SHOWN_PROBLEMS} more")
        count = f"{len(problems)} error{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{filename}: {count}\n" + "\n".join("  " + line for line in lines))


# ----------------------------------------------------------------------------- reading

def read_text(path: Path) -> str:
    name = str(path)
    if not path.exists():
        raise JobFileError(name, [Problem(None, None, "", "no such file")])
    if path.is_dir():
        raise JobFileError(name, [Problem(None, None, "", "is a directory, not a job file")])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JobFileError(name, [Problem(None, None, "", f"cannot be read: {exc.strerror}")]) from None
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise JobFileError(name, [Problem(None, None, "", f"is {len(raw)} bytes; a job file is at most {MAX_JOB_FILE_BYTES}")])
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise JobFileError(name, [Problem(1, None, "", "is UTF-16 text; save it as UTF-8")])
    if b"\x00" in raw:
        offset = raw.index(b"\x00")
        line = raw[:offset].count(b"\n") + 1
        raise JobFileError(name, [Problem(line, None, "", "contains a NUL byte: this is a binary file, not YAML")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise JobFileError(name, [Problem(line, None, "", f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})")]) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def clip(text: str, limit: int = 300) -> str:
    """Messages quote the file: keep a huge value from filling the terminal."""
    return text if len(text) <= limit else text[: limit - 20] + " ... " + text[-15:]


class _Refused(Exception):
    """A value the loader will not build, with where it starts in the file."""

    def __init__(self, mark: Any, path: list[str | int], message: str) -> None:
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else None
        self.column = mark.column + 1 if mark is not None else None
        self.path = ".".join(str(p) for p in path)
        self.message = message


@functools.cache
def _bounded_loader_classes() -> tuple[type, type]:
    """A composer that counts values as aliases expand them and refuses deep nesting,
    and a constructor that turns a scalar it cannot convert into a positioned error."""
    from ruamel.yaml.composer import Composer
    from ruamel.yaml.constructor import RoundTripConstructor
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.events import AliasEvent
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    class BoundedComposer(Composer):
        def compose_document(self) -> Any:
            self._values = self._chars = 0
            self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> expanded (values, chars)
            self._path: list[str | int] = []
            return super().compose_document()

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.parser.peek_event()
            step = self._step(parent, index)
            if step is not None:
                self._path.append(step)
            try:
                if isinstance(event, AliasEvent):
                    return self._alias(parent, index, event)
                return self._value(parent, index, event)
            finally:
                if step is not None:
                    self._path.pop()

        @staticmethod
        def _step(parent: Any, index: Any) -> str | int | None:
            if isinstance(parent, SequenceNode):
                return index
            if isinstance(parent, MappingNode):
                if index is None:
                    return "<key>"
                return str(index.value) if isinstance(index, ScalarNode) else "?"
            return None

        def _alias(self, parent: Any, index: Any, event: Any) -> Any:
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise _Refused(event.start_mark, self._path,
                               f"alias *{event.anchor} refers to a value that contains it")
            self._count(*size, event.start_mark, event.anchor)
            return node

        def _value(self, parent: Any, index: Any, event: Any) -> Any:
            if len(self._path) > MAX_DEPTH:
                raise _Refused(event.start_mark, self._path[:4],
                               f"nested deeper than {MAX_DEPTH} levels (a job file needs a few)")
            values, chars = self._values, self._chars
            self._count(1, 0, event.start_mark, None)
            node = super().compose_node(parent, index)
            if isinstance(node, ScalarNode):
                self._count(0, len(node.value), event.start_mark, None)
                if _SURROGATE.search(node.value):
                    raise _Refused(event.start_mark, self._path,
                                   "an escape such as \\ud800 stands for half of a UTF-16 pair, "
                                   "not a character: write the character itself or \\U0001F600")
            self._sizes[id(node)] = (self._values - values, self._chars - chars)
            return node

        def _count(self, values: int, chars: int, mark: Any, alias: str | None) -> None:
            self._values += values
            self._chars += chars
            if self._values <= MAX_VALUES and self._chars <= MAX_TEXT_CHARS:
                return
            what = (f"more than {MAX_VALUES} values" if self._values > MAX_VALUES
                    else f"more than {MAX_TEXT_CHARS} characters of text")
            message = f"the file holds {what}"
            if alias is not None:
                message += (f" once alias *{alias} is expanded (it repeats {values} values "
                            f"and {chars} characters)")
            raise _Refused(mark, self._path, message + "; a job file is smaller than that")

    class CheckedConstructor(RoundTripConstructor):
        def construct_non_recursive_object(self, node: Any, tag: str | None = None) -> Any:
            try:
                return super().construct_non_recursive_object(node, tag)
            except (YAMLError, _Refused):
                raise
            except Exception as exc:  # noqa: BLE001 - a tag's converter on text it cannot take
                raise _Refused(node.start_mark, [],
                               f"cannot read this value as {clip(str(node.tag), 60)}: "
                               f"{type(exc).__name__}: {clip(str(exc), 120)}") from None

    return BoundedComposer, CheckedConstructor


def parse_yaml(text: str, name: str) -> Any:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    yaml = YAML(typ="rt")
    yaml.Composer, yaml.Constructor = _bounded_loader_classes()
    try:
        return yaml.load(text)
    except _Refused as exc:
        raise JobFileError(name, [Problem(exc.line, exc.column, exc.path, exc.message)]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        parts = (exc.problem, exc.context)
        if exc.problem and str(exc.problem).startswith("but "):
            parts = (exc.context, exc.problem)  # "expected X" reads before "but found Y"
        what = " ".join(str(s) for s in parts if s)
        if "duplicate key" in str(exc):
            what = str(exc).split("\n")[-1].strip() or what
            what = next((ln.strip() for ln in str(exc).splitlines() if "duplicate key" in ln), what)
        what = clip(what)
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        start = exc.context_mark
        if mark is not None and start is not None and start.line != mark.line:
            # An unclosed quote or bracket fails far from where it was opened.
            what += f" (started at line {start.line + 1}, column {start.column + 1})"
        raise JobFileError(name, [Problem(line, col, "", f"YAML syntax error: {what}")]) from None
    except YAMLError as exc:
        raise JobFileError(name, [Problem(None, None, "", f"YAML error: {clip(str(exc))}")]) from None
    except Exception as exc:  # noqa: BLE001 - ruamel on input it was not made for
        raise JobFileError(name, [Problem(None, None, "", f"cannot read the YAML: "
                                          f"{type(exc).__name__}: {clip(str(exc))}")]) from None


def first_content_line(text: str) -> int:
    """1-based line of the first thing that is not blank, a comment or a directive."""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "%", "---")):
            return number
    return 1


def plain_data(node: Any, path: Path_, locations: dict[Path_, tuple[int, int]]) -> Any:
    """Convert ruamel's round-trip nodes to plain Python, recording where each value is."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap):
        out: dict[str, Any] = {}
        for key in node:
            try:
                line, col = node.lc.value(key)
            except (KeyError, TypeError, AttributeError):
                line, col = node.lc.line, node.lc.col
            try:
                kline, kcol = node.lc.key(key)
            except (KeyError, TypeError, AttributeError):
                kline, kcol = line, col
            skey = str(key)
            child_path = (*path, skey)
            value = node[key]
            # A nested mapping or list is best pointed at by its key; a scalar by its value.
            if isinstance(value, CommentedMap | CommentedSeq):
                locations[child_path] = (kline + 1, kcol + 1)
            else:
                locations[child_path] = (line + 1, col + 1)
            locations[(*child_path, "<key>")] = (kline + 1, kcol + 1)
            out[skey] = plain_data(value, child_path, locations)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for index, value in enumerate(node):
            try:
                line, col = node.lc.item(index)
                locations[(*path, index)] = (line + 1, col + 1)
            except (KeyError, TypeError, AttributeError, IndexError):
                pass
            items.append(plain_data(value, (*path, index), locations))
        return items
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if node is None:
        return None
    return str(node)  # dates and other YAML types: keep the text


def nearest(locations: Mapping[Path_, tuple[int, int]], path: Path_) -> tuple[int, int] | None:
    probe = tuple(path)
    while probe:
        if probe in locations:
            return locations[probe]
        probe = probe[:-1]
    return None
