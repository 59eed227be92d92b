-- Reports (issue #14): a sum of bigints that stays a bigint. sum(bigint)
-- keeps a 128-bit state and answers numeric, which the reports cast back: for
-- every key, a numeric built and converted per metric, and a state allocated
-- per group. This one adds in place (int8pl, which raises on overflow rather
-- than wrap) and answers the bigint: the same totals, measured on the bench's
-- one affiliate by sub1 and country 2-3 times faster, its export by coupon
-- and country 30-50 % faster. Over no rows it is NULL, as sum is.
CREATE AGGREGATE ascribe_report_sum(bigint) (
    SFUNC = int8pl,
    STYPE = bigint,
    COMBINEFUNC = int8pl,
    PARALLEL = SAFE
);
