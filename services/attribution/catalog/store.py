"""Campaigns, affiliates and coupon codes in PostgreSQL.

Every function takes a connection, or a pool (then it borrows a connection
for the call), and returns the records of ``services.attribution.common.models``,
built from rows by ``catalog.rows`` like those of the hot paths.
Codes passed in are already normalized (``coupon_rules.normalize_code``).
Changes that must see the row they change (updates, the usage-limit check
against ``used``) run in one short transaction holding the row lock, so a
concurrent redemption waits for them and is then judged against the result.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal, cast

import asyncpg
import grpc

from services.attribution.catalog.import_rules import raise_violations
from services.attribution.catalog.rows import (
    AFFILIATE_COLUMNS,
    CAMPAIGN_COLUMNS,
    COUPON_COLUMNS,
    affiliate_from_row,
    campaign_from_row,
    coupon_from_row,
)
from services.attribution.common.code_check import CodeShape, sorted_codes, split_block
from services.attribution.common.models import Affiliate, Campaign, Coupon, CouponStatus
from services.common.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound

logger = logging.getLogger(__name__)

# asyncpg ships no type information; a pool or a connection (or a pool's proxy).
Db = Any
Record = Any

# Bulk generation COPies in chunks, each under its own savepoint: a code the
# campaign already had costs the fallback of one chunk, not of the batch.
GENERATE_CHUNK = 100_000
# Codes per page of ExportCodes: one cursor fetch, one stream message.
EXPORT_PAGE = 10_000
# A bulk statement may legitimately outlast the per-statement timeout that
# protects the hot paths (a slow disk, a large chunk): it gets its own.
BULK_STATEMENT_TIMEOUT_S = 120
# Rounds in a row that add no new code before the batch gives up: only a
# nearly exhausted code space gets there.
MAX_FRUITLESS_ROUNDS = 5


@asynccontextmanager
async def _connection(db: Db) -> AsyncIterator[Any]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


# ---------------------------------------------------------------- ids and secrets


def new_id(prefix: str) -> str:
    """A server-assigned id: the prefix and 96 random bits, URL-safe."""
    return prefix + secrets.token_urlsafe(12)


def new_postback_token() -> str:
    """192 random bits, URL-safe: a shop pastes it into a header or a parameter."""
    return secrets.token_urlsafe(24)


def hash_postback_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def postback_token_matches(token: str, token_sha256: bytes) -> bool:
    """Constant-time, so timing does not tell how much of a guess was right."""
    return bool(token) and hmac.compare_digest(hash_postback_token(token), bytes(token_sha256))


# ---------------------------------------------------------------- campaigns


async def insert_campaign(db: Db, campaign: Campaign) -> tuple[Campaign, str]:
    """Stores a new campaign; returns it with its postback token (shown this once)."""
    token = new_postback_token()
    try:
        row = await db.fetchrow(
            f"""INSERT INTO campaigns (id, name, landing_url, hold_days, click_lookback_days,
                       max_conversions_per_click, attribution_policy, payout_micros,
                       payout_percent_bp, currency, postback_token_sha256,
                       reuse_unique_after_refund, status)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                RETURNING {CAMPAIGN_COLUMNS}""",
            campaign.id,
            campaign.name,
            campaign.landing_url,
            campaign.hold_days,
            campaign.click_lookback_days,
            campaign.max_conversions_per_click,
            campaign.attribution_policy,
            campaign.payout_micros,
            campaign.payout_percent_bp,
            campaign.currency,
            hash_postback_token(token),
            campaign.reuse_unique_after_refund,
            campaign.status,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"campaign {campaign.id!r} already exists") from None
    return campaign_from_row(row), token


async def find_campaign(db: Db, campaign_id: str) -> Campaign | None:
    row = await db.fetchrow(f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1", campaign_id)
    return None if row is None else campaign_from_row(row)


async def get_campaign(db: Db, campaign_id: str) -> Campaign:
    campaign = await find_campaign(db, campaign_id)
    if campaign is None:
        raise NotFound(f"campaign {campaign_id!r} not found")
    return campaign


async def rotate_postback_token(db: Db, campaign_id: str) -> tuple[Campaign, str]:
    """Replaces the token in this commit.

    Postbacks are authorized from each replica's catalog cache, so for up to
    ``ASCRIBE_CATALOG_CACHE_MS`` (1 s) a replica may still take the old token
    and refuse the new one (401, which a shop retries).
    """
    token = new_postback_token()
    row = await db.fetchrow(
        f"""UPDATE campaigns SET postback_token_sha256 = $2, updated_at = now()
            WHERE id = $1 RETURNING {CAMPAIGN_COLUMNS}""",
        campaign_id,
        hash_postback_token(token),
    )
    if row is None:
        raise NotFound(f"campaign {campaign_id!r} not found")
    return campaign_from_row(row), token


async def update_campaign(db: Db, campaign_id: str, change: Callable[[Campaign], Campaign]) -> Campaign:
    """Applies ``change`` to the locked current campaign and stores its result."""
    async with _connection(db) as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1 FOR UPDATE", campaign_id
        )
        if row is None:
            raise NotFound(f"campaign {campaign_id!r} not found")
        new = change(campaign_from_row(row))
        row = await conn.fetchrow(
            f"""UPDATE campaigns SET name = $2, landing_url = $3, hold_days = $4,
                       click_lookback_days = $5, max_conversions_per_click = $6,
                       attribution_policy = $7, payout_micros = $8, payout_percent_bp = $9,
                       currency = $10, reuse_unique_after_refund = $11, status = $12,
                       updated_at = now()
                WHERE id = $1 RETURNING {CAMPAIGN_COLUMNS}""",
            campaign_id,
            new.name,
            new.landing_url,
            new.hold_days,
            new.click_lookback_days,
            new.max_conversions_per_click,
            new.attribution_policy,
            new.payout_micros,
            new.payout_percent_bp,
            new.currency,
            new.reuse_unique_after_refund,
            new.status,
        )
        return campaign_from_row(row)


async def list_campaigns(db: Db, *, after: str, limit: int) -> list[Campaign]:
    """Campaigns ordered by id, those after ``after`` ('' for the first page)."""
    rows = await db.fetch(
        f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id > $1 ORDER BY id LIMIT $2", after, limit
    )
    return [campaign_from_row(row) for row in rows]


# ---------------------------------------------------------------- affiliates


async def insert_affiliate(db: Db, affiliate: Affiliate) -> Affiliate:
    try:
        row = await db.fetchrow(
            f"""INSERT INTO affiliates (id, name, channel, status) VALUES ($1, $2, $3, $4)
                RETURNING {AFFILIATE_COLUMNS}""",
            affiliate.id,
            affiliate.name,
            affiliate.channel,
            affiliate.status,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"affiliate {affiliate.id!r} already exists") from None
    return affiliate_from_row(row)


async def find_affiliate(db: Db, affiliate_id: str) -> Affiliate | None:
    row = await db.fetchrow(f"SELECT {AFFILIATE_COLUMNS} FROM affiliates WHERE id = $1", affiliate_id)
    return None if row is None else affiliate_from_row(row)


async def get_affiliate(db: Db, affiliate_id: str) -> Affiliate:
    affiliate = await find_affiliate(db, affiliate_id)
    if affiliate is None:
        raise NotFound(f"affiliate {affiliate_id!r} not found")
    return affiliate


async def update_affiliate(db: Db, affiliate_id: str, change: Callable[[Affiliate], Affiliate]) -> Affiliate:
    async with _connection(db) as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {AFFILIATE_COLUMNS} FROM affiliates WHERE id = $1 FOR UPDATE", affiliate_id
        )
        if row is None:
            raise NotFound(f"affiliate {affiliate_id!r} not found")
        new = change(affiliate_from_row(row))
        row = await conn.fetchrow(
            f"""UPDATE affiliates SET name = $2, channel = $3, status = $4, updated_at = now()
                WHERE id = $1 RETURNING {AFFILIATE_COLUMNS}""",
            affiliate_id,
            new.name,
            new.channel,
            new.status,
        )
        return affiliate_from_row(row)


async def list_affiliates(db: Db, *, after: str, limit: int) -> list[Affiliate]:
    rows = await db.fetch(
        f"SELECT {AFFILIATE_COLUMNS} FROM affiliates WHERE id > $1 ORDER BY id LIMIT $2", after, limit
    )
    return [affiliate_from_row(row) for row in rows]


async def require_affiliates(db: Db, affiliate_ids: Sequence[str]) -> None:
    """NotFound naming every id that is not an affiliate."""
    if not affiliate_ids:
        return
    rows = await db.fetch("SELECT id FROM affiliates WHERE id = ANY($1::text[])", list(affiliate_ids))
    known = {row["id"] for row in rows}
    missing = [affiliate_id for affiliate_id in affiliate_ids if affiliate_id not in known]
    if missing:
        raise NotFound(f"affiliate(s) not found: {', '.join(repr(m) for m in missing)}")


# ---------------------------------------------------------------- coupons


async def insert_coupon(db: Db, coupon: Coupon) -> Coupon:
    """NotFound for an unknown campaign or affiliate; AlreadyExists for a code the campaign has."""
    async with _connection(db) as conn, conn.transaction():
        await _lock_campaign(conn, coupon.campaign_id)
        await require_affiliates(conn, coupon.affiliate_ids)
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO coupons (campaign_id, code, kind, status, valid_from, valid_until,
                           usage_limit, allow_all_affiliates, affiliate_ids, per_customer_limit,
                           discount_percent_bp, discount_micros, countries, device_types, channels,
                           skus, min_order_micros, assigned_customer_id, batch_id)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                            $16, $17, $18, $19)
                    RETURNING {COUPON_COLUMNS}""",
                coupon.campaign_id,
                coupon.code,
                *_rule_values(coupon),
                coupon.batch_id,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"code {coupon.code!r} already exists in campaign {coupon.campaign_id!r}"
            ) from None
        return coupon_from_row(row)


async def find_coupon(db: Db, campaign_id: str, code: str, *, for_update: bool = False) -> Coupon | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await db.fetchrow(
        f"SELECT {COUPON_COLUMNS} FROM coupons WHERE campaign_id = $1 AND code = $2{lock}",
        campaign_id,
        code,
    )
    return None if row is None else coupon_from_row(row)


async def get_coupon(db: Db, campaign_id: str, code: str) -> Coupon:
    coupon = await find_coupon(db, campaign_id, code)
    if coupon is None:
        raise NotFound(f"code {code!r} not found in campaign {campaign_id!r}")
    return coupon


async def update_coupon(
    db: Db,
    campaign_id: str,
    code: str,
    change: Callable[[Coupon], Coupon],
    *,
    actor: str = "admin",
) -> Coupon:
    """Applies ``change`` to the locked current coupon and stores its result.

    ``change`` sees the current ``used`` under the row lock, so its
    usage-limit check cannot race a redemption. A status change is recorded
    in ``coupon_events`` by ``actor``.
    """
    async with _connection(db) as conn, conn.transaction():
        current = await find_coupon(conn, campaign_id, code, for_update=True)
        if current is None:
            raise NotFound(f"code {code!r} not found in campaign {campaign_id!r}")
        new = change(current)
        await require_affiliates(conn, [a for a in new.affiliate_ids if a not in current.affiliate_ids])
        try:
            row = await conn.fetchrow(
                f"""UPDATE coupons SET kind = $3, status = $4, valid_from = $5, valid_until = $6,
                           usage_limit = $7, allow_all_affiliates = $8, affiliate_ids = $9,
                           per_customer_limit = $10, discount_percent_bp = $11,
                           discount_micros = $12, countries = $13, device_types = $14,
                           channels = $15, skus = $16, min_order_micros = $17,
                           assigned_customer_id = $18, updated_at = now()
                    WHERE campaign_id = $1 AND code = $2
                    RETURNING {COUPON_COLUMNS}""",
                campaign_id,
                code,
                *_rule_values(new),
            )
        except asyncpg.UniqueViolationError as error:
            # The customer holds another code of the batch; any other unique
            # index failing would be a bug here, and stays an internal error.
            if error.constraint_name != "coupons_one_per_customer":
                raise
            raise FailedPrecondition(
                f"customer {new.assigned_customer_id!r} already holds a code of batch {current.batch_id!r}"
            ) from None
        except asyncpg.CheckViolationError:
            # The schema's own guard of used <= usage_limit. Any other CHECK
            # failing means validation let a bad value through: not the
            # caller's precondition, so it stays an internal error.
            if not (new.usage_limit and current.used > new.usage_limit):
                raise
            raise FailedPrecondition(
                f"usage_limit {new.usage_limit} is below the {current.used} uses already taken"
            ) from None
        if new.status != current.status:
            await _record_status_change(conn, current, new.status, actor=actor, detail="")
        return coupon_from_row(row)


async def coupon_events(db: Db, campaign_id: str, code: str) -> list[Record]:
    """The status history of a code, oldest first (audits and tests)."""
    return cast(
        list[Record],
        await db.fetch(
            """SELECT at, actor, from_status, to_status, detail FROM coupon_events
               WHERE campaign_id = $1 AND code = $2 ORDER BY id""",
            campaign_id,
            code,
        ),
    )


async def list_coupons(
    db: Db, campaign_id: str, *, status: CouponStatus | None, after: str, limit: int
) -> list[Coupon]:
    """A campaign's codes ordered by code, those after ``after`` ('' for the first page)."""
    async with _connection(db) as conn:
        await _require_campaign(conn, campaign_id)
        rows = await conn.fetch(
            f"""SELECT {COUPON_COLUMNS} FROM coupons
                WHERE campaign_id = $1 AND code > $2 AND ($3::text IS NULL OR status = $3)
                ORDER BY code LIMIT $4""",
            campaign_id,
            after,
            status,
            limit,
        )
        return [coupon_from_row(row) for row in rows]


async def insert_generated_codes(
    db: Db,
    template: Coupon,
    *,
    batch_id: str,
    shape: CodeShape,
    count: int,
    draw: Callable[[int], Iterator[bytes]] | None = None,
    chunk: int = GENERATE_CHUNK,
) -> int:
    """Stores ``count`` new random codes of ``shape`` with the template's rules; returns ``count``.

    All or nothing, in one transaction that also records the batch
    (``code_batches``). ``draw(n)`` gives n distinct codes in ascending
    order, a block of them at a time (``code_check.sorted_codes`` unless a
    test says otherwise): no code repeats within the batch, and PostgreSQL
    takes them in primary-key order. They go as COPYs in text format of
    about ``chunk`` codes each, every block drawn while PostgreSQL parses
    the one before (``_Blocks``), so Python's work overlaps PostgreSQL's.

    A code the campaign already has fails its chunk's COPY: that chunk
    alone (its savepoint rolled back) is then stored with ``INSERT ... ON
    CONFLICT DO NOTHING``, which skips the clashing codes, and the next
    round draws that many more. With the code space ``catalog.rules``
    requires, that fallback is rare.

    No ANALYZE here: the caller refreshes the planner's statistics after the
    commit (``TableAnalyzer``), off the answer's path.
    """
    width = len(shape.prefix) + shape.length + 1
    async with _connection(db) as conn, conn.transaction():
        await _lock_campaign(conn, template.campaign_id)
        await require_affiliates(conn, template.affiliate_ids)
        await conn.execute(f"SET LOCAL statement_timeout = '{BULK_STATEMENT_TIMEOUT_S}s'")
        columns, head, tail = _copy_row_parts(template, batch_id)
        stored = 0
        fruitless = 0
        while stored < count:
            wanted = count - stored
            blocks = _Blocks(draw(wanted) if draw else sorted_codes(wanted, shape.prefix, shape.length))
            inserted = 0
            while blocks.peek() is not None:
                inserted += await _store_chunk(conn, template, batch_id, blocks, chunk, width, columns, head, tail)
            stored += inserted
            fruitless = 0 if inserted else fruitless + 1
            if fruitless >= MAX_FRUITLESS_ROUNDS:
                raise FailedPrecondition(
                    "the code space is exhausted for this prefix and length: use a longer length"
                )
        await conn.execute(
            """INSERT INTO code_batches (batch_id, campaign_id, source, prefix, length, codes)
               VALUES ($1, $2, 'generated', $3, $4, $5)""",
            batch_id,
            template.campaign_id,
            shape.prefix,
            shape.length,
            stored,
        )
        return stored


class TableAnalyzer:
    """Refreshes the planner's statistics of ``coupons`` after a large batch commits, in the background.

    Statistics that still describe the table before a batch make the planner
    sort the whole batch to hand out one code (AssignCode: 70 ms a statement
    instead of under one) until autovacuum's ANALYZE, up to a minute later.
    GenerateCodes used to ANALYZE inside its transaction: 0.2-0.3 s of a
    50,000-code answer and 0.5-2.7 s of a million-code one, measured on the
    2-core machine. Now the answer comes once the codes are committed, and
    ANALYZE follows at once on a pooled connection (a second or so at a
    million codes), one at a time: a batch committed while one runs gets
    one more run after it.
    """

    def __init__(self, pool: Db) -> None:
        self._pool = pool
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def request(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.execute(f"SET LOCAL statement_timeout = '{BULK_STATEMENT_TIMEOUT_S}s'")
                    await conn.execute("ANALYZE coupons")
            except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                logger.warning("ANALYZE coupons after a generated batch failed: %r", error)
            if not self._again:
                return

    async def wait(self) -> None:
        """Until the runs requested so far are done (tests)."""
        if self._task is not None:
            await self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# The columns of a coupon after its key, with the value PostgreSQL fills in
# when a column is left out. A generated batch COPies only the columns where
# its template differs: every column costs PostgreSQL its parsing per row.
_RULE_COLUMNS_AND_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("kind", None),
    ("status", "active"),
    ("valid_from", None),
    ("valid_until", None),
    ("usage_limit", 0),
    ("allow_all_affiliates", False),
    ("affiliate_ids", []),
    ("per_customer_limit", 0),
    ("discount_percent_bp", 0),
    ("discount_micros", 0),
    ("countries", []),
    ("device_types", []),
    ("channels", []),
    ("skus", []),
    ("min_order_micros", 0),
    ("assigned_customer_id", ""),
)
# COPY's text format: one row a line, tab between columns, \N for NULL.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text_value(value: object) -> str:
    """One value in COPY's text format, as PostgreSQL parses it back for its column type."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        # ISO 8601 with its offset: exact to the microsecond whatever the session's DateStyle.
        return value.isoformat().translate(_COPY_ESCAPES)
    if isinstance(value, (list, tuple)):
        elements = ",".join('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for v in value)
        return ("{" + elements + "}").translate(_COPY_ESCAPES)
    return str(value).translate(_COPY_ESCAPES)


def _copy_row_parts(template: Coupon, batch_id: str) -> tuple[list[str], bytes, bytes]:
    """The COPY columns and what every row has before and after its code."""
    columns = ["campaign_id", "code", "batch_id"]
    values: list[object] = [batch_id]
    for (column, default), value in zip(_RULE_COLUMNS_AND_DEFAULTS, _rule_values(template), strict=True):
        if value != default:
            columns.append(column)
            values.append(value)
    head = (copy_text_value(template.campaign_id) + "\t").encode()
    tail = ("\t" + "\t".join(copy_text_value(v) for v in values) + "\n").encode()
    return columns, head, tail


def copy_rows(block: bytes, width: int, head: bytes, tail: bytes) -> bytes:
    """COPY text rows ``head + code + tail`` for each fixed-width code of ``block``."""
    count = len(block) // width
    row = len(head) + width + len(tail)
    rows = bytearray(head + bytes(width) + tail) * count
    for j in range(width):
        rows[len(head) + j :: row] = block[j::width]
    return bytes(rows)


class _Blocks:
    """Blocks of codes drawn one ahead: the next is drawn as soon as the current one is sent."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._next: bytes | None = None

    def peek(self) -> bytes | None:
        if self._next is None:
            self._next = next(self._blocks, None)
        return self._next

    def pop(self) -> bytes | None:
        block = self.peek()
        self._next = None
        return block


async def _store_chunk(
    conn: Any,
    template: Coupon,
    batch_id: str,
    blocks: _Blocks,
    chunk: int,
    width: int,
    columns: list[str],
    head: bytes,
    tail: bytes,
) -> int:
    """Stores what it can of the next ``chunk`` codes or so of ``blocks``; returns how many were new."""
    sent: list[bytes] = []

    async def rows() -> AsyncIterator[bytes]:
        codes = 0
        while codes < chunk and (block := blocks.pop()) is not None:
            sent.append(block)
            codes += len(block) // width
            yield copy_rows(block, width, head, tail)
            # Resumed once asyncpg has sent the block: the next one (maybe
            # the next chunk's first) is drawn while PostgreSQL parses it.
            blocks.peek()

    try:
        async with conn.transaction():
            await conn.copy_to_table("coupons", source=rows(), columns=columns, timeout=BULK_STATEMENT_TIMEOUT_S)
        return sum(len(block) for block in sent) // width
    except asyncpg.UniqueViolationError:
        pass
    status = await conn.execute(
        """INSERT INTO coupons (campaign_id, code, kind, status, valid_from, valid_until,
                  usage_limit, allow_all_affiliates, affiliate_ids, per_customer_limit,
                  discount_percent_bp, discount_micros, countries, device_types, channels,
                  skus, min_order_micros, assigned_customer_id, batch_id)
           SELECT $1, code, $2, $3, $4::timestamptz, $5::timestamptz, $6::bigint, $7::boolean,
                  $8::text[], $9::int, $10::int, $11::bigint, $12::text[], $13::text[],
                  $14::text[], $15::text[], $16::bigint, $17, $18
           FROM unnest($19::text[]) AS code
           ON CONFLICT (campaign_id, code) DO NOTHING""",
        template.campaign_id,
        *_rule_values(template),
        batch_id,
        split_block(b"".join(sent), width),
        timeout=BULK_STATEMENT_TIMEOUT_S,
    )
    return int(status.rsplit(" ", 1)[1])


async def find_code_shapes(db: Db, campaign_id: str) -> tuple[CodeShape, ...]:
    """The shapes of a campaign's generated batches (for coupon_mistyped)."""
    rows = await db.fetch(
        """SELECT DISTINCT prefix, length FROM code_batches
           WHERE campaign_id = $1 AND source = 'generated' ORDER BY prefix, length""",
        campaign_id,
    )
    return tuple(CodeShape(row["prefix"], row["length"]) for row in rows)


async def stream_batch_codes(db: Db, batch_id: str, *, page: int = EXPORT_PAGE) -> AsyncIterator[list[str]]:
    """The codes of one batch, ``page`` at a time, read through a server-side cursor.

    A snapshot of the batch (one REPEATABLE READ transaction), so a million
    codes never sit in memory and a code assigned meanwhile is neither lost
    nor repeated. NotFound for an unknown batch, before anything is yielded.
    """
    async with _connection(db) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        exists = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM coupons WHERE batch_id = $1)", batch_id)
        if not exists:
            raise NotFound(f"batch {batch_id!r} not found")
        cursor = await conn.cursor("SELECT code FROM coupons WHERE batch_id = $1", batch_id)
        while rows := await cursor.fetch(page):
            yield [row[0] for row in rows]


_IMPORT_COLUMNS = [
    "campaign_id", "code", "kind", "status", "valid_from", "valid_until", "usage_limit",
    "allow_all_affiliates", "affiliate_ids", "per_customer_limit", "discount_percent_bp",
    "discount_micros", "countries", "device_types", "channels", "skus", "min_order_micros",
    "assigned_customer_id", "batch_id",
]


async def insert_imported_codes(db: Db, campaign_id: str, batch_id: str, rows: Sequence[tuple[int, Coupon]]) -> int:
    """Stores the codes of an import (``(line, coupon)``), all or nothing.

    In one transaction: the campaign locked, every code checked against the
    codes the campaign has and every affiliate against the affiliates, each
    problem named by its line (InvalidArgument, nothing stored); then one
    COPY and the batch's row.
    """
    async with _connection(db) as conn, conn.transaction():
        await _lock_campaign(conn, campaign_id)
        existing = {
            row["code"]
            for row in await conn.fetch(
                "SELECT code FROM coupons WHERE campaign_id = $1 AND code = ANY($2::text[])",
                campaign_id,
                [coupon.code for _, coupon in rows],
            )
        }
        named = sorted({a for _, coupon in rows for a in coupon.affiliate_ids})
        known = {
            row["id"] for row in await conn.fetch("SELECT id FROM affiliates WHERE id = ANY($1::text[])", named)
        }
        problems: list[tuple[str, str]] = []
        for line, coupon in rows:
            if coupon.code in existing:
                problems.append((f"line {line}.code", f"{coupon.code} already exists in the campaign"))
            unknown = [a for a in coupon.affiliate_ids if a not in known]
            if unknown:
                problems.append((f"line {line}.affiliate_ids", f"not an affiliate: {', '.join(unknown)}"))
        raise_violations(problems)
        try:
            await conn.copy_records_to_table(
                "coupons",
                records=[(campaign_id, coupon.code, *_rule_values(coupon), batch_id) for _, coupon in rows],
                columns=_IMPORT_COLUMNS,
                timeout=BULK_STATEMENT_TIMEOUT_S,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists("a code of the file was created meanwhile; nothing was imported") from None
        await conn.execute(
            """INSERT INTO code_batches (batch_id, campaign_id, source, codes)
               VALUES ($1, $2, 'imported', $3)""",
            batch_id,
            campaign_id,
            len(rows),
        )
        return len(rows)


class ResourceExhausted(DomainError):
    """A batch with no free code left (the contract's RESOURCE_EXHAUSTED)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


# The holder's code of a batch, or else the first free one, taken in the
# same statement. A free code is unassigned (to a customer or an affiliate),
# unused and ACTIVE (a paused or spent code handed out would only
# disappoint). SKIP LOCKED lets concurrent callers take different codes
# instead of queueing on one row; the unique indexes coupons_one_per_customer
# and coupons_one_per_affiliate make a second code for the same holder fail,
# and that caller then reads the winner's code. For an affiliate, a free code
# also names no affiliate yet and the affiliate is active ({free}); the code
# handed to it names it as its only affiliate ({grant}), so a sale with the
# code and no click credits it (coupon_rules.credit). "mine" repeats the
# partial indexes' predicate (<> ''): a prepared statement's generic plan
# could not prove it from $3 and would read the whole batch.
_ASSIGN = f"""
WITH mine AS (
    SELECT code FROM coupons
     WHERE batch_id = $2 AND {{holder}} = $3 AND {{holder}} <> '' AND campaign_id = $1
), free AS (
    SELECT campaign_id AS free_campaign_id, code AS free_code FROM coupons
     WHERE batch_id = $2 AND assigned_customer_id = '' AND campaign_id = $1
       AND used = 0 AND status = 'active' AND assigned_affiliate_id = '' AND NOT EXISTS (SELECT 1 FROM mine){{free}}
     LIMIT 1 FOR UPDATE {{skip}}
), taken AS (
    UPDATE coupons SET {{holder}} = $3{{grant}}, updated_at = now()
      FROM free WHERE campaign_id = free_campaign_id AND code = free_code
    RETURNING {COUPON_COLUMNS}
)
SELECT * FROM taken
UNION ALL
SELECT {COUPON_COLUMNS} FROM coupons WHERE campaign_id = $1 AND code = (SELECT code FROM mine)
"""
Holder = Literal["customer", "affiliate"]


def _assign_statements(holder: Holder, grant: str = "", free: str = "") -> tuple[str, str]:
    """The statement skipping locked codes, then the one waiting for them."""
    return (
        _ASSIGN.format(holder=f"assigned_{holder}_id", grant=grant, free=free, skip="SKIP LOCKED"),
        _ASSIGN.format(holder=f"assigned_{holder}_id", grant=grant, free=free, skip=""),
    )


_ASSIGN_STATEMENTS: dict[Holder, tuple[str, str]] = {
    "customer": _assign_statements("customer"),
    "affiliate": _assign_statements(
        "affiliate",
        grant=", allow_all_affiliates = false, affiliate_ids = ARRAY[$3::text]",
        # a code that already names its affiliates (an imported EXCLUSIVE
        # code, say) is theirs; a paused affiliate gets none
        free=" AND cardinality(affiliate_ids) = 0 AND EXISTS (SELECT 1 FROM affiliates WHERE id = $3 AND status = 'active')",
    ),
}


# Many customers of one batch in one statement (catalog.assigner batches
# concurrent AssignCode calls): the codes they already have, and for the
# others as many free codes as there are of them, paired in order. The free
# codes are read through the primary key in code order, from a mark, and
# stop at the LIMIT (the planner's statistics are refreshed right after a
# large batch commits, TableAnalyzer, so that it knows a batch is large and
# does not sort all of it instead).
_ASSIGN_MANY = f"""
WITH mine AS (
    SELECT assigned_customer_id AS customer, code AS mine_code FROM coupons
     WHERE batch_id = $2 AND campaign_id = $1 AND assigned_customer_id = ANY($3::text[])
), needy AS (
    SELECT customer, row_number() OVER (ORDER BY customer) AS n
      FROM (SELECT DISTINCT customer FROM unnest($3::text[]) AS customer) wanted
     WHERE customer NOT IN (SELECT customer FROM mine)
), free AS (
    SELECT free_campaign_id, free_code, row_number() OVER () AS n FROM (
        SELECT campaign_id AS free_campaign_id, code AS free_code FROM coupons
         WHERE campaign_id = $1 AND code > $5 AND batch_id = $2 AND assigned_customer_id = ''
           AND used = 0 AND status = 'active' AND assigned_affiliate_id = ''
         ORDER BY code LIMIT $4 FOR UPDATE SKIP LOCKED
    ) locked
), taken AS (
    UPDATE coupons SET assigned_customer_id = needy.customer, updated_at = now()
      FROM free JOIN needy USING (n)
     WHERE campaign_id = free_campaign_id AND code = free_code
    RETURNING {COUPON_COLUMNS}
)
SELECT * FROM taken
UNION ALL
SELECT {COUPON_COLUMNS} FROM coupons WHERE campaign_id = $1 AND code IN (SELECT mine_code FROM mine)
"""


async def assign_codes(
    db: Db, campaign_id: str, batch_id: str, customers: Sequence[str], *, after: str = ""
) -> dict[str, Coupon]:
    """Each customer's code of the batch, taking free ones for those who have none, in one statement.

    Free codes are taken in code order from just after ``after`` (the last
    code the caller took), through the primary key: a scan that always began
    at the batch's first code would walk past every code assigned so far,
    ever longer as the batch is handed out.

    A customer may be missing from the answer: when the free codes that were
    not locked by someone else ran out. The unique index refuses a second
    code for a customer that a concurrent call (another replica) gave one
    meanwhile (UniqueViolationError). In both cases the caller asks for
    those customers one by one (``assign_code``), which settles them.
    """
    wanted = sorted(set(customers))
    rows = await db.fetch(_ASSIGN_MANY, campaign_id, batch_id, wanted, len(wanted), after)
    return {row["assigned_customer_id"]: coupon_from_row(row) for row in rows}


async def assign_code(
    db: Db, campaign_id: str, batch_id: str, holder_id: str, *, holder: Holder = "customer"
) -> Coupon:
    """The batch's code for a customer or an affiliate: the one it has, or the next free one.

    One statement per attempt, so a code is taken atomically. When every
    free code is locked by concurrent callers (who may still roll back), the
    second attempt waits for those locks instead of skipping them, so
    RESOURCE_EXHAUSTED means no free code is left, not that all were busy.
    NotFound for a batch the campaign does not have, or an affiliate that
    does not exist; FailedPrecondition for a paused affiliate.
    """
    async with _connection(db) as conn:
        for statement in _ASSIGN_STATEMENTS[holder]:
            while True:
                try:
                    row = await conn.fetchrow(statement, campaign_id, batch_id, holder_id)
                except asyncpg.UniqueViolationError:
                    # The same holder's concurrent call committed a code
                    # first: the next round finds it as "mine".
                    continue
                break
            if row is not None:
                return coupon_from_row(row)
        exists = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM coupons WHERE batch_id = $1 AND campaign_id = $2)", batch_id, campaign_id
        )
        if not exists:
            raise NotFound(f"batch {batch_id!r} not found in campaign {campaign_id!r}")
        if holder == "affiliate":
            affiliate = await get_affiliate(conn, holder_id)
            if affiliate.status != "active":
                raise FailedPrecondition(
                    f"affiliate {holder_id!r} is {affiliate.status}: a new code goes to an active one"
                )
            raise ResourceExhausted(
                f"batch {batch_id!r} has no code left for an affiliate (unassigned, unused, active,"
                " and naming no affiliate yet)"
            )
    raise ResourceExhausted(f"batch {batch_id!r} has no free code left")


# ---------------------------------------------------------------- helpers


async def _require_campaign(conn: Any, campaign_id: str) -> None:
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM campaigns WHERE id = $1)", campaign_id):
        raise NotFound(f"campaign {campaign_id!r} not found")


async def _lock_campaign(conn: Any, campaign_id: str) -> None:
    """What the dropped foreign key did per row, once per transaction (migration 008).

    Every insert into ``coupons`` calls this in its transaction first: the
    campaign exists, and FOR KEY SHARE keeps it from being deleted or
    re-keyed until the codes commit.
    """
    if await conn.fetchval("SELECT 1 FROM campaigns WHERE id = $1 FOR KEY SHARE", campaign_id) is None:
        raise NotFound(f"campaign {campaign_id!r} not found")


def _rule_values(coupon: Coupon) -> list[Any]:
    """A coupon's column values after its key (campaign_id, code), in INSERT order."""
    return [
        coupon.kind,
        coupon.status,
        coupon.valid_from,
        coupon.valid_until,
        coupon.usage_limit,
        coupon.allow_all_affiliates,
        list(coupon.affiliate_ids),
        coupon.per_customer_limit,
        coupon.discount_percent_bp,
        coupon.discount_micros,
        list(coupon.countries),
        list(coupon.device_types),
        list(coupon.channels),
        list(coupon.skus),
        coupon.min_order_micros,
        coupon.assigned_customer_id,
    ]


async def _record_status_change(
    conn: Any, coupon: Coupon, to_status: CouponStatus, *, actor: str, detail: str
) -> None:
    await conn.execute(
        """INSERT INTO coupon_events (campaign_id, code, actor, from_status, to_status, detail)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        coupon.campaign_id,
        coupon.code,
        actor,
        coupon.status,
        to_status,
        detail,
    )
