-- Reports (issue #14): the keys a click and an order count under are fixed
-- when they happen and bounded by what exists.
--
-- A click counts under its affiliate's channel and its campaign's currency at
-- the time of the click: the click keeps both (the click writer's INSERT reads
-- them), so the rollups, the raw edges of a range and the drift check agree
-- after an UpdateAffiliate. A click whose affiliate does not exist (no channel)
-- counts under affiliate "", and an order whose code was unknown or mistyped
-- under coupon "" (the reason words of services/attribution/common/reasons.py,
-- tied by tests/unit/test_reasons.py), so made-up ids and codes cannot add rows.
ALTER TABLE clicks ADD COLUMN channel text, ADD COLUMN currency text;

-- Clicks recorded before this migration: their affiliate's and campaign's
-- values now (what 009's view answered for them).
UPDATE clicks k SET channel = a.channel FROM affiliates a WHERE a.id = k.affiliate_id;
UPDATE clicks k SET currency = c.currency FROM campaigns c WHERE c.id = k.campaign_id;

CREATE OR REPLACE VIEW report_click_facts AS
SELECT date_bin('15 minutes', k.occurred_at, timestamptz '2000-01-01 00:00:00+00') AS bucket,
       k.occurred_at AS at,
       k.campaign_id, coalesce(k.currency, '') AS currency, coalesce(k.coupon_code, '') AS coupon,
       CASE WHEN k.channel IS NULL THEN '' ELSE k.affiliate_id END AS affiliate_id,
       coalesce(k.channel, '') AS channel, coalesce(k.sub1, '') AS sub1,
       coalesce(k.country, '') AS country, coalesce(k.device_type, '') AS device,
       1 AS clicks, k.is_unique::int AS unique_clicks, (k.coupon_code IS NOT NULL)::int AS tracked_clicks,
       (k.decision = 'rejected')::int AS rejected_clicks,
       k.click_id
  FROM clicks k;

CREATE OR REPLACE VIEW report_conversion_facts AS
SELECT date_bin('15 minutes', v.occurred_at, timestamptz '2000-01-01 00:00:00+00') AS bucket,
       v.occurred_at AS at,
       v.campaign_id, v.currency, CASE WHEN v.reasons && ARRAY['unknown_coupon', 'coupon_mistyped'] THEN ''
            ELSE coalesce(v.coupon_code, '') END AS coupon,
       coalesce(v.affiliate_id, '') AS affiliate_id, v.channel, v.sub1, v.country, v.device_type AS device,
       1 AS conversions,
       (v.status = 'pending')::int AS pending, (v.status = 'approved')::int AS approved,
       (v.status = 'flagged')::int AS flagged, (v.status = 'rejected')::int AS rejected,
       (v.status = 'reversed')::int AS reversed,
       CASE WHEN v.status IN ('pending', 'approved') THEN v.amount_micros - v.refunded_micros ELSE 0 END AS revenue_micros,
       CASE WHEN v.status IN ('pending', 'approved') THEN v.discount_micros ELSE 0 END AS discount_micros,
       CASE WHEN v.status IN ('pending', 'approved') THEN v.payout_micros ELSE 0 END AS payout_micros,
       v.refunded_micros, v.holds_coupon_use::int AS uses_taken,
       v.id AS conversion_id
  FROM conversions v;

CREATE OR REPLACE FUNCTION ascribe_report_clicks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH fine AS (
    INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country,
                               device, clicks, unique_clicks, tracked_clicks, rejected_clicks)
    SELECT date_bin('15 minutes', k.occurred_at, timestamptz '2000-01-01 00:00:00+00'),
           k.campaign_id, coalesce(k.currency, ''), coalesce(k.coupon_code, ''),
           CASE WHEN k.channel IS NULL THEN '' ELSE k.affiliate_id END,
           coalesce(k.channel, ''), coalesce(k.sub1, ''), coalesce(k.country, ''), coalesce(k.device_type, ''),
           count(*), count(*) FILTER (WHERE k.is_unique), count(k.coupon_code),
           count(*) FILTER (WHERE k.decision = 'rejected')
      FROM new_clicks k
     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
    RETURNING *
    ), by_account AS (
    INSERT INTO report_rollup_account (bucket, currency, clicks, unique_clicks, tracked_clicks, rejected_clicks)
    SELECT bucket, currency, sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks)
      FROM fine GROUP BY 1, 2
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

CREATE OR REPLACE FUNCTION ascribe_report_conversion_delta(sign int, v conversions)
RETURNS TABLE (bucket timestamptz, campaign_id text, currency text, coupon text, affiliate_id text,
               channel text, sub1 text, country text, device text, conversions int, pending int,
               approved int, flagged int, rejected int, reversed int, revenue_micros bigint,
               discount_micros bigint, payout_micros bigint, refunded_micros bigint, uses_taken int)
LANGUAGE sql STABLE AS $$
    SELECT date_bin('15 minutes', v.occurred_at, timestamptz '2000-01-01 00:00:00+00'),
           v.campaign_id, v.currency,
           CASE WHEN v.reasons && ARRAY['unknown_coupon', 'coupon_mistyped'] THEN ''
                ELSE coalesce(v.coupon_code, '') END, coalesce(v.affiliate_id, ''),
           v.channel, v.sub1, v.country, v.device_type,
           sign, sign * (v.status = 'pending')::int, sign * (v.status = 'approved')::int,
           sign * (v.status = 'flagged')::int, sign * (v.status = 'rejected')::int,
           sign * (v.status = 'reversed')::int,
           CASE WHEN v.status IN ('pending', 'approved') THEN sign * (v.amount_micros - v.refunded_micros) ELSE 0 END,
           CASE WHEN v.status IN ('pending', 'approved') THEN sign * v.discount_micros ELSE 0 END,
           CASE WHEN v.status IN ('pending', 'approved') THEN sign * v.payout_micros ELSE 0 END,
           sign * v.refunded_micros, sign * v.holds_coupon_use::int
$$;

-- The rollups of what was recorded before this migration, rebuilt under the
-- keys above: deltas written by the earlier triggers carry the old keys, and
-- a later change of such an order would subtract under the new ones.
TRUNCATE report_rollup, report_rollup_campaign, report_rollup_coupon_day, report_rollup_account;
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
INSERT INTO report_rollup_account
SELECT bucket, currency,
       sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions), sum(pending),
       sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros), sum(discount_micros),
       sum(payout_micros), sum(refunded_micros), sum(uses_taken), false
  FROM report_rollup_campaign GROUP BY 1, 2;
