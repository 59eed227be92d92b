-- ascribe: no transaction
-- (services/attribution/migrate.py: each statement commits by itself, and
-- each is safe to run again after a failure part-way.)
--
-- Codes and checkout (issue #15): AssignCode hands a batch's code to an
-- affiliate as it does to a customer. The affiliate becomes the code's only
-- carrier (allow_all_affiliates false, affiliate_ids [it]), so a sale with the
-- code and no click credits it; this column says who the code was handed to,
-- so that the same affiliate asking again gets the same code and a customer's
-- AssignCode never takes it.
--
-- A NOT NULL column with a constant default is only a catalog change (no
-- table rewrite), but its ALTER needs the table's lock: it waits for it at
-- most 5 s (behind a long ExportCodes, say) rather than hold every
-- conversion's coupon lookup queued behind it; the start-up that gets the
-- timeout fails, and the next runs the file again.
SET lock_timeout = '5s';
ALTER TABLE coupons ADD COLUMN IF NOT EXISTS assigned_affiliate_id text NOT NULL DEFAULT '';
-- A code has one holder. The previous release's AssignCode knows nothing of
-- affiliates and would hand an affiliate's code to a customer: while both
-- releases run (a rolling deploy, a rollback), its statement fails on this
-- instead. NOT VALID takes the lock only for a moment; VALIDATE reads the
-- table without keeping writers waiting.
ALTER TABLE coupons DROP CONSTRAINT IF EXISTS coupons_one_holder,
    ADD CONSTRAINT coupons_one_holder CHECK (assigned_customer_id = '' OR assigned_affiliate_id = '') NOT VALID;
RESET lock_timeout;
ALTER TABLE coupons VALIDATE CONSTRAINT coupons_one_holder;
-- One code per affiliate and batch: two concurrent AssignCode calls for the
-- same affiliate cannot both commit a code; the loser reads the winner's.
-- Built CONCURRENTLY (a million-code batch keeps taking uses meanwhile); the
-- index is empty when it is built, every row being ''. A build that failed
-- part-way leaves an invalid index of the name behind: dropped first.
DROP INDEX CONCURRENTLY IF EXISTS coupons_one_per_affiliate;
CREATE UNIQUE INDEX CONCURRENTLY coupons_one_per_affiliate ON coupons (batch_id, assigned_affiliate_id)
    WHERE batch_id IS NOT NULL AND assigned_affiliate_id <> '';
