-- Clicks, conversions, their history, the redemption ledger and refunds.

-- Range-partitioned by the time encoded in click_id, so old partitions detach
-- cheaply; the default partition means a missing partition never loses a click.
CREATE TABLE clicks (
    click_id               text NOT NULL,
    created_at             timestamptz NOT NULL,
    campaign_id            text NOT NULL,
    affiliate_id           text NOT NULL,
    coupon_code            text,          -- the tracked code (passed its rules)
    requested_coupon_code  text,          -- what the link carried
    external_click_id      text,
    sub1 text, sub2 text, sub3 text, sub4 text, sub5 text,
    ip                     inet,
    user_agent             text,
    referer                text,
    country                text,
    occurred_at            timestamptz NOT NULL,
    decision               text NOT NULL CHECK (decision IN ('accepted', 'flagged', 'rejected')),
    reasons                text[] NOT NULL DEFAULT '{}',
    fraud_score            int NOT NULL DEFAULT 0,
    -- Live conversions credited through this click (max_conversions_per_click).
    conversions            int NOT NULL DEFAULT 0 CHECK (conversions >= 0),
    PRIMARY KEY (click_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE clicks_default PARTITION OF clicks DEFAULT;
CREATE INDEX clicks_campaign_time ON clicks (campaign_id, created_at);

-- Creates daily partitions from `days_back` days ago to `days_ahead` days
-- ahead; run at start-up and daily. A day whose rows already went to the
-- default partition is skipped (they stay findable there).
CREATE FUNCTION ascribe_ensure_click_partitions(days_back int, days_ahead int)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    d date;
    created int := 0;
    part text;
BEGIN
    FOR d IN SELECT generate_series(current_date - days_back, current_date + days_ahead, '1 day')::date LOOP
        part := 'clicks_' || to_char(d, 'YYYYMMDD');
        IF to_regclass(part) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF clicks FOR VALUES FROM (%L) TO (%L)',
                    part, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            EXCEPTION WHEN check_violation OR duplicate_table THEN
                NULL;
            END;
        END IF;
    END LOOP;
    RETURN created;
END $$;

CREATE TABLE conversions (
    id                text PRIMARY KEY,
    campaign_id       text NOT NULL REFERENCES campaigns (id),
    order_id          text NOT NULL,
    -- SHA-256 of the parameters the shop sent: a re-post with the same
    -- fingerprint is a retry, another fingerprint a conflict.
    fingerprint       bytea NOT NULL,
    status            text NOT NULL
                      CHECK (status IN ('pending', 'approved', 'rejected', 'reversed', 'flagged')),
    reasons           text[] NOT NULL DEFAULT '{}',
    affiliate_id      text,
    source            text NOT NULL CHECK (source IN ('click', 'coupon', 'none')),
    click_id          text,
    click_created_at  timestamptz,
    coupon_code       text,
    customer_id       text,
    amount_micros     bigint NOT NULL CHECK (amount_micros >= 0),
    discount_micros   bigint NOT NULL DEFAULT 0,
    refunded_micros   bigint NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    currency          text NOT NULL,
    payout_micros     bigint NOT NULL DEFAULT 0,
    hold_until        timestamptz,
    coupon_remaining  bigint,
    fraud_score       int NOT NULL DEFAULT 0,
    -- FLAGGED only because the fraud service was unavailable: re-score later.
    needs_rescore     boolean NOT NULL DEFAULT false,
    -- What this conversion holds and gives back when it is reversed or rejected:
    -- a use of its code, a use of the code by its customer, a slot of its click.
    holds_coupon_use    boolean NOT NULL DEFAULT false,
    holds_customer_use  boolean NOT NULL DEFAULT false,
    holds_click_slot    boolean NOT NULL DEFAULT false,
    received_at       timestamptz NOT NULL,
    occurred_at       timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- The shop's parameters, kept to re-score and to explain.
    request           jsonb NOT NULL,
    UNIQUE (campaign_id, order_id),
    CHECK (refunded_micros <= amount_micros)
);
CREATE INDEX conversions_due ON conversions (hold_until) WHERE status = 'pending';
CREATE INDEX conversions_rescore ON conversions (received_at) WHERE needs_rescore;
CREATE INDEX conversions_queue ON conversions (campaign_id, status, received_at);
CREATE INDEX conversions_click ON conversions (click_id) WHERE click_id IS NOT NULL;

-- Append-only history of every conversion's transitions.
CREATE TABLE conversion_events (
    id             bigserial PRIMARY KEY,
    conversion_id  text NOT NULL REFERENCES conversions (id),
    at             timestamptz NOT NULL DEFAULT now(),
    from_status    text,
    to_status      text NOT NULL,
    reason         text NOT NULL,
    actor          text NOT NULL,
    note           text NOT NULL DEFAULT '',
    amount_micros  bigint NOT NULL DEFAULT 0
);
CREATE INDEX conversion_events_conversion ON conversion_events (conversion_id, id);

-- The redemption ledger: one row per use taken; released when given back.
CREATE TABLE redemptions (
    id              bigserial PRIMARY KEY,
    campaign_id     text NOT NULL,
    code            text NOT NULL,
    conversion_id   text NOT NULL,
    customer_id     text,
    taken_at        timestamptz NOT NULL DEFAULT now(),
    released_at     timestamptz,
    release_reason  text
);
CREATE INDEX redemptions_live ON redemptions (campaign_id, code) WHERE released_at IS NULL;
CREATE UNIQUE INDEX redemptions_one_live_per_conversion
    ON redemptions (conversion_id) WHERE released_at IS NULL;

-- Uses per customer of codes with a per-customer limit.
CREATE TABLE customer_usage (
    campaign_id  text NOT NULL,
    code         text NOT NULL,
    customer_id  text NOT NULL,
    used         int NOT NULL CHECK (used >= 0),
    PRIMARY KEY (campaign_id, code, customer_id)
);

CREATE TABLE refunds (
    campaign_id    text NOT NULL,
    order_id       text NOT NULL,
    refund_id      text NOT NULL,
    amount_micros  bigint NOT NULL,
    reason         text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, order_id, refund_id)
);

-- Where the leak response resumes WatchAlerts after a restart.
CREATE TABLE alert_cursor (
    name      text PRIMARY KEY,
    after_id  text NOT NULL
);
