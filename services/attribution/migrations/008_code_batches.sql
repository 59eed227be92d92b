-- Codes at scale: batches with their code shape, bulk generation without a
-- per-row foreign-key check, and the indexes AssignCode needs.

-- What each batch of codes is: the shape of its generated codes (prefix,
-- random symbols, one check symbol; NULL for an imported batch, whose codes
-- have no shape), so that a code with the shape but a wrong check symbol is
-- told apart as coupon_mistyped rather than unknown_coupon. Written in the
-- transaction that stores the batch's codes: a failed batch leaves no row.
CREATE TABLE code_batches (
    batch_id     text PRIMARY KEY,
    campaign_id  text NOT NULL REFERENCES campaigns (id),
    source       text NOT NULL CHECK (source IN ('generated', 'imported')),
    prefix       text,
    length       int CHECK (length > 0),
    codes        bigint NOT NULL CHECK (codes >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((source = 'generated') = (length IS NOT NULL AND prefix IS NOT NULL))
);
CREATE INDEX code_batches_campaign ON code_batches (campaign_id) WHERE source = 'generated';

-- The foreign key from coupons to campaigns ran one referential check (a
-- SELECT ... FOR KEY SHARE of the campaign row) per inserted code: for a
-- million generated codes that was more than half of the COPY's time. Every
-- insert into coupons (catalog.store) now takes that same FOR KEY SHARE lock
-- on the campaign once, in its transaction, after checking that it exists:
-- the same guarantee (the campaign cannot vanish before the codes commit)
-- for one lookup per batch. Campaigns are never deleted by the service.
ALTER TABLE coupons DROP CONSTRAINT coupons_campaign_id_fkey;

-- A batch's codes by customer: ExportCodes reads a batch through it, AssignCode
-- finds the customer's code (batch_id, customer) or a free one (batch_id, '').
-- Generated rows all carry (batch_id, ''), so they append to one end of the
-- index, as the single-column index they replace did.
DROP INDEX coupons_batch;
CREATE INDEX coupons_batch_customer ON coupons (batch_id, assigned_customer_id) WHERE batch_id IS NOT NULL;
-- One code per customer and batch: two concurrent AssignCode calls for the
-- same customer cannot both commit a code; the loser reads the winner's.
CREATE UNIQUE INDEX coupons_one_per_customer ON coupons (batch_id, assigned_customer_id)
    WHERE batch_id IS NOT NULL AND assigned_customer_id <> '';
