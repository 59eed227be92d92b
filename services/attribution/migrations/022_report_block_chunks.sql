-- Reports (issue #14): the day blocks' first pass in chunks of rows.
--
-- 021's first pass took every row of the fine tier in one statement (about
-- 90 s per million rows on 2 cores): past about 40M rows it could not end
-- within its hour, so it started again at every interval and never ended,
-- and the folds of the other tiers, in the same statement, were undone with
-- it. Now the first pass (and a rebuild after a restore) walks the fine tier
-- in order of buckets, at most chunk_rows rows a pass, each pass in its own
-- transaction. Reports read no block until the last chunk is in (the
-- watermark stays NULL); they stay exact from the fine tier meanwhile.
--
-- While it walks, report_block_watermarks keeps where it is: the blocks
-- hold every row of a bucket before backfilled_until that has no id or was
-- written before backfill_low (the xmin of the last pass). A pass first
-- takes the rows of those buckets written since (late orders, refunds of old
-- orders), then its chunk's rows; the last chunk sets the watermark.
--
-- One pass at a time (store.compact's lock): a pass of 021 still running on
-- a replica of the previous release holds the watermark's row.
SELECT pg_advisory_xact_lock(hashtextextended('ascribe_report_compact', 0));
SET LOCAL lock_timeout = '5s';
ALTER TABLE report_block_watermarks
    ADD COLUMN backfill_low xid8,
    ADD COLUMN backfilled_until timestamptz;
CREATE OR REPLACE FUNCTION ascribe_report_compact(chunk_rows bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    high xid8;
    low xid8;
    built boolean;
    until timestamptz;
    next_until timestamptz;
    taken text;
    removed bigint;
BEGIN
    IF chunk_rows IS NULL OR chunk_rows < 1 THEN
        RAISE EXCEPTION 'chunk_rows must be at least 1, not %', chunk_rows;
    END IF;
    SELECT w.watermark IS NOT NULL, coalesce(w.watermark, w.backfill_low), w.backfilled_until
      INTO built, low, until
      FROM report_block_watermarks w WHERE w.tier = 'report_block_coupon_country' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no block watermark for report_block_coupon_country';
    END IF;
    -- taken once the watermark's row is locked: a later pass never sees a lower one
    high := pg_snapshot_xmin(pg_current_snapshot());
    IF high < low THEN
        RAISE WARNING 'report blocks: transaction ids went back from % to % (a restore into another cluster?);'
                      ' rebuilding the blocks', low, high;
        TRUNCATE report_block_coupon_country;
        UPDATE report_rollup SET xid = NULL WHERE xid >= high;
        built := false;
        low := NULL;
        until := NULL;
    ELSIF built AND high = low THEN
        RETURN 0;
    END IF;
    IF built THEN
        taken := 'r.xid >= $1 AND r.xid < $2';
    ELSE
        -- The chunk: from where the last one ended (at first, the first
        -- bucket there is) to the bucket chunk_rows rows further, or to the
        -- end (NULL).
        IF until IS NULL THEN
            SELECT min(r.bucket) INTO until FROM report_rollup r;
        END IF;
        SELECT r.bucket INTO next_until FROM report_rollup r WHERE r.bucket >= until
         ORDER BY r.bucket OFFSET chunk_rows LIMIT 1;
        IF next_until = until THEN  -- more rows in one bucket than a chunk: that bucket whole
            SELECT min(r.bucket) INTO next_until FROM report_rollup r WHERE r.bucket > until;
        END IF;
        -- The rows of the buckets walked written since the last pass (none
        -- at first: low is NULL), and the chunk's rows with no id or
        -- written before this pass.
        taken := '(r.bucket < $3 AND r.xid >= $1 AND r.xid < $2)'
                 ' OR (r.bucket >= $3 AND ($4::timestamptz IS NULL OR r.bucket < $4)'
                 ' AND (r.xid IS NULL OR r.xid < $2))';
    END IF;
    EXECUTE format(
        $sql$
        WITH days AS MATERIALIZED (
            SELECT date_bin('1 day', r.bucket, timestamptz '2000-01-01 00:00:00+00') AS day,
                   r.campaign_id, r.currency, r.coupon, r.country,
                   ascribe_report_sum(clicks) AS clicks, ascribe_report_sum(unique_clicks) AS unique_clicks,
                   ascribe_report_sum(tracked_clicks) AS tracked_clicks,
                   ascribe_report_sum(rejected_clicks) AS rejected_clicks,
                   ascribe_report_sum(conversions) AS conversions, ascribe_report_sum(pending) AS pending,
                   ascribe_report_sum(approved) AS approved, ascribe_report_sum(flagged) AS flagged,
                   ascribe_report_sum(rejected) AS rejected, ascribe_report_sum(reversed) AS reversed,
                   ascribe_report_sum(revenue_micros) AS revenue_micros,
                   ascribe_report_sum(discount_micros) AS discount_micros,
                   ascribe_report_sum(payout_micros) AS payout_micros,
                   ascribe_report_sum(refunded_micros) AS refunded_micros,
                   ascribe_report_sum(uses_taken) AS uses_taken
              FROM report_rollup r WHERE %s
             GROUP BY 1, 2, 3, 4, 5
        )
        INSERT INTO report_block_coupon_country AS b
        SELECT l.days, date_bin(make_interval(days => l.days), d.day, timestamptz '2000-01-01 00:00:00+00'),
               d.campaign_id, d.currency, d.coupon, d.country,
               ascribe_report_sum(clicks), ascribe_report_sum(unique_clicks), ascribe_report_sum(tracked_clicks),
               ascribe_report_sum(rejected_clicks), ascribe_report_sum(conversions), ascribe_report_sum(pending),
               ascribe_report_sum(approved), ascribe_report_sum(flagged), ascribe_report_sum(rejected),
               ascribe_report_sum(reversed), ascribe_report_sum(revenue_micros),
               ascribe_report_sum(discount_micros), ascribe_report_sum(payout_micros),
               ascribe_report_sum(refunded_micros), ascribe_report_sum(uses_taken)
          FROM days d CROSS JOIN unnest(ARRAY[1, 2, 4, 8, 16, 32]::smallint[]) AS l(days)
         GROUP BY 1, 2, 3, 4, 5, 6
        ON CONFLICT (days, bucket, campaign_id, currency, coupon, country) DO UPDATE SET
            clicks = b.clicks + excluded.clicks, unique_clicks = b.unique_clicks + excluded.unique_clicks,
            tracked_clicks = b.tracked_clicks + excluded.tracked_clicks,
            rejected_clicks = b.rejected_clicks + excluded.rejected_clicks,
            conversions = b.conversions + excluded.conversions, pending = b.pending + excluded.pending,
            approved = b.approved + excluded.approved, flagged = b.flagged + excluded.flagged,
            rejected = b.rejected + excluded.rejected, reversed = b.reversed + excluded.reversed,
            revenue_micros = b.revenue_micros + excluded.revenue_micros,
            discount_micros = b.discount_micros + excluded.discount_micros,
            payout_micros = b.payout_micros + excluded.payout_micros,
            refunded_micros = b.refunded_micros + excluded.refunded_micros,
            uses_taken = b.uses_taken + excluded.uses_taken
        $sql$, taken)
    USING low, high, until, next_until;
    EXECUTE format(
        $sql$
        WITH fresh AS (
            SELECT DISTINCT bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device
              FROM report_rollup r WHERE %s
        ), shared AS (
            SELECT f.* FROM fresh f JOIN report_rollup r USING (bucket, campaign_id, currency, coupon, affiliate_id,
                                                                channel, sub1, country, device)
             WHERE r.xid IS NULL OR r.xid < $2
             GROUP BY f.bucket, f.campaign_id, f.currency, f.coupon, f.affiliate_id, f.channel, f.sub1, f.country,
                      f.device
            HAVING count(*) > 1
        ), gone AS (
            DELETE FROM report_rollup r USING shared f
             WHERE (r.bucket, r.campaign_id, r.currency, r.coupon, r.affiliate_id, r.channel, r.sub1, r.country,
                    r.device)
                 = (f.bucket, f.campaign_id, f.currency, f.coupon, f.affiliate_id, f.channel, f.sub1, f.country,
                    f.device)
               AND (r.xid IS NULL OR r.xid < $2)
            RETURNING r.*
        ), folded AS (
            INSERT INTO report_rollup (bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country,
                                       device, clicks, unique_clicks, tracked_clicks, rejected_clicks, conversions,
                                       pending, approved, flagged, rejected, reversed, revenue_micros,
                                       discount_micros, payout_micros, refunded_micros, uses_taken, seq, xid)
            SELECT bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device,
                   ascribe_report_sum(clicks), ascribe_report_sum(unique_clicks), ascribe_report_sum(tracked_clicks),
                   ascribe_report_sum(rejected_clicks), ascribe_report_sum(conversions),
                   ascribe_report_sum(pending), ascribe_report_sum(approved), ascribe_report_sum(flagged),
                   ascribe_report_sum(rejected), ascribe_report_sum(reversed), ascribe_report_sum(revenue_micros),
                   ascribe_report_sum(discount_micros), ascribe_report_sum(payout_micros),
                   ascribe_report_sum(refunded_micros), ascribe_report_sum(uses_taken), NULL, NULL
              FROM gone
             GROUP BY bucket, campaign_id, currency, coupon, affiliate_id, channel, sub1, country, device
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM folded)
        $sql$, taken)
    INTO removed USING low, high, until, next_until;
    IF built OR next_until IS NULL THEN
        UPDATE report_block_watermarks w SET watermark = high, backfill_low = NULL, backfilled_until = NULL
         WHERE w.tier = 'report_block_coupon_country';
    ELSE
        UPDATE report_block_watermarks w SET watermark = NULL, backfill_low = high, backfilled_until = next_until
         WHERE w.tier = 'report_block_coupon_country';
    END IF;
    RETURN removed;
END $$;
-- Every replica's compaction job calls it with no argument: a million rows
-- a chunk (about 90 s on 2 cores).
CREATE OR REPLACE FUNCTION ascribe_report_compact() RETURNS bigint LANGUAGE sql AS $$
    SELECT ascribe_report_compact(1000000)
$$;
