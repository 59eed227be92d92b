-- A regular-expression CHECK on every coupon row cost PostgreSQL about as
-- much as the rest of a bulk insert (GenerateCodes writes a million rows).
-- The catalog validates a code's alphabet before any insert; the schema keeps
-- the cheap guards: length, and upper case (codes are stored normalized).
ALTER TABLE coupons DROP CONSTRAINT coupons_code_check;
ALTER TABLE coupons ADD CONSTRAINT coupons_code_shape
    CHECK (char_length(code) BETWEEN 3 AND 64 AND code = upper(code));
