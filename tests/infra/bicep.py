"""Offline reading of the Bicep templates: tree-sitter-bicep parse trees and a few accessors for the infra tests.

The grammar (PyPI `tree-sitter-bicep` 1.1.0) knows `.bicep` files but not the parameter-file dialect: in a
`.bicepparam` file a parameter is assigned without a type (`param name = value`), which the grammar reads as an
error. `lower_bicepparam` therefore gives each such assignment a placeholder type before parsing; everything else
in the file (the `using` statement, the values, comments) is parsed as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import tree_sitter_bicep
from tree_sitter import Language, Node, Parser, Tree

PARAM_FILE_TYPE = "bicepparam_value"
"""The placeholder type `lower_bicepparam` gives the parameters of a .bicepparam file."""

_PARAM_ASSIGNMENT = re.compile(r"^(\s*param\s+[A-Za-z_][A-Za-z0-9_]*)(\s*=)", re.MULTILINE)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "'": "'", "$": "$"}


@cache
def parser() -> Parser:
    """The Bicep parser (built once)."""
    return Parser(Language(tree_sitter_bicep.language()))


def lower_bicepparam(text: str) -> tuple[str, int]:
    """`param x = v` -> `param x bicepparam_value = v`, so that the Bicep grammar accepts it; returns the count."""
    return _PARAM_ASSIGNMENT.subn(rf"\1 {PARAM_FILE_TYPE}\2", text)


@dataclass(frozen=True)
class Decl:
    """A top-level or nested declaration with the decorators written above it."""

    kind: str
    name: str
    node: Node
    decorators: tuple[Node, ...] = ()
    """The `decorator` nodes written above the declaration."""

    def decorator(self, name: str) -> list[Node] | None:
        """The arguments of decorator `@name(...)`, or None when it is absent."""
        for dec in self.decorators:
            if decorator_name(dec) == name:
                call = _first(dec, "call_expression")
                return call_arguments(call) if call is not None else []
        return None

    def has_decorator(self, name: str) -> bool:
        return self.decorator(name) is not None


@dataclass(frozen=True)
class Param(Decl):
    """`param name type [= default]`."""

    type: str = ""
    default: Node | None = None


@dataclass(frozen=True)
class Resource(Decl):
    """`resource name 'Type@version' [existing] = {...} | if (...) {...} | [for ...: {...}]`."""

    type: str = ""
    api_version: str = ""
    existing: bool = False
    body: Node | None = None
    """The resource's object (inside `if` or `for` where there is one)."""
    loop: Node | None = None
    """The `for_statement` of a resource loop."""
    parent: Resource | None = None

    @property
    def full_type(self) -> str:
        """The type with the parent's prefix for nested child resources (`namespaces/queues`)."""
        if self.parent is not None and "/" not in self.type.split("@")[0].removeprefix("Microsoft."):
            return f"{self.parent.full_type}/{self.type}"
        return self.type

    @property
    def properties(self) -> dict[str, Node]:
        return obj(self.body)


@dataclass(frozen=True)
class Module(Decl):
    """`module name 'path' = {...}`."""

    path: str = ""
    params: dict[str, Node] = field(default_factory=dict)


@dataclass
class BicepFile:
    """One parsed template or parameter file."""

    path: Path
    source: bytes
    tree: Tree
    lowered_params: int = 0
    """How many `param x = v` assignments `lower_bicepparam` rewrote (parameter files only)."""

    @property
    def root(self) -> Node:
        return self.tree.root_node

    def syntax_errors(self) -> list[str]:
        """`line:column: ERROR|MISSING <text>` for every error or missing node in the tree."""
        found: list[str] = []
        for node in walk(self.root):
            if node.type == "ERROR" or node.is_missing:
                kind = f"MISSING {node.type}" if node.is_missing else "ERROR"
                snippet = text(node)[:60].replace("\n", "\\n")
                found.append(f"{self.path}:{node.start_point[0] + 1}:{node.start_point[1] + 1}: {kind} {snippet!r}")
        return found

    def _statements(self) -> Iterator[tuple[Node, tuple[Node, ...]]]:
        """Top-level declarations with the decorators written above them."""
        pending: list[Node] = []
        for child in self.root.named_children:
            if child.type == "comment":
                continue
            if child.type == "decorators":
                pending += [d for d in child.named_children if d.type == "decorator"]
                continue
            yield child, tuple(pending)
            pending = []

    def params(self) -> dict[str, Param]:
        out: dict[str, Param] = {}
        for node, decorators in self._statements():
            if node.type != "parameter_declaration":
                continue
            ident = _first(node, "identifier")
            type_node = _first(node, "type")
            value = _after(node, "=")
            name = text(ident)
            out[name] = Param("param", name, node, decorators, type=text(type_node), default=value)
        return out

    def variables(self) -> dict[str, Node]:
        return {text(_first(n, "identifier")): _after(n, "=") for n, _ in self._statements()
                if n.type == "variable_declaration"}

    def outputs(self) -> dict[str, Node]:
        return {text(_first(n, "identifier")): _after(n, "=") for n, _ in self._statements()
                if n.type == "output_declaration"}

    def resources(self) -> list[Resource]:
        """Every resource, nested child resources included (after their parent)."""
        out: list[Resource] = []
        for node, decorators in self._statements():
            if node.type == "resource_declaration":
                _collect_resources(node, decorators, None, out)
        return out

    def modules(self) -> list[Module]:
        out: list[Module] = []
        for node, decorators in self._statements():
            if node.type != "module_declaration":
                continue
            body, _ = _declaration_body(node)
            out.append(Module("module", text(_first(node, "identifier")), node, decorators,
                              path=string_value(_first(node, "string")) or "", params=obj(obj(body).get("params"))))
        return out

    def using(self) -> str | None:
        """The template a parameter file is for (`using 'main.bicep'`)."""
        for node in self.root.named_children:
            if node.type == "using_statement":
                return string_value(_first(node, "string"))
        return None


def parse_file(path: Path) -> BicepFile:
    """Parse a .bicep or .bicepparam file."""
    raw = path.read_text(encoding="utf-8")
    lowered = 0
    if path.suffix == ".bicepparam":
        raw, lowered = lower_bicepparam(raw)
    source = raw.encode()
    return BicepFile(path, source, parser().parse(source), lowered)


def parse_text(source: str, name: str = "<text>.bicep") -> BicepFile:
    """Parse Bicep source given as text (for tests of the checks themselves)."""
    data = source.encode()
    return BicepFile(Path(name), data, parser().parse(data))


# ------------------------------------------------------------------------------------------------- node helpers


def walk(node: Node) -> Iterator[Node]:
    """`node` and all its descendants, depth first."""
    yield node
    for child in node.children:
        yield from walk(child)


def text(node: Node | None) -> str:
    return node.text.decode() if node is not None and node.text is not None else ""


def obj(node: Node | None) -> dict[str, Node]:
    """The properties of an object literal: key -> value node (nested resources are skipped)."""
    if node is None or node.type != "object":
        return {}
    out: dict[str, Node] = {}
    for prop in node.named_children:
        if prop.type != "object_property" or prop.named_child_count < 2:
            continue
        key_node, value = prop.named_children[0], prop.named_children[-1]
        key = string_value(key_node) if key_node.type == "string" else text(key_node)
        if key is not None:
            out[key] = value
    return out


def string_value(node: Node | None) -> str | None:
    """The value of a string literal without interpolation; None for anything else."""
    if node is None or node.type != "string" or any(c.type == "interpolation" for c in node.children):
        return None
    return template(node)


def template(node: Node) -> str:
    """A string literal with its interpolations kept as `${...}` source text."""
    parts: list[str] = []
    for child in node.children:
        if child.type in ("string_content", "multiline_string_content"):
            parts.append(text(child))
        elif child.type == "escape_sequence":
            raw = text(child)[1:]
            parts.append(_ESCAPES.get(raw, raw))
        elif child.type == "interpolation":
            parts.append(text(child))
    return "".join(parts)


def literal(node: Node | None) -> str | int | bool | None:
    """The Python value of a string/number/boolean/null literal (a negative number is a unary minus)."""
    if node is None:
        raise ValueError("no value")
    if node.type == "string":
        value = string_value(node)
        if value is None:
            raise ValueError(f"not a plain string: {text(node)}")
        return value
    if node.type == "number":
        return int(text(node))
    if node.type == "boolean":
        return text(node) == "true"
    if node.type == "null":
        return None
    raise ValueError(f"not a literal: {node.type} {text(node)}")


def decorator_name(node: Node) -> str:
    call = _first(node, "call_expression")
    return text(call.child_by_field_name("function")) if call is not None else text(node)


def calls(node: Node) -> Iterator[tuple[str, Node]]:
    """(function text, call node) for every call expression under `node` (`a.listKeys()` gives `a.listKeys`)."""
    for n in walk(node):
        if n.type == "call_expression":
            yield text(n.child_by_field_name("function")), n


def call_arguments(node: Node) -> list[Node]:
    args = node.child_by_field_name("arguments")
    return [a for a in args.named_children if a.type != "comment"] if args is not None else []


def _first(node: Node, type_: str) -> Node | None:
    return next((c for c in node.named_children if c.type == type_), None)


def _after(node: Node, token: str) -> Node | None:
    """The named child right after the first `token` child (e.g. the value after `=`)."""
    seen = False
    for child in node.children:
        if seen and child.is_named and child.type != "comment":
            return child
        if child.type == token:
            seen = True
    return None


def _declaration_body(node: Node) -> tuple[Node | None, Node | None]:
    """(object, for_statement) of a resource/module declaration, looking through `if` and `for`."""
    value = _after(node, "=")
    loop = None
    if value is not None and value.type == "for_statement":
        loop = value
        value = value.child_by_field_name("body")
    if value is not None and value.type == "if_statement":
        value = _first(value, "object")
    return (value if value is not None and value.type == "object" else None), loop


def _collect_resources(node: Node, decorators: tuple[Node, ...], parent: Resource | None, out: list[Resource]) -> None:
    strings = [c for c in node.named_children if c.type == "string"]
    type_version = string_value(strings[0]) if strings else ""
    rtype, _, version = (type_version or "").partition("@")
    body, loop = _declaration_body(node)
    res = Resource("resource", text(_first(node, "identifier")), node, decorators, type=rtype, api_version=version,
                   existing=any(c.type == "existing" for c in node.children), body=body, loop=loop, parent=parent)
    out.append(res)
    if body is None:
        return
    for prop in body.named_children:
        if prop.type == "object_property":
            nested = _first(prop, "resource_declaration")
            if nested is not None:
                _collect_resources(nested, (), res, out)
