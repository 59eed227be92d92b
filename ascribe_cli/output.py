"""Records on stdout as a table, JSON or CSV; nothing else ever goes to stdout.

- ``json``: protobuf's JSON mapping with the proto field names
  (``preserving_proto_field_name``) and every field without presence printed,
  so each object has the same keys: int64 values, money in micros among them,
  are JSON strings (``"payout_micros": "5000000"``), as the proto3 JSON mapping
  writes them (a JSON number cannot hold every int64 exactly); enums are their
  full names (``"COUPON_STATUS_ACTIVE"``); times RFC 3339 in UTC. A list is
  one array, a single record one object.
- ``csv``: a header row of the message's proto field names, then one row per
  record with the JSON values: lists of words joined by ``;``, nested
  messages (a conversion's history) as compact JSON.
- ``table``: for people. Enums as words, money as decimals (the column named
  without ``_micros``), basis points as percentages, lists joined by commas.
  Text from the server is never read as rich markup.

Lists are written while their pages arrive, so a million codes do not have to
fit in memory; a list that fails half way leaves an unfinished JSON array (and
the exit code 1).
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ascribe_cli.values import MICROS, enum_word

if TYPE_CHECKING:
    from google._upb import _message as upb

    # A message's DESCRIPTOR is typed as either implementation's.
    MessageDescriptor = Descriptor | upb.Descriptor
    FieldDesc = FieldDescriptor | upb.FieldDescriptor

# How an unset optional field reads in a table, where empty would mislead.
UNSET_TEXT = {"remaining": "unlimited"}


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def stdout() -> TextIO:
    # Looked up at each call: typer's test runner swaps sys.stdout per invocation.
    return sys.stdout


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)


def as_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON of ``message``, keys in the proto's field order (json_format puts defaults last)."""
    return _in_field_order(
        message.DESCRIPTOR,
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
    )


def _in_field_order(descriptor: MessageDescriptor, values: dict[str, Any]) -> dict[str, Any]:
    ordered: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in values:
            continue
        value = values[field.name]
        nested = field.message_type
        # Our own messages nest (a conversion's history); well-known types are strings here.
        if nested is not None and nested.full_name.startswith("ascribe."):
            if isinstance(value, dict):
                value = _in_field_order(nested, value)
            elif isinstance(value, list):
                value = [_in_field_order(nested, item) if isinstance(item, dict) else item for item in value]
        ordered[field.name] = value
    return ordered


def table_console(out: TextIO) -> Console:
    # A table piped to a file or a pager keeps its natural width instead of
    # folding every cell at rich's default 80 columns.
    return Console(file=out, highlight=False, width=None if out.isatty() else 1000)


# ---------------------------------------------------------------- json and csv


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        if all(isinstance(item, str | int | float) and not isinstance(item, bool) for item in value):
            return ";".join(str(item) for item in value)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def field_names(descriptor: MessageDescriptor) -> list[str]:
    return [f.name for f in descriptor.fields]


# ---------------------------------------------------------------- tables


def money(micros: int) -> str:
    """``49_900_000`` -> ``49.90``: at least two decimals, more only when the value has them."""
    amount = (Decimal(micros) / MICROS).normalize()
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        amount = amount.quantize(Decimal("0.01"))
    return f"{amount:f}"


def percent(basis_points: int) -> str:
    """``1250`` -> ``12.5%``."""
    return f"{(Decimal(basis_points) / 100).normalize():f}%"


def column_title(name: str) -> str:
    if name.endswith("_micros"):
        return name.removesuffix("_micros")
    if name.endswith("_bp"):
        return name.removesuffix("_bp")
    return name


def _scalar_text(descriptor: FieldDesc, value: Any) -> str:
    if descriptor.enum_type is not None:
        return enum_word(descriptor.enum_type, int(value))
    if isinstance(value, Timestamp):
        return value.ToJsonString() if (value.seconds or value.nanos) else ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if descriptor.name.endswith("_micros"):
        return money(int(value))
    if descriptor.name.endswith("_bp"):
        return percent(int(value))
    return str(value)


def human(message: Message, name: str) -> str:
    """The field ``name`` of ``message`` as a table shows it."""
    descriptor = message.DESCRIPTOR.fields_by_name[name]
    value = getattr(message, name)
    if descriptor.is_repeated:
        return ", ".join(_scalar_text(descriptor, item) for item in value)
    if descriptor.has_presence and not message.HasField(name):
        return UNSET_TEXT.get(name, "")
    return _scalar_text(descriptor, value)


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in columns:
        table.add_column(column_title(name), overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _nested_lists(message: Message) -> dict[str, MessageDescriptor]:
    """Repeated fields of our own messages (a conversion's history): a table each, after the record's."""
    return {
        f.name: f.message_type for f in message.DESCRIPTOR.fields
        if f.is_repeated and f.message_type is not None and f.message_type.full_name.startswith("ascribe.")
    }


# ---------------------------------------------------------------- writers


def write_one(message: Message, fmt: Format) -> None:
    """One record (``show``, ``create``, ``update``)."""
    out = stdout()
    if fmt is Format.json:
        out.write(json.dumps(as_dict(message), indent=2, ensure_ascii=False) + "\n")
    elif fmt is Format.csv:
        write_csv([message], message.DESCRIPTOR, out)
    else:
        nested = _nested_lists(message)
        console = table_console(out)
        table = Table(show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for field in message.DESCRIPTOR.fields:
            if field.name not in nested:
                table.add_row(Text(column_title(field.name)), Text(human(message, field.name)))
        console.print(table)
        for name, descriptor in nested.items():
            columns = field_names(descriptor)
            rows = ([human(item, column) for column in columns] for item in getattr(message, name))
            console.print(_table(columns, rows, title=name))


def write_csv(messages: Iterable[Message], descriptor: MessageDescriptor, out: TextIO) -> int:
    names = field_names(descriptor)
    writer = csv.writer(out, lineterminator="\n")
    records = _started(messages)
    writer.writerow(names)
    count = 0
    for message in records:
        values = as_dict(message)
        writer.writerow([csv_cell(values.get(name)) for name in names])
        count += 1
    return count


def write_list(messages: Iterable[Message], descriptor: MessageDescriptor, fmt: Format, columns: Sequence[str]) -> int:
    """Every record of a list as it arrives; ``columns`` are the table's. Returns how many."""
    out = stdout()
    if fmt is Format.csv:
        return write_csv(messages, descriptor, out)
    if fmt is Format.json:
        records = _started(messages)
        out.write("[")
        count = 0
        for message in records:
            body = textwrap.indent(json.dumps(as_dict(message), indent=2, ensure_ascii=False), "  ")
            out.write(("\n" if count == 0 else ",\n") + body)
            count += 1
        out.write("\n]\n" if count else "]\n")
        return count
    rows = [[human(message, name) for name in columns] for message in messages]
    table_console(out).print(_table(columns, rows))
    return len(rows)


def _started(messages: Iterable[Message]) -> Iterator[Message]:
    """``messages`` once the first page has answered, so a refused list writes nothing at all."""
    iterator = iter(messages)
    first = next(iterator, None)
    if first is None:
        return iter(())
    return itertools.chain((first,), iterator)
