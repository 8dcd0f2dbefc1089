"""``ucxrpc call`` and ``ucxrpc list``: one call, or reflection, from the command line."""

from __future__ import annotations

import difflib
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import (
    Client,
    Manager,
    MethodInfo,
    MethodNotFound,
    Priority,
    ProtocolError,
    RpcError,
    ServerDescription,
    Unavailable,
)
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
    "call_method",
    "connect",
    "describe_table",
    "list_methods",
    "method_kind",
    "methods_table",
    "narrow_table",
    "no_answer",
    "not_ucxrpc",
    "open_client",
    "parse_arg",
    "parse_metadata",
    "parse_priority",
    "print_methods",
    "print_value",
    "type_name",
]


@asynccontextmanager
async def connect(address: str, *, connect_timeout: float | None = None) -> AsyncIterator[Client]:
    """A manager and a client connected to ``HOST:PORT``, both closed on exit.

    Args:
        address: ``HOST:PORT``.
        connect_timeout: Seconds to wait for the connection (default
            ``UCXRPC_CONNECT_TIMEOUT``, 10).

    Raises:
        CliError: ``address`` is malformed, or the peer does not speak ucxrpc or does
            not answer in time.
        Unavailable: Nothing listens there.
    """
    parse_address(address)  # a malformed address fails before UCX starts
    async with Manager(load_config(connect_timeout=connect_timeout)) as manager:
        client = await open_client(manager, address)
        async with client:
            yield client


async def open_client(manager: Manager, address: str) -> Client:
    """Connect ``manager`` to ``HOST:PORT`` within its ``config.connect_timeout``.

    Raises:
        CliError: ``address`` is malformed, or the peer does not speak ucxrpc or does
            not answer in time.
        MethodNotFound: The peer is a messaging endpoint, not an RPC server.
        Unavailable: Nothing listens there.
    """
    host, port = parse_address(address)
    limit = float(manager.config.connect_timeout)
    start = time.monotonic()
    try:
        return await manager.connect(host, port, timeout=limit)
    except ProtocolError as exc:
        raise CliError(not_ucxrpc(address, exc)) from None
    except Unavailable:
        if time.monotonic() - start >= 0.9 * limit:
            raise CliError(no_answer(address, limit)) from None
        raise


def not_ucxrpc(address: str, exc: RpcError) -> str:
    """What to say when the peer at ``address`` sent something that is not a hello."""
    return f"{address} does not speak ucxrpc: its answer is not a ucxrpc hello ({exc.message})"


def no_answer(address: str, limit: float) -> str:
    """What to say when the peer at ``address`` did not finish the handshake in time."""
    return (
        f"no ucxrpc answer from {address} within {limit:g} s: is a ucxrpc server "
        "listening there? (--connect-timeout sets the wait)"
    )


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


def parse_arg(text: str, what: str = "argument") -> Any:
    """One positional argument: JSON when it parses as JSON, else the string itself.

    Raises:
        CliError: ``text`` looks like JSON (starts with ``{``, ``[`` or ``"``) but is
            not valid JSON; the message has the parser's error and position.
    """
    try:
        return json.loads(text)
    except ValueError as exc:
        # A typo in a JSON argument must not turn it into a string silently.
        if text.lstrip()[:1] in ("{", "[", '"'):
            raise CliError(f"{what} {text!r} is not valid JSON: {exc}") from None
        return text


def build_arguments(
    args: Sequence[str], json_text: str | None, option: str = "--json"
) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments from the command line.

    Each positional argument is JSON when it parses as JSON and a string otherwise
    (one that looks like JSON must be valid JSON); ``--json`` holds an object (keyword
    arguments) or an array (positional ones); ``option`` names it in errors.

    Raises:
        CliError: An argument or ``--json`` is not valid JSON, ``--json`` is not an
            object or array, or an array given together with positional arguments.
    """
    positional = [parse_arg(a, f"argument {i}") for i, a in enumerate(args, 1)]
    if json_text is None:
        return positional, {}
    value = parse_json_arg(json_text, option)
    if isinstance(value, dict):
        return positional, value
    if isinstance(value, list):
        if positional:
            raise CliError(f"give positional arguments either as ARGS or as a {option} array")
        return value, {}
    raise CliError(
        f"{option} must be an object (keyword arguments) or an array (positional arguments)"
    )


async def method_kind(
    client: Client, method: str, timeout: float | None
) -> tuple[str | None, list[str]]:
    """The method's kind per reflection (None if unknown) and the server's method names."""
    try:
        description = await client.describe(timeout=timeout)
    except RpcError:
        return None, []  # a server that does not describe itself: just call
    info = description.get(method)
    return (None if info is None else info.kind), description.names


def print_value(value: Any, *, compact: bool = False) -> None:
    """Print a result (or a stream item) as JSON: ``null`` for None, bytes as text."""
    console.print_json(data=jsonable(value), indent=None if compact else 2)


async def call_method(
    client: Client,
    method: str,
    positional: Sequence[Any],
    keywords: dict[str, Any],
    *,
    kind: str | None,
    names: Sequence[str],
    timeout: float | None,
    priority: int | None,
    metadata: dict[str, str],
    stream: bool = False,
) -> None:
    """Call ``method`` and print the result, or each item of a stream on its own line.

    Args:
        client: The connected client.
        method: The method's name.
        positional: Positional arguments.
        keywords: Keyword arguments.
        kind: The method's kind per reflection (None: unknown, call it as unary).
        names: The server's method names (for a "did you mean").
        timeout: The call's deadline in seconds.
        priority: The call's priority.
        metadata: Request metadata.
        stream: Call it as a server stream whatever reflection says.

    Raises:
        CliError: The method takes a stream of items, or does not exist.
        RpcError: The call failed.
    """
    if kind in ("client_stream", "bidi"):
        raise CliError(
            f"{method!r} takes a stream of items ({kind}): call it from Python "
            "with an async iterable; `ucxrpc call` sends single values only"
        )
    try:
        if stream or kind == "stream":
            items = client.stream(
                method, *positional, timeout=timeout, priority=priority, metadata=metadata,
                **keywords,
            )  # fmt: skip
            async with items:
                async for item in items:
                    print_value(item, compact=True)
            return
        result = await client.call(
            method, *positional, timeout=timeout, priority=priority, metadata=metadata,
            **keywords,
        )  # fmt: skip
    except MethodNotFound as exc:
        close = difflib.get_close_matches(method, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CliError(f"{exc}{hint}") from None
    print_value(result)


async def call(
    address: str,
    method: str,
    args: Sequence[str],
    *,
    json_text: str | None,
    timeout: float | None,
    priority: str | None,
    metadata: Sequence[str],
    connect_timeout: float | None = None,
) -> None:
    """Call ``method`` and print its result as JSON (a stream: one item per line)."""
    positional, keywords = build_arguments(args, json_text)
    level = parse_priority(priority)
    md = parse_metadata(metadata)
    async with connect(address, connect_timeout=connect_timeout) as client:
        kind, names = await method_kind(client, method, timeout)
        await call_method(
            client, method, positional, keywords, kind=kind, names=names, timeout=timeout,
            priority=level, metadata=md,
        )  # fmt: skip


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


def _attributes(m: MethodInfo) -> list[str]:
    """What sets the method apart from the defaults (for the narrow table)."""
    out: list[str] = [] if m.kind == "unary" else [m.kind]
    if m.priority != Priority.NORMAL:
        out.append(f"priority {_priority(m.priority)}")
    if m.timeout is not None:
        out.append(f"timeout {m.timeout:g} s")
    if m.idempotent:
        out.append("idempotent")
    return out


def _first_line(doc: str) -> str:
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def _result(m: MethodInfo) -> str:
    result = type_name(m.result)
    return f"stream of {result}" if m.kind in ("stream", "bidi") else result


def describe_table(description: ServerDescription) -> Table:
    """The methods of a server as a table, one column per attribute (``--wide``)."""
    table = Table()
    table.add_column("method", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("priority", no_wrap=True)
    table.add_column("timeout", no_wrap=True)
    table.add_column("idempotent", no_wrap=True)
    table.add_column("parameters")
    table.add_column("result")
    table.add_column("doc")
    for m in description.methods:
        cells = (
            m.name,
            m.kind,
            _priority(m.priority),
            "-" if m.timeout is None else f"{m.timeout:g} s",
            "yes" if m.idempotent else "no",
            _parameters(m),
            _result(m),
            _first_line(m.doc),
        )
        # Text, not str: type names like list[int] must not be read as rich markup.
        table.add_row(*(Text(c) for c in cells))
    return table


def narrow_table(description: ServerDescription) -> Table:
    """The methods as a two-column table that fits a narrow terminal.

    Each method shows its signature, the first line of its docstring (cut to the
    width) and, when they differ from the defaults, its kind, priority, timeout and
    idempotence.
    """
    table = Table(show_lines=False, expand=False)
    table.add_column("method", no_wrap=True, style="bold")
    table.add_column("signature / doc", overflow="fold")
    for m in description.methods:
        cell = Text(f"({_parameters(m)}) -> {_result(m)}", overflow="fold")
        doc = _first_line(m.doc)
        if doc:
            cell.append("\n")
            cell.append(Text(doc, style="dim"))
        attrs = _attributes(m)
        if attrs:
            cell.append("\n")
            cell.append(Text(", ".join(attrs), style="italic"))
        table.add_row(Text(m.name), cell)
    return table


def methods_table(description: ServerDescription, out: Console, *, wide: bool) -> Table:
    """The full table when it fits ``out`` (or ``wide``), else the narrow one."""
    from rich.measure import Measurement

    full = describe_table(description)
    if wide:
        return full
    need = Measurement.get(out, out.options.update_width(10_000), full).maximum
    return full if need <= out.width else narrow_table(description)


def print_methods(description: ServerDescription, title: str, *, wide: bool, schemas: bool) -> None:
    """Print the server's methods: a table that fits the terminal, or ``wide``."""
    # Piped output has no terminal width: unless COLUMNS says otherwise, a wide console
    # keeps each method on one row for grep and friends.
    piped = not console.is_terminal and "COLUMNS" not in os.environ
    out = console
    if wide or piped:
        from rich.measure import Measurement

        full = describe_table(description)
        need = Measurement.get(console, console.options.update_width(10_000), full).maximum
        out = Console(width=max(need, console.width), highlight=False, no_color=console.no_color)
        wide = True
    out.print(Text(title, style="bold"))
    out.print(methods_table(description, out, wide=wide))
    if schemas:
        for m in description.methods:
            out.rule(Text(m.name), style="dim")
            out.print_json(data={"params": m.params, "result": m.result})


async def list_methods(
    address: str,
    *,
    schemas: bool,
    as_json: bool,
    timeout: float,
    wide: bool = False,
    connect_timeout: float | None = None,
) -> None:
    """Print the methods the server at ``address`` serves (reflection)."""
    async with connect(address, connect_timeout=connect_timeout) as client:
        description = await client.describe(timeout=timeout)
    if as_json:
        console.print_json(data=description.model_dump(mode="json"))
        return
    print_methods(
        description, f"{address} (ucxrpc {description.version})", wide=wide, schemas=schemas
    )
