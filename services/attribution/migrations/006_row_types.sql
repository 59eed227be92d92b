-- One idiom for every multi-row write: an array of rows of a row type, in
-- one parameter (as clicks travel since migration 005), instead of one array
-- per column. Lists of reason words travel comma-joined (snake_case words
-- never hold a comma) and the order's request as JSON text.
-- Never ALTER these types: asyncpg caches a type's layout per connection; a
-- change is a new type (..._v2) and a new statement.
CREATE TYPE ascribe_conversion_row AS (
    id                  text,
    campaign_id         text,
    order_id            text,
    fingerprint         bytea,
    status              text,
    reasons             text,
    affiliate_id        text,
    source              text,
    click_id            text,
    click_created_at    timestamptz,
    coupon_code         text,
    customer_id         text,
    amount_micros       bigint,
    discount_micros     bigint,
    refunded_micros     bigint,
    currency            text,
    payout_micros       bigint,
    hold_until          timestamptz,
    coupon_remaining    bigint,
    fraud_score         int,
    needs_rescore       boolean,
    holds_coupon_use    boolean,
    holds_customer_use  boolean,
    holds_click_slot    boolean,
    received_at         timestamptz,
    occurred_at         timestamptz,
    request             text
);

CREATE TYPE ascribe_event_row AS (
    conversion_id  text,
    at             timestamptz,
    from_status    text,
    to_status      text,
    reason         text,
    actor          text,
    note           text,
    amount_micros  bigint
);

CREATE TYPE ascribe_ledger_row AS (
    campaign_id    text,
    code           text,
    conversion_id  text,
    customer_id    text,
    taken_at       timestamptz
);

-- A re-scored conversion's new state (the re-scoring job updates a round of
-- them in one statement).
CREATE TYPE ascribe_rescore_row AS (
    id           text,
    status       text,
    reasons      text,
    fraud_score  int
);
