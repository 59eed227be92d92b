-- Reports (issues #14 and #17): the raw facts name their event, so a report
-- of one experiment joins them to the arm tables (011); an experiment's
-- events are a small set, read raw, and no rollup keeps arms. Then a coarser
-- tier for reports of the whole account by time.
CREATE OR REPLACE VIEW report_click_facts AS
SELECT date_bin('15 minutes', k.occurred_at, timestamptz '2000-01-01 00:00:00+00') AS bucket,
       k.occurred_at AS at,
       k.campaign_id, coalesce(c.currency, '') AS currency, coalesce(k.coupon_code, '') AS coupon,
       k.affiliate_id, coalesce(a.channel, '') AS channel, coalesce(k.sub1, '') AS sub1,
       coalesce(k.country, '') AS country, coalesce(k.device_type, '') AS device,
       1 AS clicks, k.is_unique::int AS unique_clicks, (k.coupon_code IS NOT NULL)::int AS tracked_clicks,
       (k.decision = 'rejected')::int AS rejected_clicks,
       k.click_id
  FROM clicks k
  LEFT JOIN campaigns c ON c.id = k.campaign_id
  LEFT JOIN affiliates a ON a.id = k.affiliate_id;

CREATE OR REPLACE VIEW report_conversion_facts AS
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
       v.refunded_micros, v.holds_coupon_use::int AS uses_taken,
       v.id AS conversion_id
  FROM conversions v;


-- The account tier (report speed): the same deltas per bucket and currency
-- alone, a row or two a bucket whatever the number of campaigns, for reports
-- that filter and group by nothing but time (a month of the whole account by
-- day in any zone: about 3,000 rows instead of 3,000 a campaign). The
-- triggers fill it in the same statement as the other tiers.
CREATE TABLE report_rollup_account (LIKE report_rollup_campaign INCLUDING DEFAULTS);
ALTER TABLE report_rollup_account DROP COLUMN campaign_id;
CREATE INDEX report_rollup_account_time ON report_rollup_account (bucket);
CREATE INDEX report_rollup_account_fresh ON report_rollup_account (bucket) WHERE NOT compacted;

CREATE OR REPLACE FUNCTION ascribe_report_clicks() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE FUNCTION ascribe_report_conversions() RETURNS trigger LANGUAGE plpgsql AS $$
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
        ), by_account AS (
        INSERT INTO report_rollup_account (bucket, currency, conversions, pending, approved, flagged, rejected,
                                           reversed, revenue_micros, discount_micros, payout_micros,
                                           refunded_micros, uses_taken)
        SELECT bucket, currency, sum(conversions), sum(pending), sum(approved), sum(flagged), sum(rejected),
               sum(reversed), sum(revenue_micros), sum(discount_micros), sum(payout_micros),
               sum(refunded_micros), sum(uses_taken)
          FROM fine GROUP BY 1, 2
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
        ), by_account AS (
        INSERT INTO report_rollup_account (bucket, currency, conversions, pending, approved, flagged, rejected,
                                           reversed, revenue_micros, discount_micros, payout_micros,
                                           refunded_micros, uses_taken)
        SELECT bucket, currency, sum(conversions), sum(pending), sum(approved), sum(flagged), sum(rejected),
               sum(reversed), sum(revenue_micros), sum(discount_micros), sum(payout_micros),
               sum(refunded_micros), sum(uses_taken)
          FROM fine GROUP BY 1, 2
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

CREATE FUNCTION ascribe_report_compact_account() RETURNS bigint LANGUAGE sql AS $$
    WITH fresh AS (
        SELECT DISTINCT bucket, currency FROM report_rollup_account WHERE NOT compacted
    ), gone AS (
        DELETE FROM report_rollup_account r USING fresh f
         WHERE r.bucket = f.bucket AND r.currency = f.currency
        RETURNING r.*
    ), folded AS (
        INSERT INTO report_rollup_account
        SELECT bucket, currency,
               sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions),
               sum(pending), sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros),
               sum(discount_micros), sum(payout_micros), sum(refunded_micros), sum(uses_taken), true
          FROM gone
         GROUP BY bucket, currency
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM folded)
$$;

-- What was recorded before this migration.
INSERT INTO report_rollup_account
SELECT bucket, currency,
       sum(clicks), sum(unique_clicks), sum(tracked_clicks), sum(rejected_clicks), sum(conversions), sum(pending),
       sum(approved), sum(flagged), sum(rejected), sum(reversed), sum(revenue_micros), sum(discount_micros),
       sum(payout_micros), sum(refunded_micros), sum(uses_taken), false
  FROM report_rollup_campaign GROUP BY 1, 2;
