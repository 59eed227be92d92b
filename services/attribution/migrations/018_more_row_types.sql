-- One idiom for every multi-row write (migration 006): the writes added since
-- (experiment arms of clicks, webhook deliveries, use deltas) travel as one
-- array of rows of a row type too, instead of one array per column.
-- Never ALTER these types: asyncpg caches a type's layout per connection; a
-- change is a new type (..._v2) and a new statement.
CREATE TYPE ascribe_click_arm_row AS (
    click_id       text,
    created_at     timestamptz,
    experiment_id  text,
    unit_key       text,
    arm            text,
    affiliate_id   text,
    country        text,
    device_type    text
);

CREATE TYPE ascribe_delivery_row AS (
    id          text,
    webhook_id  text,
    event_id    text,
    event       text,
    payload     text,
    at          timestamptz
);

CREATE TYPE ascribe_use_delta_row AS (
    campaign_id  text,
    code         text,
    delta        bigint
);
