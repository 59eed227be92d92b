-- Outgoing partner postbacks and signed events (issue #18): the webhooks,
-- the outbox the recording paths fill in their own transactions, and the
-- deliveries the worker sends.

CREATE TABLE webhooks (
    id                     text PRIMARY KEY,
    kind                   text NOT NULL CHECK (kind IN ('partner_postback', 'events')),
    campaign_id            text REFERENCES campaigns (id),
    affiliate_id           text REFERENCES affiliates (id),
    url                    text NOT NULL,
    http_method            text NOT NULL CHECK (http_method IN ('GET', 'POST')),
    events                 text[] NOT NULL,
    secret                 text NOT NULL,
    -- The secret a rotation replaced still signs until it expires (24 h), so
    -- receivers can switch without losing an event.
    previous_secret        text,
    previous_secret_until  timestamptz,
    description            text NOT NULL DEFAULT '',
    enabled                boolean NOT NULL DEFAULT true,
    disabled_reason        text NOT NULL DEFAULT '',
    -- Set by the first dead delivery after the last delivered one: 3 days of
    -- nothing but deaths disable the webhook.
    failing_since          timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_campaign ON webhooks (campaign_id);

-- One row per event, written by the triggers below in the transaction of the
-- change it reports (a rolled-back change leaves none) and by the alert
-- follower; the worker fans each out to deliveries and deletes it.
CREATE TABLE webhook_outbox (
    id               bigserial PRIMARY KEY,
    event            text NOT NULL,
    at               timestamptz NOT NULL DEFAULT now(),
    campaign_id      text,
    affiliate_id     text,
    conversion_id    text,
    coupon_code      text,
    status           text,
    amount_micros    bigint,
    -- conversion.refunded: this refund's amount; otherwise what is refunded so far.
    refunded_micros  bigint,
    payout_micros    bigint,
    currency         text,
    -- A fraud alert's stream id: each alert becomes one event, whichever
    -- replica follows the stream.
    alert_id         text UNIQUE,
    data             jsonb
);

CREATE TABLE webhook_deliveries (
    id               text PRIMARY KEY,          -- X-Ascribe-Delivery, the same on every retry
    seq              bigserial NOT NULL,        -- listing order (newest first) and page tokens
    webhook_id       text NOT NULL,             -- no foreign key: a deleted webhook's cancelled deliveries stay listed
    event_id         text NOT NULL,
    event            text NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'delivered', 'dead', 'cancelled')),
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    payload          jsonb NOT NULL,            -- the event as fixed at fan-out
    last_status_code int NOT NULL DEFAULT 0,
    last_error       text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    finished_at      timestamptz,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_listing ON webhook_deliveries (webhook_id, seq DESC);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at) WHERE state <> 'pending';

-- Statement-level triggers with transition tables: one set-based INSERT per
-- statement (a batch of conversions is one statement), and nothing at all
-- while no webhook exists. Named ascribe_webhook_* so other triggers on the
-- same tables (reporting rollups) stay separate.
CREATE FUNCTION ascribe_webhook_conversions_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM webhooks WHERE enabled) THEN
        INSERT INTO webhook_outbox (event, campaign_id, affiliate_id, conversion_id, coupon_code, status,
                                    amount_micros, refunded_micros, payout_micros, currency)
        SELECT 'conversion.' || n.status, n.campaign_id, n.affiliate_id, n.id, n.coupon_code, n.status,
               n.amount_micros, n.refunded_micros, n.payout_micros, n.currency
          FROM new_rows n;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION ascribe_webhook_conversions_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM webhooks WHERE enabled) THEN
        -- A status change is conversion.<new status>; a partial refund keeps
        -- the status and is conversion.refunded with what this refund took.
        INSERT INTO webhook_outbox (event, campaign_id, affiliate_id, conversion_id, coupon_code, status,
                                    amount_micros, refunded_micros, payout_micros, currency)
        SELECT CASE WHEN n.status <> o.status THEN 'conversion.' || n.status ELSE 'conversion.refunded' END,
               n.campaign_id, n.affiliate_id, n.id, n.coupon_code, n.status, n.amount_micros,
               CASE WHEN n.status <> o.status THEN n.refunded_micros
                    ELSE n.refunded_micros - o.refunded_micros END,
               n.payout_micros, n.currency
          FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.status <> o.status OR n.refunded_micros > o.refunded_micros;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION ascribe_webhook_coupons_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM webhooks WHERE enabled) THEN
        INSERT INTO webhook_outbox (event, campaign_id, coupon_code, status, data)
        SELECT e.event, n.campaign_id, n.code, n.status,
               jsonb_build_object('used', n.used, 'usage_limit', n.usage_limit)
          FROM new_rows n JOIN old_rows o ON o.campaign_id = n.campaign_id AND o.code = n.code
         CROSS JOIN LATERAL (VALUES
               (CASE WHEN n.status = 'hold' AND o.status <> 'hold' THEN 'coupon.held' END),
               (CASE WHEN n.usage_limit > 0 AND n.used >= n.usage_limit
                          AND NOT (o.usage_limit > 0 AND o.used >= o.usage_limit)
                     THEN 'coupon.exhausted' END)) AS e (event)
         WHERE e.event IS NOT NULL;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER ascribe_webhook_conversions_insert AFTER INSERT ON conversions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ascribe_webhook_conversions_inserted();
CREATE TRIGGER ascribe_webhook_conversions_update AFTER UPDATE ON conversions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ascribe_webhook_conversions_updated();
CREATE TRIGGER ascribe_webhook_coupons_update AFTER UPDATE ON coupons
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ascribe_webhook_coupons_updated();
