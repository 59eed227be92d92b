"""What a CSV file of existing codes must look like (ImportCodes), as pure functions.

The file is UTF-8 with or without a byte-order mark, a header row of Coupon
field names, then one code a row (the columns are listed in the proto, on
``ImportCodesRequest``). Each row becomes a ``Coupon`` proto and goes through
the same ``catalog.rules.validate_coupon`` as CreateCoupon, so an imported
code obeys every rule a created one does; a problem is reported as
``line N.column`` with N the file's line (the header is line 1).

Dates: RFC 3339 (``2025-09-24T18:00:00Z``, an offset is converted to UTC) or
a plain ``YYYY-MM-DD`` taken in UTC. A date-only ``valid_until`` counts its
day whole, as the contract's validity rule says: ``2025-09-24`` ends at
``2025-09-25T00:00:00Z``. Money is exact: a decimal amount like ``5.10``
becomes 5,100,000 micros, and more than six decimals is an error, never a
rounding.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from ascribe.attribution.v1 import attribution_pb2

from services.attribution.catalog import rules
from services.attribution.common.coupon_rules import normalize_code
from services.common.errors import InvalidArgument, Violations

T = TypeVar("T")

MAX_IMPORTED_CODES = 100_000
MAX_IMPORT_BYTES = 64 << 20
# A status's details travel in gRPC trailers (8 KB by default): the first
# problems are listed, the message counts the rest.
MAX_REPORTED_VIOLATIONS = 20
LIST_SEPARATOR = ";"

_KINDS: dict[str, attribution_pb2.CouponKind.ValueType] = {
    "general": attribution_pb2.COUPON_KIND_GENERAL,
    "exclusive": attribution_pb2.COUPON_KIND_EXCLUSIVE,
    "unique": attribution_pb2.COUPON_KIND_UNIQUE,
}
_STATUSES: dict[str, attribution_pb2.CouponStatus.ValueType] = {
    "active": attribution_pb2.COUPON_STATUS_ACTIVE,
    "pending": attribution_pb2.COUPON_STATUS_PENDING,
    "rejected": attribution_pb2.COUPON_STATUS_REJECTED,
    "hold": attribution_pb2.COUPON_STATUS_HOLD,
    "paused": attribution_pb2.COUPON_STATUS_PAUSED,
}
_DEVICES: dict[str, attribution_pb2.DeviceType.ValueType] = {
    "mobile": attribution_pb2.DEVICE_TYPE_MOBILE,
    "desktop": attribution_pb2.DEVICE_TYPE_DESKTOP,
    "tablet": attribution_pb2.DEVICE_TYPE_TABLET,
}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_INTEGER = re.compile(r"^[0-9]{1,18}$")
_MICROS_PER_UNIT = Decimal(1_000_000)

COLUMNS = frozenset(
    {
        "code", "kind", "status", "valid_from", "valid_until", "usage_limit", "per_customer_limit",
        "allow_all_affiliates", "affiliate_ids", "countries", "device_types", "channels", "skus",
        "discount_percent_bp", "discount_micros", "discount", "min_order_micros", "min_order",
        "assigned_customer_id",
    }
)


@dataclass(frozen=True)
class ImportRow:
    line: int
    coupon: attribution_pb2.Coupon  # validated; code normalized by convert later


class CellError(ValueError):
    """A cell that cannot be read as its column's type; the message says what is expected."""


def parse_csv(data: bytes, campaign_id: str) -> list[ImportRow]:
    """Every row of the file as a validated Coupon, or InvalidArgument naming each bad line and column.

    Codes repeated within the file (whatever their case) are reported at the
    repeat, naming the first line. Checks against what the campaign already
    has are the store's.
    """
    v = Violations()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidArgument.one("csv", f"not UTF-8 (byte {error.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise InvalidArgument.one("line 1", f"not CSV: {error}") from None
    if header is None or not any(cell.strip() for cell in header):
        raise InvalidArgument.one("csv", "empty file: a header row naming the columns comes first (code, ...)")
    names = [cell.strip().lower() for cell in header]
    for i, name in enumerate(names):
        if name not in COLUMNS:
            v.add(f"line 1.{name or i + 1}", f"unknown column; known: {', '.join(sorted(COLUMNS))}")
        elif names.index(name) != i:
            v.add(f"line 1.{name}", "column named twice")
    if "code" not in names:
        v.add("line 1.code", "the header needs a code column")
    v.raise_if_any()

    rows: list[ImportRow] = []
    first_line: dict[str, int] = {}
    customer_line: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    for line, cells in _records(reader, problems):
        if not any(cell.strip() for cell in cells):
            continue  # a blank line, e.g. the file's last
        if len(cells) != len(names):
            problems.append((f"line {line}", f"{len(cells)} cells for {len(names)} columns"))
            continue
        if len(rows) >= MAX_IMPORTED_CODES:
            problems.append(("csv", f"more than {MAX_IMPORTED_CODES:,} codes: split the file"))
            break
        row_problems: list[tuple[str, str]] = []
        coupon = _coupon(dict(zip(names, cells, strict=True)), campaign_id, line, row_problems)
        try:
            rules.validate_coupon(coupon, field=f"line {line}")
        except InvalidArgument as error:
            # A cell that could not be read was left unset: its column is
            # already reported, whatever validation says about the gap.
            unread = {field for field, _ in row_problems}
            row_problems.extend(v for v in error.violations if v[0] not in unread)
        code = normalize_code(coupon.code)
        if code and code in first_line:
            row_problems.append((f"line {line}.code", f"{code} is already on line {first_line[code]}"))
        elif code:
            first_line[code] = line
        customer = coupon.assigned_customer_id
        if customer and customer in customer_line:
            row_problems.append(
                (f"line {line}.assigned_customer_id", f"one code per customer; also on line {customer_line[customer]}")
            )
        elif customer:
            customer_line[customer] = line
        if row_problems:
            problems.extend(row_problems)
        else:
            rows.append(ImportRow(line, coupon))
    raise_violations(problems)
    if not rows:
        raise InvalidArgument.one("csv", "no codes: the file has a header and no rows")
    return rows


def raise_violations(problems: list[tuple[str, str]]) -> None:
    """InvalidArgument with the first problems listed and the count of the rest."""
    if not problems:
        return
    shown = problems[:MAX_REPORTED_VIOLATIONS]
    if len(problems) > len(shown):
        shown.append(("csv", f"and {len(problems) - len(shown)} more problems; nothing was imported"))
    raise InvalidArgument(shown)


def _records(reader: Any, problems: list[tuple[str, str]]) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of each record; the line is where the record starts (a quoted cell may span lines)."""
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            problems.append((f"line {line}", f"not CSV: {error}"))
            return
        yield line, cells
        line = reader.line_num + 1


def _coupon(
    cells: dict[str, str], campaign_id: str, line: int, problems: list[tuple[str, str]]
) -> attribution_pb2.Coupon:
    def cell(column: str, parse: Callable[[str], T]) -> T | None:
        raw = cells.get(column, "").strip()
        if not raw:
            return None
        try:
            return parse(raw)
        except CellError as error:
            problems.append((f"line {line}.{column}", str(error)))
            return None

    coupon = attribution_pb2.Coupon(
        campaign_id=campaign_id,
        code=cells.get("code", "").strip(),
        assigned_customer_id=cells.get("assigned_customer_id", "").strip(),
    )
    if (kind := cell("kind", _word(_KINDS))) is not None:
        coupon.kind = kind
    if (status := cell("status", _word(_STATUSES))) is not None:
        coupon.status = status
    if (valid_from := cell("valid_from", lambda raw: parse_time(raw, end_of_day=False))) is not None:
        coupon.valid_from.FromDatetime(valid_from)
    if (valid_until := cell("valid_until", lambda raw: parse_time(raw, end_of_day=True))) is not None:
        coupon.valid_until.FromDatetime(valid_until)
    for column in ("usage_limit", "per_customer_limit", "discount_percent_bp", "discount_micros", "min_order_micros"):
        if (number := cell(column, parse_integer)) is not None:
            setattr(coupon, column, number)
    for column, target in (("discount", "discount_micros"), ("min_order", "min_order_micros")):
        if cells.get(column, "").strip() and cells.get(target, "").strip():
            problems.append((f"line {line}.{column}", f"set {column} or {target}, not both"))
        elif (micros := cell(column, parse_micros)) is not None:
            setattr(coupon, target, micros)
    if (allow_all := cell("allow_all_affiliates", _word(_BOOLEANS))) is not None:
        coupon.allow_all_affiliates = allow_all
    for column in ("affiliate_ids", "countries", "channels", "skus"):
        getattr(coupon, column).extend(cell(column, split_list) or [])
    parse_device = _word(_DEVICES)
    coupon.device_types.extend(cell("device_types", lambda raw: [parse_device(d) for d in split_list(raw)]) or [])
    return coupon


def _word(words: Mapping[str, T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = words.get(raw.strip().lower())
        if value is None:
            raise CellError(f"one of {', '.join(words)}")
        return value

    return parse


def parse_time(raw: str, *, end_of_day: bool) -> datetime:
    """RFC 3339 or YYYY-MM-DD (UTC); a date-only end is the start of the next day."""
    raw = raw.strip()
    if _DATE_ONLY.fullmatch(raw):
        try:
            day = date.fromisoformat(raw)
        except ValueError:
            raise CellError(f"{raw!r} is not a calendar date") from None
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return start + timedelta(days=1) if end_of_day else start
    if not _RFC3339.fullmatch(raw):
        raise CellError("RFC 3339 (2025-09-24T18:00:00Z) or YYYY-MM-DD")
    text = raw.replace("t", "T").replace(" ", "T").replace("z", "Z").replace("Z", "+00:00")
    # Python keeps microseconds: more digits would round silently.
    head, dot, rest = text.partition(".")
    if dot:
        digits = re.match(r"\d+", rest)
        assert digits is not None
        if len(digits.group()) > 6 and digits.group()[6:].strip("0"):
            raise CellError("at most microsecond precision")
        text = head + "." + digits.group()[:6].ljust(6, "0") + rest[digits.end() :]
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        raise CellError(f"{raw!r} is not a valid time") from None


def parse_integer(raw: str) -> int:
    if not _INTEGER.fullmatch(raw.strip()):
        raise CellError("a whole number, 0 or more")
    return int(raw)


def parse_micros(raw: str) -> int:
    """A decimal amount (5.10) as exact micros; never rounded."""
    try:
        amount = Decimal(raw.strip())
    except InvalidOperation:
        raise CellError("a decimal amount such as 5.00") from None
    if not amount.is_finite() or amount < 0:
        raise CellError("a decimal amount such as 5.00, 0 or more")
    micros = amount * _MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise CellError("at most 6 decimals")
    if micros >= 1 << 63:
        raise CellError("too large")
    return int(micros)


def split_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(LIST_SEPARATOR) if item.strip()]
