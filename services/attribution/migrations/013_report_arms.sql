-- Reports of one experiment (issues #14 and #17): the raw facts name their
-- event, so an experiment report joins them to the arm tables (011). An
-- experiment's events are a small set, read raw; no rollup keeps arms.
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
