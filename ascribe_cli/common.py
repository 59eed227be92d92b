"""What every command shares: the connection, the --format option, value parsers and update masks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Generic, TypeVar

import typer
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ascribe_cli import values
from ascribe_cli.client import Client, Tls
from ascribe_cli.output import Format

T = TypeVar("T")
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Target:
    """Where the commands go, from the root options and the environment."""

    addr: str
    token: str | None
    timeout: float | None
    tls: Tls | None = None


def connect(ctx: typer.Context) -> Client:
    target: Target = ctx.obj
    return Client(target.addr, target.token, target.timeout, target.tls)


def parser(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A value parser as typer wants it: a wrong value is a usage error (exit code 2) naming the option."""

    def parse_option(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None

    return parse_option


@dataclass(frozen=True)
class Bound:
    """A validity bound as given: a time, or None for ``none`` (an update removes the bound)."""

    at: Timestamp | None


def _bound(text: str, *, end: bool) -> Bound:
    if text.strip().lower() == "none":
        return Bound(None)
    return Bound(values.instant(text, end=end))


# Parsers of the options; the help texts say what they take.
MONEY = parser(values.money_micros)
PERCENT = parser(values.percent_basis_points)
START = parser(lambda text: _bound(text, end=False))
END = parser(lambda text: _bound(text, end=True))
FROM = parser(lambda text: values.instant(text, end=False))
TO = parser(lambda text: values.instant(text, end=True))

MONEY_HELP = "a decimal amount like 49.90 (stored exactly, as micros)"
PERCENT_HELP = "a percentage like 12.5"
START_HELP = "RFC 3339 (2026-06-01T09:30:00Z) or YYYY-MM-DD (that day 00:00 UTC)"
END_HELP = "RFC 3339, or YYYY-MM-DD: the whole day counts (it ends at the next day's 00:00 UTC)"

FormatOption = Annotated[
    Format, typer.Option("--format", "-f", help="table for people; json or csv for scripts (stdout holds only them)")
]
PageSizeOption = Annotated[
    int, typer.Option("--page-size", min=1, max=1000, help="records per request; every page is read")
]


@dataclass
class Changes(Generic[M]):
    """A new record or an update: the fields set on ``message``, and the mask that names them."""

    message: M
    paths: list[str] = field(default_factory=list)

    def set(self, name: str, value: Any) -> None:
        """Sets ``name`` when an option gave a value (None: the option was not given)."""
        if value is None:
            return
        if isinstance(value, Bound):
            if value.at is None:
                self.message.ClearField(name)
            else:
                getattr(self.message, name).CopyFrom(value.at)
        elif isinstance(value, Message):
            getattr(self.message, name).CopyFrom(value)
        elif isinstance(value, list):
            field_value = getattr(self.message, name)
            del field_value[:]
            field_value.extend(values.enum_number(item) if isinstance(item, Enum) else item for item in value)
        elif isinstance(value, Enum):
            setattr(self.message, name, values.enum_number(value))
        else:
            setattr(self.message, name, value)
        if name not in self.paths:
            self.paths.append(name)

    def require_some(self) -> None:
        if not self.paths:
            raise typer.BadParameter("nothing to change: give at least one option (see --help)")
