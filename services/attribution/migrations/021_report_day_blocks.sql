-- Reports (issue #14): blocks of whole UTC days for a month-long report of
-- codes by country.
--
-- The fine tier keeps a 15-minute bucket and eight dimensions: on a busy
-- program nearly every event is its key's only row (the bench's 1M clicks
-- make 1.1M rows), so a month by coupon and country summed a month of
-- events. A daily tier would not be much smaller (2,000 codes times 60
-- countries are more keys than a day's events), but a block of many days is:
-- its keys stop growing while its events do. Blocks of 1, 2, 4, 8, 16 and 32
-- days, each aligned to a multiple of its length since 2000-01-01 (UTC),
-- cover any run of whole days with blocks of 32 days and at most two of
-- each shorter length; the bench's 30 days read 5 blocks and some fine rows
-- at the edges (1.1M -> 0.36M rows at 1M clicks).
--
-- The blocks keep the dimensions of codes by country (campaign, currency,
-- code, country): the export by coupon and country, a campaign's countries,
-- one country's codes. An affiliate's sub1s by country are not kept: at
-- 1M clicks 16-day blocks of them hold nearly a row per event.
-- No fold of a replica still running the previous release while this runs
-- (store.compact's lock): its fold holds report_fold_watermarks' rows and then
-- needs report_rollup, which this takes first (a deadlock).
SELECT pg_advisory_xact_lock(hashtextextended('ascribe_report_compact', 0));

CREATE TABLE report_block_coupon_country (
    days             smallint NOT NULL,
    bucket           timestamptz NOT NULL,  -- the block's first instant (00:00 UTC)
    campaign_id      text NOT NULL,
    currency         text NOT NULL,
    coupon           text NOT NULL,
    country          text NOT NULL,
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
    PRIMARY KEY (days, bucket, campaign_id, currency, coupon, country)
);

-- Which fine rows the blocks hold: every row written by a transaction older
-- than the watermark, and every row with no transaction id (written before
-- migration 020, or folded after the blocks took it). NULL until the first
-- pass: until then a report reads no block.
CREATE TABLE report_block_watermarks (
    tier      text PRIMARY KEY,
    watermark xid8
);
INSERT INTO report_block_watermarks VALUES ('report_block_coupon_country', NULL);

-- The fine tier's pass, under the name every replica's compaction job calls
-- (store.compact, one replica at a time). First the rows whose transactions
-- ended since the last pass go into the blocks; then the keys among them
-- with more than one row in the blocks become one row with no id. The
-- watermark moves in the same transaction: a report sees the blocks and the
-- watermark of one moment, and adds the fine rows at or above it.
--
-- This replaces 017's fold of the fine tier by sequence numbers: a row that
-- committed behind that watermark waited for another row of its key; here
-- the watermark is the snapshot's xmin, behind which no transaction can
-- still commit.
--
-- The xmin is taken once the watermark's row is locked: a later pass then
-- never sees a lower one. A lower one means the transaction ids went back,
-- which only a restore into another cluster does (a logical dump: the rows
-- keep the old cluster's ids); the blocks are then rebuilt from every row,
-- and reports read none meanwhile (store._block_watermark).
CREATE OR REPLACE FUNCTION ascribe_report_compact() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    high xid8;
    low xid8;
    built boolean;
    fresh text;
    removed bigint;
BEGIN
    SELECT w.watermark, w.watermark IS NOT NULL INTO low, built
      FROM report_block_watermarks w WHERE w.tier = 'report_block_coupon_country' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no block watermark for report_block_coupon_country';
    END IF;
    high := pg_snapshot_xmin(pg_current_snapshot());
    IF built AND high < low THEN
        RAISE WARNING 'report blocks: transaction ids went back from % to % (a restore into another cluster?);'
                      ' rebuilding the blocks', low, high;
        TRUNCATE report_block_coupon_country;
        UPDATE report_rollup SET xid = NULL WHERE xid >= high;
        built := false;
    ELSIF built AND high = low THEN
        RETURN 0;
    END IF;
    fresh := CASE WHEN built THEN 'r.xid >= $1 AND r.xid < $2' ELSE '(r.xid IS NULL OR r.xid < $2)' END;
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
        $sql$, fresh)
    USING low, high;
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
        $sql$, fresh)
    INTO removed USING low, high;
    UPDATE report_block_watermarks w SET watermark = high WHERE w.tier = 'report_block_coupon_country';
    RETURN removed;
END $$;

-- The fine tier's sequence numbers served 017's fold alone.
SET LOCAL lock_timeout = '5s';
ALTER TABLE report_rollup ALTER COLUMN seq DROP DEFAULT;
DROP INDEX IF EXISTS report_rollup_seq_idx;
DELETE FROM report_fold_watermarks WHERE tier = 'report_rollup';
