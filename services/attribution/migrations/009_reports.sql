-- Reports: the dimensions conversions are reported under, unique clicks, and
-- rollups kept exact in the events' own transactions.

-- A click is unique when it is its visitor's first for the campaign and
-- affiliate within 24 hours (the fraud service counts it); until it says
-- otherwise every click is.
ALTER TABLE clicks ADD COLUMN is_unique boolean NOT NULL DEFAULT true;

-- Click batches travel in this row type from now on (007's type cannot
-- change: asyncpg caches a type's layout per connection).
CREATE TYPE ascribe_click_row_v3 AS (
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
    device_type            text,
    is_unique              boolean
);

-- A conversion's report dimensions, judged with it: the recorder writes them
-- into the request it keeps (`report`: the postback's or derived country and
-- device, else the credited click's; the credited affiliate's channel at the
-- time; the credited click's sub1). Generated columns follow every rewrite of
-- the request (a re-judged order) and need no change to the insert statements.
ALTER TABLE conversions
    ADD COLUMN country text GENERATED ALWAYS AS
        (coalesce(request -> 'report' ->> 'country', request ->> 'country', '')) STORED,
    ADD COLUMN device_type text GENERATED ALWAYS AS
        (coalesce(request -> 'report' ->> 'device', request ->> 'device_type', '')) STORED,
    ADD COLUMN channel text GENERATED ALWAYS AS
        (coalesce(request -> 'report' ->> 'channel', '')) STORED,
    ADD COLUMN sub1 text GENERATED ALWAYS AS
        (coalesce(request -> 'report' ->> 'sub1', '')) STORED;

-- Raw scans for the partial buckets at a report's edges and for the drift check.
CREATE INDEX clicks_occurred ON clicks (occurred_at);
CREATE INDEX conversions_occurred ON conversions (occurred_at);
CREATE INDEX conversions_coupon ON conversions (campaign_id, coupon_code, received_at);

-- Append-only deltas per 15-minute bucket (UTC) and dimension set. Every
-- zone's offset is a multiple of 15 minutes, so the days and hours of any
-- zone, Asia/Kolkata and Asia/Kathmandu included, are whole buckets. Writers
-- only ever INSERT (no ON CONFLICT, so replicas never wait on a hot row);
-- `ascribe_report_compact` folds a key's rows into one.
CREATE TABLE report_rollup (
    bucket           timestamptz NOT NULL,
    campaign_id      text NOT NULL,
    currency         text NOT NULL,
    coupon           text NOT NULL,
    affiliate_id     text NOT NULL,
    channel          text NOT NULL,
    sub1             text NOT NULL,
    country          text NOT NULL,
    device           text NOT NULL,
    clicks           bigint NOT NULL DEFAULT 0,
    unique_clicks    bigint NOT NULL DEFAULT 0,
    tracked_clicks   bigint NOT NULL DEFAULT 0,
    rejected_clicks  bigint NOT NULL DEFAULT 0,
    conversions      bigint NOT NULL DEFAULT 0,
    pending          bigint NOT NULL DEFAULT 0,
    approved         bigint NOT NULL DEFAULT 0,
    flagged          bigint NOT NULL DEFAULT 0,
    rejected         bigint NOT NULL DEFAULT 0,
    reversed         bigint NOT NULL DEFAULT 0,
    revenue_micros   bigint NOT NULL DEFAULT 0,
    discount_micros  bigint NOT NULL DEFAULT 0,
    payout_micros    bigint NOT NULL DEFAULT 0,
    refunded_micros  bigint NOT NULL DEFAULT 0,
    uses_taken       bigint NOT NULL DEFAULT 0,
    compacted        boolean NOT NULL DEFAULT false
);
CREATE INDEX report_rollup_time ON report_rollup (bucket);
CREATE INDEX report_rollup_by_campaign ON report_rollup (campaign_id, bucket);
-- An affiliate's rows are scattered over the table (they arrive with every
-- other affiliate's): the metrics in the index make a report of one
-- affiliate an index-only scan of adjacent entries. Measured on the bench's
-- 1M clicks: one affiliate by sub1 and country, 30 days, 400 -> 200 ms.
CREATE INDEX report_rollup_by_affiliate ON report_rollup (affiliate_id, bucket)
    INCLUDE (currency, coupon, channel, sub1, country, device, clicks, unique_clicks, tracked_clicks,
             rejected_clicks, conversions, pending, approved, flagged, rejected, reversed, revenue_micros,
             discount_micros, payout_micros, refunded_micros, uses_taken);
CREATE INDEX report_rollup_fresh ON report_rollup (bucket) WHERE NOT compacted;

-- The coarse tier: the same deltas summed per campaign alone, a few rows per
-- bucket whatever the traffic, for reports that group and filter by nothing
-- but the campaign and time (a month of a whole account by day reads about
-- 3,000 rows a campaign instead of one a click). The triggers fill it in the
-- same statement as report_rollup.
CREATE TABLE report_rollup_campaign (LIKE report_rollup INCLUDING DEFAULTS);
ALTER TABLE report_rollup_campaign
    DROP COLUMN coupon, DROP COLUMN affiliate_id, DROP COLUMN channel, DROP COLUMN sub1,
    DROP COLUMN country, DROP COLUMN device;
CREATE INDEX report_rollup_campaign_time ON report_rollup_campaign (bucket);
CREATE INDEX report_rollup_campaign_campaign ON report_rollup_campaign (campaign_id, bucket);

-- Whole UTC days per campaign and code, for reports by code over weeks and
-- months (a month of a campaign's codes is a row per code and day).
CREATE TABLE report_rollup_coupon_day (LIKE report_rollup INCLUDING DEFAULTS);
ALTER TABLE report_rollup_coupon_day
    DROP COLUMN affiliate_id, DROP COLUMN channel, DROP COLUMN sub1, DROP COLUMN country, DROP COLUMN device;
CREATE INDEX report_rollup_coupon_day_campaign ON report_rollup_coupon_day (campaign_id, bucket);

-- What one click adds to its bucket (the same expressions as the triggers').
CREATE VIEW report_click_facts AS
SELECT date_bin('15 minutes', k.occurred_at, timestamptz '2000-01-01 00:00:00+00') AS bucket,
       k.occurred_at AS at,
       k.campaign_id, coalesce(c.currency, '') AS currency, coalesce(k.coupon_code, '') AS coupon,
       k.affiliate_id, coalesce(a.channel, '') AS channel, coalesce(k.sub1, '') AS sub1,
       coalesce(k.country, '') AS country, coalesce(k.device_type, '') AS device,
       1 AS clicks, k.is_unique::int AS unique_clicks, (k.coupon_code IS NOT NULL)::int AS tracked_clicks,
       (k.decision = 'rejected')::int AS rejected_clicks
  FROM clicks k
  LEFT JOIN campaigns c ON c.id = k.campaign_id
  LEFT JOIN affiliates a ON a.id = k.affiliate_id;

-- What one conversion contributes in its current state.
CREATE VIEW report_conversion_facts AS
SELECT date_bin('15 minutes', v.occurred_at, timestamptz '2000-01-01 00:00:00+00') AS bucket,
       v.occurred_at AS at,
       v.campaign_id, v.currency, coalesce(v.coupon_code, '') AS coupon,
       coalesce(v.affiliate_id, '') AS affiliate_id, v.channel, v.sub1, v.country, v.device_type AS device,
       1 AS conversions,
       (v.status = 'pending')::int AS pending, (v.status = 'approved')::int AS approved,
       (v.status = 'flagged')::int AS flagged, (v.status = 'rejected')::int AS rejected,
       (v.status = 'reversed')::int AS reversed,
       CASE WHEN v.status IN ('pending', 'approved') THEN v.amount_micros - v.refunded_micros ELSE 0 END AS revenue_micros,
       CASE WHEN v.status IN ('pending', 'approved') THEN v.discount_micros ELSE 0 END AS discount_micros,
       CASE WHEN v.status IN ('pending', 'approved') THEN v.payout_micros ELSE 0 END AS payout_micros,
       v.refunded_micros, v.holds_coupon_use::int AS uses_taken
  FROM conversions v;

-- One pre-aggregated set of rows per INSERT statement on clicks.
CREATE FUNCTION ascribe_report_clicks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH fine AS (
    INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country,
                               device, clicks, unique_clicks, tracked_clicks, rejected_clicks)
    SELECT date_bin('15 minutes', k.occurred_at, timestamptz '2000-01-01 00:00:00+00'),
           k.campaign_id, coalesce(c.currency, ''), coalesce(k.coupon_code, ''), k.affiliate_id,
           coalesce(a.channel, ''), coalesce(k.sub1, ''), coalesce(k.country, ''), coalesce(k.device_type, ''),
           count(*), count(*) FILTER (WHERE k.is_unique), count(k.coupon_code),
           count(*) FILTER (WHERE k.decision = 'rejected')
      FROM new_clicks k
      LEFT JOIN campaigns c ON c.id = k.campaign_id
      LEFT JOIN affiliates a ON a.id = k.affiliate_id
     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
    RETURNING *
    ), by_day AS (
    INSERT INTO report_rollup_coupon_day (bucket, campaign_id, currency, coupon, clicks, unique_clicks,
                                          tracked_clicks, rejected_clicks)
    SELECT date_trunc('day', bucket, 'UTC'), campaign_id, currency, coupon, sum(clicks), sum(unique_clicks),
           sum(tracked_clicks), sum(rejected_clicks)
      FROM fine GROUP BY 1, 2, 3, 4
    )
    INSERT INTO report_rollup_campaign (bucket, campaign_id, currency, clicks, unique_clicks, tracked_clicks,
                                        rejected_clicks)
    SELECT bucket, campaign_id, currency, sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks)
      FROM fine GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;
CREATE TRIGGER report_clicks AFTER INSERT ON clicks
    REFERENCING NEW TABLE AS new_clicks FOR EACH STATEMENT EXECUTE FUNCTION ascribe_report_clicks();

-- Conversions: a new order adds its contribution; any change (approval,
-- refund, review, re-scoring, a re-judged order) adds the new row's
-- contribution minus the old row's, so the order moves between statuses,
-- amounts and even keys at once.
CREATE FUNCTION ascribe_report_conversion_delta(sign int, v conversions)
RETURNS TABLE (bucket timestamptz, campaign_id text, currency text, coupon text, affiliate_id text,
               channel text, sub1 text, country text, device text, conversions int, pending int,
               approved int, flagged int, rejected int, reversed int, revenue_micros bigint,
               discount_micros bigint, payout_micros bigint, refunded_micros bigint, uses_taken int)
LANGUAGE sql STABLE AS $$
    SELECT date_bin('15 minutes', v.occurred_at, timestamptz '2000-01-01 00:00:00+00'),
           v.campaign_id, v.currency, coalesce(v.coupon_code, ''), coalesce(v.affiliate_id, ''),
           v.channel, v.sub1, v.country, v.device_type,
           sign, sign * (v.status = 'pending')::int, sign * (v.status = 'approved')::int,
           sign * (v.status = 'flagged')::int, sign * (v.status = 'rejected')::int,
           sign * (v.status = 'reversed')::int,
           CASE WHEN v.status IN ('pending', 'approved') THEN sign * (v.amount_micros - v.refunded_micros) ELSE 0 END,
           CASE WHEN v.status IN ('pending', 'approved') THEN sign * v.discount_micros ELSE 0 END,
           CASE WHEN v.status IN ('pending', 'approved') THEN sign * v.payout_micros ELSE 0 END,
           sign * v.refunded_micros, sign * v.holds_coupon_use::int
$$;

CREATE FUNCTION ascribe_report_conversions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        WITH fine AS (
        INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country,
                                   device, conversions, pending, approved, flagged, rejected, reversed,
                                   revenue_micros, discount_micros, payout_micros, refunded_micros, uses_taken)
        SELECT d.bucket, d.campaign_id, d.currency, d.coupon, d.affiliate_id, d.channel, d.sub1, d.country,
               d.device, sum(d.conversions), sum(d.pending), sum(d.approved), sum(d.flagged), sum(d.rejected),
               sum(d.reversed), sum(d.revenue_micros), sum(d.discount_micros), sum(d.payout_micros),
               sum(d.refunded_micros), sum(d.uses_taken)
          FROM new_conversions n, ascribe_report_conversion_delta(1, n) d
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
        RETURNING *
        ), by_day AS (
        INSERT INTO report_rollup_coupon_day (bucket, campaign_id, currency, coupon, conversions, pending,
                                              approved, flagged, rejected, reversed, revenue_micros,
                                              discount_micros, payout_micros, refunded_micros, uses_taken)
        SELECT date_trunc('day', bucket, 'UTC'), campaign_id, currency, coupon, sum(conversions), sum(pending),
               sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
               sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken)
          FROM fine GROUP BY 1, 2, 3, 4
        )
        INSERT INTO report_rollup_campaign (bucket, campaign_id, currency, conversions, pending, approved, flagged,
                                            rejected, reversed, revenue_micros, discount_micros, payout_micros,
                                            refunded_micros, uses_taken)
        SELECT bucket, campaign_id, currency, sum(conversions), sum(pending), sum(approved), sum(flagged),
               sum(rejected), sum(reversed), sum(revenue_micros), sum(discount_micros), sum(payout_micros),
               sum(refunded_micros), sum(uses_taken)
          FROM fine GROUP BY 1, 2, 3;
    ELSE
        WITH fine AS (
        INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country,
                                   device, conversions, pending, approved, flagged, rejected, reversed,
                                   revenue_micros, discount_micros, payout_micros, refunded_micros, uses_taken)
        SELECT d.bucket, d.campaign_id, d.currency, d.coupon, d.affiliate_id, d.channel, d.sub1, d.country,
               d.device, sum(d.conversions), sum(d.pending), sum(d.approved), sum(d.flagged), sum(d.rejected),
               sum(d.reversed), sum(d.revenue_micros), sum(d.discount_micros), sum(d.payout_micros),
               sum(d.refunded_micros), sum(d.uses_taken)
          FROM (SELECT x.* FROM new_conversions n, ascribe_report_conversion_delta(1, n) x
                UNION ALL
                SELECT x.* FROM old_conversions o, ascribe_report_conversion_delta(-1, o) x) d
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
        -- an update that changed nothing a report shows (updated_at, hold_until) adds no row
        HAVING sum(d.conversions) <> 0 OR sum(d.pending) <> 0 OR sum(d.approved) <> 0
            OR sum(d.flagged) <> 0 OR sum(d.rejected) <> 0 OR sum(d.reversed) <> 0
            OR sum(d.revenue_micros) <> 0 OR sum(d.discount_micros) <> 0 OR sum(d.payout_micros) <> 0
            OR sum(d.refunded_micros) <> 0 OR sum(d.uses_taken) <> 0
        RETURNING *
        ), by_day AS (
        INSERT INTO report_rollup_coupon_day (bucket, campaign_id, currency, coupon, conversions, pending,
                                              approved, flagged, rejected, reversed, revenue_micros,
                                              discount_micros, payout_micros, refunded_micros, uses_taken)
        SELECT date_trunc('day', bucket, 'UTC'), campaign_id, currency, coupon, sum(conversions), sum(pending),
               sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
               sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken)
          FROM fine GROUP BY 1, 2, 3, 4
        )
        INSERT INTO report_rollup_campaign (bucket, campaign_id, currency, conversions, pending, approved, flagged,
                                            rejected, reversed, revenue_micros, discount_micros, payout_micros,
                                            refunded_micros, uses_taken)
        SELECT bucket, campaign_id, currency, sum(conversions), sum(pending), sum(approved), sum(flagged),
               sum(rejected), sum(reversed), sum(revenue_micros), sum(discount_micros), sum(payout_micros),
               sum(refunded_micros), sum(uses_taken)
          FROM fine GROUP BY 1, 2, 3;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER report_conversions_insert AFTER INSERT ON conversions
    REFERENCING NEW TABLE AS new_conversions FOR EACH STATEMENT EXECUTE FUNCTION ascribe_report_conversions();
CREATE TRIGGER report_conversions_update AFTER UPDATE ON conversions
    REFERENCING OLD TABLE AS old_conversions NEW TABLE AS new_conversions
    FOR EACH STATEMENT EXECUTE FUNCTION ascribe_report_conversions();

-- Folds the rows of every key that received deltas since the last fold into
-- one row per key. Rows committed after this statement's snapshot are neither
-- deleted nor summed, so the total never changes. Callers serialize it with
-- an advisory lock (one fold at a time across replicas).
CREATE FUNCTION ascribe_report_compact() RETURNS bigint LANGUAGE sql AS $$
    WITH fresh AS (
        SELECT DISTINCT bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device
          FROM report_rollup WHERE NOT compacted
    ), gone AS (
        DELETE FROM report_rollup r USING fresh f
         WHERE r.bucket = f.bucket AND r.campaign_id = f.campaign_id AND r.currency = f.currency
           AND r.coupon = f.coupon AND r.affiliate_id = f.affiliate_id AND r.channel = f.channel
           AND r.sub1 = f.sub1 AND r.country = f.country AND r.device = f.device
        RETURNING r.*
    ), folded AS (
        INSERT INTO report_rollup
        SELECT bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device,
               sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions),
               sum(pending), sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
               sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken), true
          FROM gone
         GROUP BY bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM folded)
$$;

CREATE FUNCTION ascribe_report_compact_campaign() RETURNS bigint LANGUAGE sql AS $$
    WITH fresh AS (
        SELECT DISTINCT bucket, campaign_id, currency FROM report_rollup_campaign WHERE NOT compacted
    ), gone AS (
        DELETE FROM report_rollup_campaign r USING fresh f
         WHERE r.bucket = f.bucket AND r.campaign_id = f.campaign_id AND r.currency = f.currency
        RETURNING r.*
    ), folded AS (
        INSERT INTO report_rollup_campaign
        SELECT bucket, campaign_id, currency,
               sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions),
               sum(pending), sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
               sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken), true
          FROM gone
         GROUP BY bucket, campaign_id, currency
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM folded)
$$;

CREATE FUNCTION ascribe_report_compact_coupon_day() RETURNS bigint LANGUAGE sql AS $$
    WITH fresh AS (
        SELECT DISTINCT bucket, campaign_id, currency, coupon FROM report_rollup_coupon_day WHERE NOT compacted
    ), gone AS (
        DELETE FROM report_rollup_coupon_day r USING fresh f
         WHERE r.bucket = f.bucket AND r.campaign_id = f.campaign_id AND r.currency = f.currency
           AND r.coupon = f.coupon
        RETURNING r.*
    ), folded AS (
        INSERT INTO report_rollup_coupon_day
        SELECT bucket, campaign_id, currency, coupon,
               sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions),
               sum(pending), sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
               sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken), true
          FROM gone
         GROUP BY bucket, campaign_id, currency, coupon
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM folded)
$$;

-- What was recorded before this migration.
INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device,
                           clicks, unique_clicks, tracked_clicks, rejected_clicks)
SELECT bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device,
       sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks)
  FROM report_click_facts GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;
INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device,
                           conversions, pending, approved, flagged, rejected, reversed, revenue_micros,
                           discount_micros, payout_micros, refunded_micros, uses_taken)
SELECT bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device,
       sum(conversions), sum(pending), sum(approved), sum(flagged), sum(rejected), sum(reversed),
       sum(revenue_micros), sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken)
  FROM report_conversion_facts GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;
INSERT INTO report_rollup_campaign
SELECT bucket, campaign_id, currency,
       sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions),
       sum(pending), sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
       sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken), false
  FROM report_rollup GROUP BY 1, 2, 3;
INSERT INTO report_rollup_coupon_day
SELECT date_trunc('day', bucket, 'UTC'), campaign_id, currency, coupon,
       sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions),
       sum(pending), sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
       sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken), false
  FROM report_rollup GROUP BY 1, 2, 3, 4;
