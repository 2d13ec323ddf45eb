"""Load ``pipelines.yaml`` into the typed spec, reporting every problem at its line and column.

PyYAML's ``safe_load`` forgets where values came from and silently keeps the last of two
duplicate keys, so the loader composes the node tree itself, builds plain Python values while
recording the mark of every value and key, validates with pydantic, and maps each pydantic
error back to ``FILE:LINE:COL: field.path: message``. All problems are raised at once, in one
``SpecError``, so a user fixes a file in one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from lockgate.flows.spec import PipelinesFile, PipelineSpec, missing_data_roles
from lockgate.tasks.platform.errors import SpecError

__all__ = [
    "SCHEMA_PATH",
    "json_schema",
    "json_schema_text",
    "load_spec",
    "load_spec_text",
    "resolved_spec",
    "spec_warnings",
    "write_json_schema",
]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "pipelines.schema.json"
_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_SCHEMA_TITLE = "lockgate pipelines.yaml"

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_ROOT = "<root>"
_MAX_SHOWN_CHARS = 40  # longer offending values are cut so a message stays on one readable line

Loc = tuple[int | str, ...]
"""A path into the spec: mapping keys and list indexes, as in a pydantic error's ``loc``."""


# ------------------------------------------------------------------------------------ positions
@dataclass(frozen=True, order=True)
class _Pos:
    """A 1-based line and column (PyYAML marks are 0-based)."""

    line: int
    col: int

    @classmethod
    def of(cls, mark: yaml.Mark) -> _Pos:
        return cls(mark.line + 1, mark.column + 1)


_START = _Pos(1, 1)


@dataclass(frozen=True)
class _Marks:
    """Where a value starts and, for mapping values, where its key starts."""

    value: _Pos
    key: _Pos | None


@dataclass(frozen=True)
class _Problem:
    pos: _Pos
    path: str
    message: str

    def render(self, filename: str) -> str:
        return f"{filename}:{self.pos.line}:{self.pos.col}: {self.path}: {self.message}"


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc) or _ROOT


def _raise(problems: list[_Problem], filename: str, cause: BaseException | None = None) -> typing.NoReturn:
    # sorted() is stable, so problems on the same spot keep pydantic's (deterministic) order.
    ordered = sorted(problems, key=lambda p: p.pos)
    raise SpecError([p.render(filename) for p in ordered]) from cause


# --------------------------------------------------------------------------------- node builder
class _Builder:
    """Turns a composed YAML node tree into Python values, recording marks per path."""

    def __init__(self) -> None:
        self.marks: dict[Loc, _Marks] = {}
        self.problems: list[_Problem] = []
        # Scalars go through PyYAML's own safe constructor so ints, floats, bools, nulls and
        # timestamps resolve exactly as yaml.safe_load would resolve them.
        self._constructor = yaml.SafeLoader("")
        self._active: set[int] = set()  # ids of nodes being built: guards recursive aliases
        self._keys: dict[int, tuple[bool, Any]] = {}  # constructed keys by node id

    def build(self, node: yaml.Node, path: Loc, key_pos: _Pos | None) -> Any:
        value_pos = _Pos.of(node.start_mark)
        if key_pos is not None and isinstance(node, yaml.ScalarNode) and node.value == "" and not node.style:
            # An empty value ('eval:') has its mark just past the colon; the key reads better.
            value_pos = key_pos
        self.marks[path] = _Marks(value_pos, key_pos)
        if id(node) in self._active:
            self._problem(node, path, "yaml: recursive alias")
            return None
        self._active.add(id(node))
        try:
            return self._build(node, path)
        finally:
            self._active.discard(id(node))

    def _build(self, node: yaml.Node, path: Loc) -> Any:
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
            return [self.build(item, (*path, i), None) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        self._problem(node, path, f"yaml: unsupported tag {node.tag!r}")
        return None

    def _scalar(self, node: yaml.ScalarNode, path: Loc) -> Any:
        return self._construct(node, path)[1]

    def _construct(self, node: yaml.ScalarNode, path: Loc) -> tuple[bool, Any]:
        try:
            return True, self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. an unknown tag such as '!foo'
            self._problem(node, path, f"yaml: {getattr(exc, 'problem', None) or exc}")
        except ValueError as exc:  # e.g. '2020-13-45' resolves as a timestamp, then fails
            self._problem(node, path, f"yaml: cannot read {node.value!r}: {exc}")
        return False, None

    def _key(self, node: yaml.Node, path: Loc) -> tuple[bool, Any]:
        """The constructed key; each key node is constructed (and reported) only once."""
        if id(node) not in self._keys:
            if isinstance(node, yaml.ScalarNode):
                self._keys[id(node)] = self._construct(node, path)
            else:
                self._problem(node, path, "yaml: mapping keys must be plain scalars")
                self._keys[id(node)] = (False, None)
        return self._keys[id(node)]

    def _mapping(self, node: yaml.MappingNode, path: Loc) -> dict[Any, Any]:
        self._check_duplicates(node, path)
        # Last pair wins, first insertion fixes the order: the same as yaml.safe_load.
        winners: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in self._flatten(node, path):
            ok, key = self._key(key_node, path)
            if ok:
                winners[key] = (key_node, value_node)
        return {
            key: self.build(value_node, (*path, key), _Pos.of(key_node.start_mark))
            for key, (key_node, value_node) in winners.items()
        }

    def _check_duplicates(self, node: yaml.MappingNode, path: Loc) -> None:
        # Only keys written in this mapping count: a merge key ('<<') may repeat on purpose.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            ok, key = self._key(key_node, path)
            if ok and key in seen:
                self._problem(key_node, (*path, key), f"duplicate key {key!r}")
            seen.add(key)

    def _flatten(self, node: yaml.MappingNode, path: Loc) -> list[tuple[yaml.Node, yaml.Node]]:
        """Key/value pairs with YAML merge keys (``<<: *anchor``) expanded, as PyYAML does."""
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        explicit: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                explicit.append((key_node, value_node))
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            # Earlier sources win, so they come last in the list (the last pair wins).
            for source in reversed(sources):
                if isinstance(source, yaml.MappingNode) and source.tag == _MAP_TAG:
                    merged.extend(self._flatten(source, path))
                else:
                    self._problem(source, path, "yaml: '<<' expects a mapping or a list of mappings")
        return merged + explicit

    def _problem(self, node: yaml.Node, path: Loc, message: str) -> None:
        self.problems.append(_Problem(_Pos.of(node.start_mark), _dotted(path), message))


# ----------------------------------------------------------------------------- type navigation
def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` so the real container or model shows."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp  # a real union: no single type to walk into
            tp = members[0]
        else:
            return tp


def _type_at(loc: Loc) -> Any:
    """The annotation at ``loc`` walking from ``PipelinesFile``; ``None`` when it cannot be told."""
    tp: Any = PipelinesFile
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif origin in (tuple, list) and isinstance(part, int) and args:
            tp = args[0]
        elif origin is dict and len(args) == 2:
            tp = args[0] if part == "[key]" else args[1]
        else:
            return None
    return _unwrap(tp)


def _allowed_keys(loc: Loc) -> list[str] | None:
    """Keys a mapping at ``loc`` accepts: a model's fields or a ``Literal`` dict key's values."""
    tp = _type_at(loc)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [field.alias or name for name, field in tp.model_fields.items()]
    key_type = _type_at((*loc, "[key]")) if typing.get_origin(tp) is dict else None
    if typing.get_origin(key_type) is Literal:
        return [str(value) for value in typing.get_args(key_type)]
    return None


def _unknown_key(key: object, allowed: list[str] | None) -> str:
    if not allowed:
        return f"unknown key {key!r}"
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; allowed: {', '.join(allowed)}"


# -------------------------------------------------------------------------- error translation
_SHORTER_MESSAGES = {
    # pydantic names Python types; a YAML author writes mappings and lists.
    "model_type": "Input should be a mapping",
    "model_attributes_type": "Input should be a mapping",
    "dict_type": "Input should be a mapping",
    "tuple_type": "Input should be a list",
    "list_type": "Input should be a list",
}
_CONTAINER_NOUNS = {"Tuple": "List", "List": "List", "Dictionary": "Mapping"}
_VALIDATOR_PREFIXES = ("Value error, ", "Assertion failed, ")
_SAYS_GOT = re.compile(r"\bgot\b")


def _shown(value: object) -> str | None:
    """The offending input as a YAML author would write it; ``None`` for containers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict | list | tuple):
        return None
    text = repr(value) if isinstance(value, str) else str(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return text


def _length_message(err: ErrorDetails) -> str | None:
    """'List should have at least 1 item (got 0)': pydantic says 'Tuple' and 'after validation'."""
    ctx = err.get("ctx") or {}
    noun = _CONTAINER_NOUNS.get(str(ctx.get("field_type")))
    if err["type"] == "too_short" and noun:
        bound, limit = "at least", ctx["min_length"]
    elif err["type"] == "too_long" and noun:
        bound, limit = "at most", ctx["max_length"]
    else:
        return None
    items = "item" if limit == 1 else "items"
    return f"{noun} should have {bound} {limit} {items} (got {ctx.get('actual_length')})"


def _message(err: ErrorDetails) -> str:
    etype = err["type"]
    length_message = _length_message(err)
    if length_message is not None:
        return length_message
    msg = _SHORTER_MESSAGES.get(etype, err["msg"])
    for prefix in _VALIDATOR_PREFIXES:
        msg = msg.removeprefix(prefix)
    value = err.get("input")
    shown = _shown(value)
    if shown is None and etype in _SHORTER_MESSAGES:
        shown = "a mapping" if isinstance(value, dict) else "a list"
    if shown is not None and not _SAYS_GOT.search(msg):  # some pydantic messages say "got ..." already
        msg = f"{msg} (got {shown})"
    return msg


def _is_echo(err: ErrorDetails) -> bool:
    """True for a ``too_short`` that only repeats that the container's items failed.

    pydantic checks ``min_length`` on the items that *passed*, so one bad step in the only
    candidate also reports "at least 1 item, not 0" on ``steps`` and on ``candidates``.
    """
    if err["type"] != "too_short":
        return False
    value, ctx = err.get("input"), err.get("ctx") or {}
    min_length = ctx.get("min_length")
    return isinstance(value, dict | list | tuple) and isinstance(min_length, int) and len(value) >= min_length


def _pos_at(marks: dict[Loc, _Marks], loc: Loc, *, key: bool = False) -> _Pos:
    """Mark of ``loc``; falls back to the nearest recorded ancestor (the root always is)."""
    for end in range(len(loc), -1, -1):
        found = marks.get(loc[:end])
        if found is not None:
            if key and end == len(loc) and found.key is not None:
                return found.key
            return found.value
    return _START


def _problem_from(err: ErrorDetails, marks: dict[Loc, _Marks]) -> _Problem:
    loc: Loc = tuple(err["loc"])
    etype = err["type"]
    if etype == "extra_forbidden":
        return _Problem(
            _pos_at(marks, loc, key=True), _dotted(loc), _unknown_key(loc[-1], _allowed_keys(loc[:-1]))
        )
    if etype == "missing":
        return _Problem(_pos_at(marks, loc[:-1]), _dotted(loc), f"missing required field {loc[-1]!r}")
    if loc and loc[-1] == "[key]":  # the mapping key itself is invalid, e.g. an unknown gate metric
        key_loc = loc[:-1]
        pos = _pos_at(marks, key_loc, key=True)
        allowed = _allowed_keys(key_loc[:-1])
        if etype == "literal_error" and allowed:
            return _Problem(pos, _dotted(key_loc), _unknown_key(key_loc[-1], allowed))
        return _Problem(pos, _dotted(key_loc), f"invalid key: {_message(err)}")
    return _Problem(_pos_at(marks, loc), _dotted(loc), _message(err))


def _yaml_problem(exc: yaml.YAMLError, text: str) -> _Problem:
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.reader.ReaderError):  # a bad character: only a character offset is known
        before = text[: exc.position]
        pos = _Pos(before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)
        return _Problem(pos, "yaml", f"{exc.reason} (#x{exc.character:04x})")
    if mark is None:
        return _Problem(_START, "yaml", str(exc))
    message = str(getattr(exc, "problem", None) or exc)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        # The problem mark is where the parser gave up; the context marks what was left open.
        at = _Pos.of(context_mark)
        message = f"{message} ({context} at line {at.line}, column {at.col})"
    return _Problem(_Pos.of(mark), "yaml", message)


def _top_level(value: object) -> str:
    shown = _shown(value)
    return f"the top level must be a mapping (got {shown if shown is not None else 'a list'})"


# -------------------------------------------------------------------------------------- public
def load_spec_text(text: str, filename: str = "<string>") -> PipelinesFile:
    """Parse and validate a ``pipelines.yaml`` document given as text.

    Raises ``SpecError`` listing every problem as ``FILE:LINE:COL: field.path: message``,
    sorted by position, where ``FILE`` is ``filename``.
    """
    return _validated(text, filename)[0]


def _validated(text: str, filename: str) -> tuple[PipelinesFile, dict[Loc, _Marks]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        _raise([_yaml_problem(exc, text)], filename, exc)
    if root is None:
        _raise(
            [_Problem(_START, "file", "empty; expected a mapping with 'version' and 'pipelines'")], filename
        )

    builder = _Builder()
    data = builder.build(root, (), None)
    problems = list(builder.problems)
    if not isinstance(data, dict):
        problems.append(_Problem(_Pos.of(root.start_mark), _ROOT, _top_level(data)))
        _raise(problems, filename)
    try:
        spec = PipelinesFile.model_validate(data)
    except ValidationError as exc:
        errors = [err for err in exc.errors() if not _is_echo(err)]
        problems.extend(_problem_from(err, builder.marks) for err in errors)
        _raise(problems, filename, exc)
    # Cross-section checks that need the whole pipeline; each names the node at fault.
    for name, pipeline in spec.pipelines.items():
        for node, field, message in missing_data_roles(pipeline):
            pos = _pos_at(builder.marks, ("pipelines", name, *node), key=True)
            problems.append(_Problem(pos, _dotted(("pipelines", name, field)), message))
    if problems:  # YAML-level problems (duplicate keys, bad tags) even though pydantic passed
        _raise(problems, filename)
    return spec, builder.marks


def load_spec(path: Path) -> PipelinesFile:
    """Read, parse and validate the spec file at ``path``.

    Raises ``SpecError`` with every problem (see ``load_spec_text``); ``FILE`` is ``str(path)``.
    A missing or unreadable file is a ``SpecError`` too, so the CLI reports it the same way.
    """
    filename = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        _raise([_Problem(_START, "file", "not found")], filename, exc)
    except (OSError, UnicodeDecodeError) as exc:
        _raise([_Problem(_START, "file", f"cannot be read: {exc}")], filename, exc)
    return load_spec_text(text, filename)


def spec_warnings(path: Path) -> list[str]:
    """What is valid but probably wrong, as ``FILE:LINE:COL: field.path: warning: message``: gates
    tighter than the evaluation set can resolve (tasks/compression/gate_resolution.py), when the set is
    known before the run (the demo set or a local file). Raises ``SpecError`` like :func:`load_spec`."""
    from lockgate.tasks.compression.gate_resolution import gate_findings

    spec = load_spec(path)  # the file's problems first, reported as load_spec reports them
    _, marks = _validated(path.read_text(encoding="utf-8"), str(path))
    found = []
    for name, pipeline in spec.pipelines.items():
        for node, message in gate_findings(pipeline, path.parent):
            loc = ("pipelines", name, *node)
            found.append(_Problem(_pos_at(marks, loc), _dotted(loc), f"warning: {message}"))
    return [p.render(str(path)) for p in sorted(found, key=lambda p: p.pos)]


def json_schema() -> dict[str, Any]:
    """JSON Schema of ``pipelines.yaml`` (draft 2020-12), for editors and CI; no ``$id``."""
    schema = PipelinesFile.model_json_schema()
    schema["$schema"] = _SCHEMA_DIALECT
    schema["title"] = _SCHEMA_TITLE
    return schema


def json_schema_text() -> str:
    """``json_schema()`` as the committed file holds it: indent 2, sorted keys, trailing newline."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_json_schema(path: Path) -> None:
    """Write ``json_schema_text()`` to ``path`` (normally ``SCHEMA_PATH``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_schema_text(), encoding="utf-8")


def resolved_spec(spec: PipelineSpec) -> dict[str, Any]:
    """The pipeline spec with every default filled in, as JSON-ready data to log with a run."""
    return spec.model_dump(mode="json")
