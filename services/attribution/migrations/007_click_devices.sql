-- A click's device class (mobile, tablet, desktop, other), derived from its
-- user agent by the attribution service; NULL without a user agent.
ALTER TABLE clicks ADD COLUMN device_type text;

-- Click batches travel in this row type from now on (005's type cannot
-- change: asyncpg caches a type's layout per connection).
CREATE TYPE ascribe_click_row_v2 AS (
    click_id               text,
    created_at             timestamptz,
    campaign_id            text,
    affiliate_id           text,
    coupon_code            text,
    requested_coupon_code  text,
    external_click_id      text,
    sub1 text, sub2 text, sub3 text, sub4 text, sub5 text,
    ip                     text,
    user_agent             text,
    referer                text,
    country                text,
    occurred_at            timestamptz,
    decision               text,
    reasons                text,
    fraud_score            int,
    device_type            text
);
