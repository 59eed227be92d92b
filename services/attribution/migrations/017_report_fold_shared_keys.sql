-- Reports (issue #14): the fold rewrites only keys that have more than one row.
--
-- Until now every delta row was written twice: inserted by the event's
-- trigger (compacted = false), then deleted and inserted again by the fold,
-- even when it was its key's only row. In the fine tier that is nearly every
-- row (a key is a 15-minute bucket and eight dimensions: most events are
-- the only one of their key), so the fold doubled the tier's writes, its
-- WAL and its indexes' churn, and a bulk load left the table and its
-- covering indexes twice their size (the bench's 10M clicks: 4.6 GB of heap
-- for 11M rows). Now every rollup row carries a number from one sequence
-- (`seq`, migration 016); a fold looks at the rows numbered above its tier's
-- watermark, folds the keys among them that have another row into one
-- unnumbered row, and leaves single rows where they are.
--
-- A row numbered below the watermark that commits after a fold moved past it
-- is never looked at as fresh: its key is folded when a later row of the key
-- arrives, or never. Reports sum every row, so that costs a row, not a cent.

-- No fold of a replica still running the old code (store.compact's lock),
-- and no writer: the last old fold below sees every committed row, and the
-- watermarks start past every number handed out. Tables in the order the
-- triggers write them.
SELECT pg_advisory_xact_lock(hashtextextended('ascribe_report_compact', 0));
LOCK TABLE report_rollup, report_rollup_account, report_rollup_coupon_day, report_rollup_campaign
    IN ACCESS EXCLUSIVE MODE;
SELECT ascribe_report_compact() + ascribe_report_compact_campaign() + ascribe_report_compact_coupon_day()
       + ascribe_report_compact_account();
DROP INDEX report_rollup_fresh, report_rollup_account_fresh;
ALTER TABLE report_rollup DROP COLUMN compacted;
ALTER TABLE report_rollup_campaign DROP COLUMN compacted;
ALTER TABLE report_rollup_coupon_day DROP COLUMN compacted;
ALTER TABLE report_rollup_account DROP COLUMN compacted;

-- Where each tier's last fold stopped.
CREATE TABLE report_fold_watermarks (
    tier      text PRIMARY KEY,
    watermark bigint NOT NULL
);
INSERT INTO report_fold_watermarks
SELECT tier, coalesce(pg_sequence_last_value('report_rollup_seq'), 0)
  FROM unnest(ARRAY['report_rollup', 'report_rollup_campaign', 'report_rollup_coupon_day',
                    'report_rollup_account']) AS tier;

-- Folds one tier: each key (its dimension columns) of the rows numbered
-- since its watermark that has more than one row becomes one unnumbered row.
-- Answers how many rows it removed. Callers serialize folds with an
-- advisory lock; the watermark row's lock keeps two folds of a tier apart
-- even without it.
CREATE FUNCTION ascribe_report_fold(tier text, keys text[]) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    low bigint;
    high bigint;
    removed bigint;
    metrics constant text[] := ARRAY['clicks', 'unique_clicks', 'tracked_clicks', 'rejected_clicks',
        'conversions', 'pending', 'approved', 'flagged', 'rejected', 'reversed', 'revenue_micros',
        'discount_micros', 'payout_micros', 'refunded_micros', 'uses_taken'];
    key_list text := (SELECT string_agg(format('%I', k), ', ') FROM unnest(keys) k);
    fresh_keys text := (SELECT string_agg(format('f.%I', k), ', ') FROM unnest(keys) k);
    same_key text := (SELECT string_agg(format('r.%1$I = f.%1$I', k), ' AND ') FROM unnest(keys) k);
    metric_list text := array_to_string(metrics, ', ');
    sums text := (SELECT string_agg(format('ascribe_report_sum(%I)', m), ', ') FROM unnest(metrics) m);
BEGIN
    SELECT w.watermark INTO low FROM report_fold_watermarks w WHERE w.tier = ascribe_report_fold.tier FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no fold watermark for %', tier;
    END IF;
    EXECUTE format('SELECT max(seq) FROM %I WHERE seq > $1', tier) INTO high USING low;
    IF high IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format(
        $sql$
        WITH fresh AS (
            SELECT DISTINCT %2$s FROM %1$I WHERE seq > $1 AND seq <= $2
        ), shared AS (
            SELECT %3$s FROM fresh f JOIN %1$I r ON %4$s GROUP BY %3$s HAVING count(*) > 1
        ), gone AS (
            DELETE FROM %1$I r USING shared f WHERE %4$s RETURNING r.*
        ), folded AS (
            INSERT INTO %1$I (%2$s, %5$s, seq)
            SELECT %2$s, %6$s, NULL FROM gone GROUP BY %2$s
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM folded)
        $sql$,
        tier, key_list, fresh_keys, same_key, metric_list, sums)
    INTO removed USING low, high;
    UPDATE report_fold_watermarks w SET watermark = high WHERE w.tier = ascribe_report_fold.tier;
    RETURN removed;
END $$;

-- The four folds keep their names (every replica's compaction job calls them).
CREATE OR REPLACE FUNCTION ascribe_report_compact() RETURNS bigint LANGUAGE sql AS $$
    SELECT ascribe_report_fold('report_rollup', ARRAY['bucket', 'campaign_id', 'currency', 'coupon', 'affiliate_id',
                                                      'channel', 'sub1', 'country', 'device'])
$$;
CREATE OR REPLACE FUNCTION ascribe_report_compact_campaign() RETURNS bigint LANGUAGE sql AS $$
    SELECT ascribe_report_fold('report_rollup_campaign', ARRAY['bucket', 'campaign_id', 'currency'])
$$;
CREATE OR REPLACE FUNCTION ascribe_report_compact_coupon_day() RETURNS bigint LANGUAGE sql AS $$
    SELECT ascribe_report_fold('report_rollup_coupon_day', ARRAY['bucket', 'campaign_id', 'currency', 'coupon'])
$$;
CREATE OR REPLACE FUNCTION ascribe_report_compact_account() RETURNS bigint LANGUAGE sql AS $$
    SELECT ascribe_report_fold('report_rollup_account', ARRAY['bucket', 'currency'])
$$;
