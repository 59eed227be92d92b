"""The click flow: validate, judge, fraud-check, commit, redirect.

A click is where coupon tracking begins (ARCHITECTURE.md sections 4 to 6):

- bad input is INVALID_ARGUMENT naming the field, an unknown campaign
  NOT_FOUND; nothing is stored for either;
- an inactive campaign or an unknown or paused affiliate makes the click
  REJECTED (still recorded, still redirected, no fraud check spent on it);
- a code that fails its rules is not tracked (the click is recorded without
  it, with the reason) and the click stays ACCEPTED when fraud allows;
- the fraud verdict: REJECT rejects, REVIEW flags, no verdict in time flags
  with ``fraud_unavailable`` (fail-open);
- the row is committed before the answer: concurrent clicks share one multi-row
  INSERT (group commit), each caller awaiting its own batch's commit.

Per-click Python work is kept small on purpose: the click path's budget is
a few hundred microseconds of CPU across all processes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote_plus, urlsplit, urlunsplit

import asyncpg
from ascribe.fraud.v1 import fraud_pb2

from services.attribution.catalog.cache import CatalogCache
from services.attribution.clicks import store
from services.attribution.common import ids
from services.attribution.common.coupon_rules import (
    click_tracking_reasons,
    is_valid_code,
    missing_code_reason,
    normalize_code,
)
from services.attribution.common.database import DATABASE_FAILURES
from services.attribution.common.models import Campaign, Click, ClickDecision, DeviceType
from services.attribution.common.reasons import (
    AFFILIATE_INACTIVE,
    CAMPAIGN_INACTIVE,
    EXPERIMENT_HOLDOUT,
    FRAUD_UNAVAILABLE,
    UNKNOWN_AFFILIATE,
    UNKNOWN_COUPON,
)
from services.attribution.common.visitor import VisitorDerivation
from services.attribution.experiments import store as experiment_store
from services.attribution.experiments.assignment import ClickArm, ClickAssigner
from services.attribution.fraud_client import FraudClient, fraud_reasons
from services.attribution.metrics import (
    CLICK_FLUSH_FAILURES_TOTAL,
    CLICK_FLUSH_ROWS,
    CLICK_FLUSH_SECONDS,
    CLICK_RECORD_SECONDS,
    CLICKS_TOTAL,
)
from services.common import limits
from services.common.batcher import MicroBatcher
from services.common.errors import DomainError, InvalidArgument, NotFound, Unavailable, Violations
from services.common.ip import normalize_ip
from services.common.timestamps import set_timestamp, utcnow

logger = logging.getLogger(__name__)

MAX_FUTURE = timedelta(minutes=5)  # clock skew allowed on occurred_at
SUB_FIELDS = ("sub1", "sub2", "sub3", "sub4", "sub5")


_ACTION_DECISION: dict[int, ClickDecision] = {
    fraud_pb2.VERDICT_ACTION_ALLOW: "accepted",
    fraud_pb2.VERDICT_ACTION_REVIEW: "flagged",
    fraud_pb2.VERDICT_ACTION_REJECT: "rejected",
}

_RECORD_SECONDS = CLICK_RECORD_SECONDS.labels("RecordClick")
_RECORD_BATCH_SECONDS = CLICK_RECORD_SECONDS.labels("RecordClickBatch")
_CLICKS_BY_DECISION = {d: CLICKS_TOTAL.labels(d) for d in ("accepted", "flagged", "rejected")}


# ---------------------------------------------------------------- input


@dataclass(frozen=True, slots=True)
class ClickInput:
    """A click as the gateway reports it (empty strings: not given)."""

    campaign_id: str
    affiliate_id: str
    coupon_code: str = ""
    external_click_id: str = ""
    subs: tuple[str, str, str, str, str] = ("", "", "", "", "")
    ip: str = ""
    user_agent: str = ""
    referer: str = ""
    country: str = ""
    occurred_at: datetime | None = None  # None: now
    vid: str = ""  # the visitor key of experiments (issue #17)


@dataclass(frozen=True, slots=True)
class ValidClick:
    """A ClickInput that passed validation, with its values normalized."""

    campaign_id: str
    affiliate_id: str
    coupon_code: str  # normalized (upper-case); "" when none
    external_click_id: str
    subs: tuple[str, str, str, str, str]
    ip: str  # canonical form; "" when none
    user_agent: str
    referer: str
    country: str  # upper-case alpha-2; "" when unknown
    occurred_at: datetime
    device_type: DeviceType | None = None  # from the user agent (``ClickRecorder`` derives it)
    # False for a code no coupon can have (``SAVE 10``): the click is still
    # recorded and redirected, with the code untracked as ``unknown_coupon``.
    coupon_well_formed: bool = True
    vid: str = ""


def _too_long(value: str, max_bytes: int) -> bool:
    # A character is at most 4 UTF-8 bytes: short strings skip the encoding.
    return len(value) * 4 > max_bytes and len(value.encode()) > max_bytes


def _check_text(violations: Violations, name: str, value: str, max_bytes: int) -> None:
    if _too_long(value, max_bytes):
        violations.add(name, f"longer than {max_bytes} bytes")
    elif "\x00" in value:
        violations.add(name, "contains a NUL character")


def validate_click(inp: ClickInput, now: datetime) -> ValidClick:
    """Checks syntax and sizes; raises InvalidArgument naming every bad field."""
    violations = Violations()
    if not inp.campaign_id:
        violations.add("campaign_id", "required")
    else:
        _check_text(violations, "campaign_id", inp.campaign_id, limits.CAMPAIGN_ID)
    if not inp.affiliate_id:
        violations.add("affiliate_id", "required")
    else:
        _check_text(violations, "affiliate_id", inp.affiliate_id, limits.AFFILIATE_ID)
    code = normalize_code(inp.coupon_code) if inp.coupon_code else ""
    # A visitor is never turned away for a mistyped code: past the size bound,
    # a code of the wrong shape is simply one no coupon has.
    if _too_long(code, limits.COUPON_CODE):
        violations.add("coupon_code", f"longer than {limits.COUPON_CODE} bytes")
    elif "\x00" in code:
        violations.add("coupon_code", "contains a NUL character")
    if inp.external_click_id:
        _check_text(violations, "external_click_id", inp.external_click_id, limits.EXTERNAL_CLICK_ID)
    for name, value in zip(SUB_FIELDS, inp.subs, strict=True):
        if value:
            _check_text(violations, name, value, limits.SUB_ID)
    ip = ""
    if inp.ip:
        ip = normalize_ip(inp.ip) or ""
        if not ip:
            violations.add("ip", "not an IP address")
    if inp.user_agent:
        _check_text(violations, "user_agent", inp.user_agent, limits.USER_AGENT)
    if inp.vid:
        _check_text(violations, "vid", inp.vid, limits.VISITOR_ID)
    # The Referer is a browser header, not an affiliate's parameter: an overlong
    # one is cut rather than costing the visitor the redirect.
    referer = inp.referer[: limits.REFERER]
    if "\x00" in referer:
        violations.add("referer", "contains a NUL character")
    country = inp.country.upper()
    if country and not (len(country) == 2 and country.isascii() and country.isalpha()):
        violations.add("country", "must be an ISO 3166-1 alpha-2 code")
    occurred_at = now if inp.occurred_at is None else inp.occurred_at
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=UTC)
    if occurred_at - now > MAX_FUTURE:
        violations.add("occurred_at", "more than 5 minutes in the future")
    violations.raise_if_any()
    return ValidClick(
        campaign_id=inp.campaign_id,
        affiliate_id=inp.affiliate_id,
        coupon_code=code,
        external_click_id=inp.external_click_id,
        subs=inp.subs,
        ip=ip,
        user_agent=inp.user_agent,
        referer=referer,
        country=country,
        occurred_at=occurred_at,
        coupon_well_formed=not code or is_valid_code(code),
        vid=inp.vid,
    )


# ---------------------------------------------------------------- rules


def apply_verdict(
    decision: ClickDecision, verdict: fraud_pb2.Verdict | None
) -> tuple[ClickDecision, list[str], int]:
    """The click's decision after fraud, the fraud reasons and the score.

    A decision already REJECTED stays so. No verdict (down or late) flags the
    click with ``fraud_unavailable``: it is recorded, never lost.
    """
    if verdict is None:
        return ("rejected" if decision == "rejected" else "flagged"), [FRAUD_UNAVAILABLE], 0
    reasons = fraud_reasons(verdict)
    by_fraud = _ACTION_DECISION.get(verdict.action, "accepted")
    if decision == "rejected" or by_fraud == "rejected":
        return "rejected", reasons, verdict.score
    if decision == "flagged" or by_fraud == "flagged":
        return "flagged", reasons, verdict.score
    return "accepted", reasons, verdict.score


@functools.lru_cache(maxsize=4096)
def _landing_template(landing_url: str, replace_coupon: bool) -> tuple[str, str]:
    """The landing URL split around the place our parameters go.

    Returns (head, tail): head ends with ``?`` or ``&``, and keeps the landing
    URL's own query byte for byte except the parameters we set (``click_id``,
    and ``coupon`` when the click carries one), which are dropped so ours are
    the only ones; tail is the ``#fragment``, if any.
    """
    parts = urlsplit(landing_url)
    ours = ("click_id", "coupon") if replace_coupon else ("click_id",)
    kept = [
        segment
        for segment in parts.query.split("&")
        if segment and unquote_plus(segment.partition("=")[0]) not in ours
    ]
    head = urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + "?"
    if kept:
        head += "&".join(kept) + "&"
    tail = "#" + parts.fragment if parts.fragment else ""
    return head, tail


def redirect_url(landing_url: str, click_id: str, coupon_code: str) -> str:
    """The campaign's registered landing URL with ``click_id`` (and ``coupon``) set.

    Only the registered URL is ever used, so no parameter of a click can send
    the visitor elsewhere. Ids and well-formed codes are URL-safe by
    construction; a malformed code is percent-encoded.
    """
    head, tail = _landing_template(landing_url, bool(coupon_code))
    if coupon_code:
        if not is_valid_code(coupon_code):
            coupon_code = quote(coupon_code, safe="")
        return f"{head}click_id={click_id}&coupon={coupon_code}{tail}"
    return f"{head}click_id={click_id}{tail}"


# ---------------------------------------------------------------- the flow


@dataclass(frozen=True, slots=True)
class ClickOutcome:
    click_id: str
    decision: ClickDecision
    reasons: tuple[str, ...]
    redirect_url: str


@dataclass(slots=True)
class _Judged:
    """A click between judgment and commit."""

    click: ValidClick
    campaign: Campaign
    click_id: str
    created_at: datetime
    tracked_code: str
    decision: ClickDecision
    reasons: list[str]
    fraud_score: int = 0
    arm: ClickArm | None = None  # the experiment arm it joined (issue #17)
    code_missed: bool = False  # the link's code is unknown or mistyped: counted against its IP (code guessing)
    unique: bool = True  # until the fraud service says the visitor clicked before

    def fraud_request(self) -> fraud_pb2.CheckClickRequest:
        click = self.click
        request = fraud_pb2.CheckClickRequest(
            click_id=self.click_id,
            external_click_id=click.external_click_id,
            campaign_id=click.campaign_id,
            affiliate_id=click.affiliate_id,
            # The code the link carried, tracked or not (part of the contract
            # for the fraud service's rules; click rules do not use it yet). A
            # malformed one is no code at all and would fail its validation.
            coupon_code=click.coupon_code if click.coupon_well_formed else "",
            ip=click.ip,
            user_agent=click.user_agent,
            code_missed=self.code_missed,
        )
        set_timestamp(request.occurred_at, click.occurred_at)
        return request

    def apply(self, verdict: fraud_pb2.Verdict | None) -> None:
        self.decision, fraud_reasons, self.fraud_score = apply_verdict(self.decision, verdict)
        self.reasons.extend(fraud_reasons)
        # No verdict (fraud down or late) counts the click as unique.
        self.unique = verdict is None or not verdict.repeat_visit

    def row(self) -> Click:
        click = self.click
        return Click(
            click_id=self.click_id,
            created_at=self.created_at,
            campaign_id=click.campaign_id,
            affiliate_id=click.affiliate_id,
            occurred_at=click.occurred_at,
            decision=self.decision,
            coupon_code=self.tracked_code or None,
            requested_coupon_code=click.coupon_code or None,
            external_click_id=click.external_click_id or None,
            subs=click.subs,
            ip=click.ip or None,
            user_agent=click.user_agent or None,
            referer=click.referer or None,
            country=click.country or None,
            reasons=tuple(self.reasons),
            fraud_score=self.fraud_score,
            device_type=click.device_type,
            experiment_id=self.arm.experiment_id if self.arm else None,
            experiment_arm=self.arm.arm if self.arm else None,
            experiment_unit=self.arm.unit_key if self.arm else None,
            unique=self.unique,
        )

    def outcome(self) -> ClickOutcome:
        return ClickOutcome(
            click_id=self.click_id,
            decision=self.decision,
            reasons=tuple(self.reasons),
            redirect_url=redirect_url(
                self.campaign.landing_url, self.click_id, "" if self.arm and self.arm.holdout else self.click.coupon_code
            ),
        )

    def join(self, arm: ClickArm | None) -> None:
        """Joins an experiment's arm: control (the holdout) loses the code, in the row and the redirect."""
        self.arm = arm
        if arm is not None and arm.holdout:
            self.tracked_code = ""
            self.reasons.append(EXPERIMENT_HOLDOUT)


class ClickRecorder:
    """Records clicks: judgment, batched fraud checks, group commit."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: CatalogCache,
        fraud: FraudClient,
        *,
        visitors: VisitorDerivation | None = None,
        experiments: ClickAssigner | None = None,
        max_rpcs_per_flush: int = 256,
        flushes_in_flight: int = 1,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._fraud = fraud
        self._visitors = visitors or VisitorDerivation()
        self._experiments = experiments
        # One item is the rows of one RPC, so a RecordClickBatch commits as a whole.
        self._writer: MicroBatcher[Sequence[Click], None] = MicroBatcher(
            self._flush,
            max_batch=max_rpcs_per_flush,
            max_in_flight=flushes_in_flight,
            name="click writer",
        )

    async def record(self, inp: ClickInput) -> ClickOutcome:
        """Judges and commits one click; raises DomainError for the caller's mistakes."""
        started = time.perf_counter()
        judged = await self._judge(inp, utcnow())
        if judged.decision != "rejected":
            judged.apply(await self._fraud.check_click(judged.fraud_request()))
        await self._join_experiment(judged)
        await self._commit([judged.row()])
        _CLICKS_BY_DECISION[judged.decision].inc()
        outcome = judged.outcome()
        _RECORD_SECONDS.observe(time.perf_counter() - started)
        return outcome

    async def record_many(self, inputs: Sequence[ClickInput]) -> list[ClickOutcome | DomainError]:
        """Judges and commits many clicks; one bad click fails only its own entry.

        The fraud checks of the batch go out together, and its rows are
        committed together (all or none: a failed commit fails the whole call
        with UNAVAILABLE, and nothing of it is stored).
        """
        if len(inputs) > limits.CLICKS_PER_BATCH:
            raise InvalidArgument.one("requests", f"at most {limits.CLICKS_PER_BATCH} clicks per batch")
        started = time.perf_counter()
        now = utcnow()
        results: list[_Judged | DomainError] = []
        for inp in inputs:
            try:
                results.append(await self._judge(inp, now))
            except DomainError as error:
                results.append(error)
        judged = [r for r in results if isinstance(r, _Judged)]
        to_check = [j for j in judged if j.decision != "rejected"]
        if to_check:
            verdicts = await self._fraud.check_clicks([j.fraud_request() for j in to_check])
            for item, verdict in zip(to_check, verdicts, strict=True):
                item.apply(verdict)
        for item in judged:
            await self._join_experiment(item)
        if judged:
            await self._commit([j.row() for j in judged])
        for item in judged:
            _CLICKS_BY_DECISION[item.decision].inc()
        _RECORD_BATCH_SECONDS.observe(time.perf_counter() - started)
        return [r.outcome() if isinstance(r, _Judged) else r for r in results]

    async def get(self, click_id: str) -> Click:
        if not click_id:
            raise InvalidArgument.one("click_id", "required")
        try:
            created_at = ids.click_created_at(click_id)
        except ValueError:
            raise InvalidArgument.one("click_id", "not a click id") from None
        try:
            click = await store.get_click(self._pool, click_id, created_at)
        except DATABASE_FAILURES as error:
            logger.warning("reading click failed: %r", error)
            raise Unavailable("the click store is unavailable") from None
        if click is None:
            raise NotFound(f"click {click_id} not found")
        if self._experiments is not None:
            click = await self._experiments.with_arm(click)
        return click

    async def _join_experiment(self, judged: _Judged) -> None:
        """Issue #17's one hook: the arm of a judged click (after fraud, before the commit)."""
        if self._experiments is not None:
            judged.join(
                await self._experiments.assign(
                    campaign_id=judged.click.campaign_id,
                    tracked_code=judged.tracked_code,
                    decision=judged.decision,
                    vid=judged.click.vid,
                    ip=judged.click.ip,
                    user_agent=judged.click.user_agent,
                    at=judged.click.occurred_at,
                )
            )

    async def close(self) -> None:
        """Waits for the group commits in flight (their callers are still waiting)."""
        await self._writer.close()

    def _with_visitor(self, click: ValidClick) -> ValidClick:
        """The visitor's country (unless the caller sent one) and device, from the IP and user agent."""
        return replace(
            click,
            country=click.country or self._visitors.country(click.ip),
            device_type=self._visitors.device(click.user_agent),
        )

    async def _judge(self, inp: ClickInput, now: datetime) -> _Judged:
        click = self._with_visitor(validate_click(inp, now))
        try:
            campaign = await self._cache.campaign(click.campaign_id)
            if campaign is None:
                raise NotFound(f"campaign {click.campaign_id!r} not found")
            affiliate = await self._cache.affiliate(click.affiliate_id)
            coupon = (
                await self._cache.coupon(campaign.id, click.coupon_code)
                if click.coupon_code and click.coupon_well_formed
                else None
            )
            # Only a code the campaign does not have costs the (cached) batch shapes.
            missing_reason = (
                missing_code_reason(click.coupon_code, await self._cache.code_shapes(campaign.id))
                if click.coupon_code and click.coupon_well_formed and coupon is None
                else UNKNOWN_COUPON
            )
        except DATABASE_FAILURES as error:
            logger.warning("catalog lookup failed: %r", error)
            raise Unavailable("the catalog is unavailable") from None
        reasons: list[str] = []
        if campaign.status != "active":
            reasons.append(CAMPAIGN_INACTIVE)
        if affiliate is None:
            reasons.append(UNKNOWN_AFFILIATE)
        elif affiliate.status != "active":
            reasons.append(AFFILIATE_INACTIVE)
        decision: ClickDecision = "rejected" if reasons else "accepted"
        tracked = ""
        if click.coupon_code:
            code_reasons = click_tracking_reasons(
                coupon, click.affiliate_id, click.occurred_at, click.country, click.device_type,
                missing_reason=missing_reason,
            )
            if code_reasons:
                reasons.extend(code_reasons)
            else:
                tracked = click.coupon_code
        click_id = ids.new_click_id(now)
        return _Judged(
            click=click,
            campaign=campaign,
            click_id=click_id,
            created_at=ids.truncate_to_id_precision(now),
            tracked_code=tracked,
            decision=decision,
            reasons=reasons,
            code_missed=bool(click.coupon_code) and click.coupon_well_formed and coupon is None,
        )

    async def _commit(self, rows: Sequence[Click]) -> None:
        await self._writer.submit(rows)

    async def _flush(self, groups: Sequence[Sequence[Click]]) -> list[BaseException | None]:
        rows = [row for group in groups for row in group]
        CLICK_FLUSH_ROWS.observe(len(rows))
        started = time.perf_counter()
        try:
            # A connection for this flush only, handed back by the block however
            # it ends (a cancellation included). The writer used to keep its
            # connections between flushes to save the reset, but asyncpg takes
            # a connection back by itself when it dies (a PostgreSQL restart),
            # and the kept proxy then failed the next commit with "connection
            # has been released back to the pool". The reset costs nothing now
            # (the pool's reset is _keep_session: no round trip).
            async with self._pool.acquire() as conn:
                in_experiments = [row for row in rows if row.experiment_arm]
                if in_experiments:
                    # A click and its arm are committed together or not at all.
                    async with conn.transaction():
                        await store.insert_clicks(conn, rows)
                        await experiment_store.insert_click_arms(conn, in_experiments)
                else:
                    await store.insert_clicks(conn, rows)
        except Exception as error:  # each waiting caller gets UNAVAILABLE
            CLICK_FLUSH_FAILURES_TOTAL.inc()
            logger.error("group commit of %d clicks failed: %r", len(rows), error)
            return [Unavailable("the click could not be recorded; retry") for _ in groups]
        CLICK_FLUSH_SECONDS.observe(time.perf_counter() - started)
        return [None] * len(groups)
