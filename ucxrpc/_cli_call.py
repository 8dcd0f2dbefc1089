"""``ucxrpc call`` and ``ucxrpc list``: one call, or reflection, from the command line."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import Client, Manager, MethodInfo, MethodNotFound, Priority, RpcError, ServerDescription
from ._cli_common import (
    CliError,
    console,
    jsonable,
    load_config,
    parse_address,
    parse_json_arg,
)

__all__ = [
    "build_arguments",
    "call",
    "connect",
    "describe_table",
    "list_methods",
    "parse_metadata",
    "parse_priority",
    "type_name",
]


@asynccontextmanager
async def connect(address: str) -> AsyncIterator[Client]:
    """A manager and a client connected to ``HOST:PORT``, both closed on exit.

    Raises:
        CliError: ``address`` is malformed.
        Unavailable: Nothing answers there.
    """
    host, port = parse_address(address)
    async with Manager(load_config()) as manager:
        client = await manager.connect(host, port)
        async with client:
            yield client


def parse_priority(text: str | None) -> int | None:
    """``high``, ``normal``, ``low`` or an integer.

    Raises:
        CliError: Anything else.
    """
    if text is None:
        return None
    try:
        return Priority[text.strip().upper()]
    except KeyError:
        pass
    try:
        return int(text)
    except ValueError:
        raise CliError(f"priority must be high, normal, low or an integer, got {text!r}") from None


def parse_metadata(items: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict.

    Raises:
        CliError: An item has no ``=`` or an empty key.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"metadata must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_arguments(args: Sequence[str], json_text: str | None) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments from the command line.

    Each positional argument is JSON when it parses as JSON and a string otherwise;
    ``--json`` holds an object (keyword arguments) or an array (positional ones).

    Raises:
        CliError: ``--json`` is not valid JSON, not an object or array, or an array
            given together with positional arguments.
    """
    positional = [_arg(a) for a in args]
    if json_text is None:
        return positional, {}
    value = parse_json_arg(json_text, "--json")
    if isinstance(value, dict):
        return positional, value
    if isinstance(value, list):
        if positional:
            raise CliError("give positional arguments either as ARGS or as a --json array")
        return value, {}
    raise CliError(
        "--json must be an object (keyword arguments) or an array (positional arguments)"
    )


async def _kind(client: Client, method: str, timeout: float | None) -> tuple[str | None, list[str]]:
    """The method's kind per reflection (None if unknown) and the server's method names."""
    try:
        description = await client.describe(timeout=timeout)
    except RpcError:
        return None, []  # a server that does not describe itself: just call
    info = description.get(method)
    return (None if info is None else info.kind), description.names


async def call(
    address: str,
    method: str,
    args: Sequence[str],
    *,
    json_text: str | None,
    timeout: float | None,
    priority: str | None,
    metadata: Sequence[str],
) -> None:
    """Call ``method`` and print its result as JSON (a stream: one item per line)."""
    positional, keywords = build_arguments(args, json_text)
    level = parse_priority(priority)
    md = parse_metadata(metadata)
    async with connect(address) as client:
        kind, names = await _kind(client, method, timeout)
        if kind in ("client_stream", "bidi"):
            raise CliError(
                f"{method!r} takes a stream of items ({kind}): call it from Python "
                "with an async iterable; `ucxrpc call` sends single values only"
            )
        try:
            if kind == "stream":
                stream = client.stream(
                    method, *positional, timeout=timeout, priority=level, metadata=md, **keywords
                )
                async with stream:
                    async for item in stream:
                        console.print_json(data=jsonable(item), indent=None)
                return
            result = await client.call(
                method, *positional, timeout=timeout, priority=level, metadata=md, **keywords
            )
        except MethodNotFound as exc:
            close = difflib.get_close_matches(method, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CliError(f"{exc}{hint}") from None
    console.print_json(data=jsonable(result))


# -- list --------------------------------------------------------------------------------------

_SIMPLE = {
    "string": "str",
    "integer": "int",
    "number": "float",
    "boolean": "bool",
    "null": "None",
    "object": "dict",
    "array": "list",
}


def type_name(schema: dict[str, Any]) -> str:
    """A Python-like type name for a JSON Schema (``list[int]``, ``Model | None``)."""
    if not schema:
        return "Any"
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(type_name(s) for s in schema[key])
    if "enum" in schema:
        return "Literal[" + ", ".join(json.dumps(v) for v in schema["enum"]) + "]"
    if "const" in schema:
        return f"Literal[{json.dumps(schema['const'])}]"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(type_name({**schema, "type": k}) for k in kind)
    if kind == "string" and schema.get("format") in ("binary", "base64"):
        return "bytes"
    if kind == "array":
        if "prefixItems" in schema:
            return "tuple[" + ", ".join(type_name(s) for s in schema["prefixItems"]) + "]"
        items = schema.get("items")
        return f"list[{type_name(items)}]" if isinstance(items, dict) else "list"
    if kind == "object":
        if "title" in schema and "properties" in schema:
            return str(schema["title"])
        extra = schema.get("additionalProperties")
        return f"dict[str, {type_name(extra)}]" if isinstance(extra, dict) else "dict"
    if isinstance(kind, str):
        return _SIMPLE.get(kind, kind)
    if "description" in schema:
        return str(schema["description"])
    return "Any"


def _parameters(info: MethodInfo) -> str:
    props: dict[str, Any] = info.params.get("properties", {})
    required = set(info.params.get("required", []))
    out = []
    for name, schema in props.items():
        item = type_name(schema)
        text = f"{name}: stream of {item}" if schema.get("x-stream") else f"{name}: {item}"
        if name not in required and "default" in schema:
            text += f" = {json.dumps(schema['default'])}"
        out.append(text)
    return ", ".join(out)


def _priority(value: int) -> str:
    try:
        return Priority(value).name.lower()
    except ValueError:
        return str(value)


def describe_table(description: ServerDescription) -> Table:
    """The methods of a server as a table."""
    table = Table()
    table.add_column("method", no_wrap=True, style="bold")
    table.add_column("kind")
    table.add_column("priority")
    table.add_column("timeout")
    table.add_column("idempotent")
    table.add_column("parameters")
    table.add_column("result")
    table.add_column("doc")
    for m in description.methods:
        doc = m.doc.strip().splitlines()[0] if m.doc.strip() else ""
        result = type_name(m.result)
        cells = (
            m.name,
            m.kind,
            _priority(m.priority),
            "-" if m.timeout is None else f"{m.timeout:g} s",
            "yes" if m.idempotent else "no",
            _parameters(m),
            f"stream of {result}" if m.kind in ("stream", "bidi") else result,
            doc,
        )
        # Text, not str: type names like list[int] must not be read as rich markup.
        table.add_row(*(Text(c) for c in cells))
    return table


async def list_methods(address: str, *, schemas: bool, as_json: bool, timeout: float) -> None:
    """Print the methods the server at ``address`` serves (reflection)."""
    async with connect(address) as client:
        description = await client.describe(timeout=timeout)
    if as_json:
        console.print_json(data=description.model_dump(mode="json"))
        return
    # Piped output has no terminal width: unless COLUMNS says otherwise, a wide console
    # keeps each method on one row for grep and friends.
    wide = not console.is_terminal and "COLUMNS" not in os.environ
    out = Console(width=200, highlight=False) if wide else console
    out.print(Text(f"{address} (ucxrpc {description.version})", style="bold"))
    out.print(describe_table(description))
    if schemas:
        for m in description.methods:
            out.rule(m.name, style="dim")
            out.print_json(data={"params": m.params, "result": m.result})
