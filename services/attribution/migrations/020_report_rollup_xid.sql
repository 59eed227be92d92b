-- ascribe: no transaction
-- (services/attribution/migrate.py: each statement commits by itself, and
-- each is safe to run again after a failure part-way.)
--
-- Reports (issue #14): every row of the fine tier says which transaction
-- wrote it, so that the background pass of migration 021 can take each row
-- into the day blocks exactly once. A transaction id, unlike the fold's
-- sequence numbers (017), tells rows that may still commit from rows that
-- never will: every transaction older than a snapshot's xmin has ended.
--
-- Rows written before this migration keep no id (NULL): the first pass
-- takes them all. The column has no default when added (a volatile default
-- would rewrite the table), then gets one for every later row. Each ALTER
-- waits for the table's lock at most 5 s; the start-up that gets the timeout
-- fails, and the next runs the file again.
SET lock_timeout = '5s';
ALTER TABLE report_rollup ADD COLUMN IF NOT EXISTS xid xid8;
ALTER TABLE report_rollup ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
RESET lock_timeout;
-- A report reads the rows not yet in blocks by it, beside the blocks, and
-- the pass finds them by it. Rows with no id (before this migration, or
-- folded after the blocks took them) are left out; a key's single row keeps
-- its id, so this index holds about every row of the tier, as 016's index on
-- the sequence numbers it replaces did.
DROP INDEX CONCURRENTLY IF EXISTS report_rollup_xid_idx;
CREATE INDEX CONCURRENTLY report_rollup_xid_idx ON report_rollup (xid) WHERE xid IS NOT NULL;
