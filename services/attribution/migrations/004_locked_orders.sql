-- A conversion batch first serializes its orders (transaction-scoped advisory
-- locks, in a fixed order) and then reads what is stored for them. Two
-- statements were two round trips; one statement cannot do both, because it
-- would read with the snapshot it took before waiting for a lock and miss the
-- row the lock holder committed meanwhile. In a VOLATILE PL/pgSQL function
-- under READ COMMITTED every statement takes a new snapshot, so the read after
-- the locks sees every order committed before they were granted.
CREATE OR REPLACE FUNCTION ascribe_locked_orders(lock_keys text[], campaign_ids text[], order_ids text[])
RETURNS SETOF conversions
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(h)
       FROM (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest(lock_keys) AS k ORDER BY h) s;
    RETURN QUERY
        SELECT c.*
          FROM conversions c
          JOIN unnest(campaign_ids, order_ids) AS k(campaign_id, order_id) USING (campaign_id, order_id);
END
$$;
