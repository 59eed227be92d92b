-- Campaigns, affiliates and coupon codes.
-- Enumerations are stored as lowercase words (the proto enum name after its
-- prefix) so that SQL audits read naturally.

CREATE TABLE campaigns (
    id                         text PRIMARY KEY,
    name                       text NOT NULL,
    landing_url                text NOT NULL,
    hold_days                  int NOT NULL DEFAULT 30 CHECK (hold_days >= 0),
    click_lookback_days        int NOT NULL DEFAULT 30 CHECK (click_lookback_days >= 1),
    max_conversions_per_click  int NOT NULL DEFAULT 1 CHECK (max_conversions_per_click >= 0),
    attribution_policy         text NOT NULL DEFAULT 'coupon_first'
                               CHECK (attribution_policy IN ('coupon_first', 'click_first')),
    payout_micros              bigint NOT NULL DEFAULT 0 CHECK (payout_micros >= 0),
    payout_percent_bp          int NOT NULL DEFAULT 0 CHECK (payout_percent_bp BETWEEN 0 AND 10000),
    currency                   text NOT NULL,
    -- Only a SHA-256 of the postback token is kept: the token itself is shown once.
    postback_token_sha256      bytea NOT NULL,
    reuse_unique_after_refund  boolean NOT NULL DEFAULT false,
    status                     text NOT NULL DEFAULT 'active'
                               CHECK (status IN ('active', 'paused', 'ended')),
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    CHECK (payout_micros = 0 OR payout_percent_bp = 0)
);

CREATE TABLE affiliates (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    channel     text NOT NULL DEFAULT '',
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE coupons (
    campaign_id           text NOT NULL REFERENCES campaigns (id),
    code                  text NOT NULL CHECK (code ~ '^[A-Z0-9_-]{3,64}$'),
    kind                  text NOT NULL CHECK (kind IN ('general', 'exclusive', 'unique')),
    status                text NOT NULL DEFAULT 'active'
                          CHECK (status IN ('active', 'pending', 'rejected', 'hold', 'paused')),
    valid_from            timestamptz,
    valid_until           timestamptz,
    usage_limit           bigint NOT NULL DEFAULT 0 CHECK (usage_limit >= 0),
    used                  bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    allow_all_affiliates  boolean NOT NULL DEFAULT false,
    -- In the order given: the first is the primary owner.
    affiliate_ids         text[] NOT NULL DEFAULT '{}',
    per_customer_limit    int NOT NULL DEFAULT 0 CHECK (per_customer_limit >= 0),
    discount_percent_bp   int NOT NULL DEFAULT 0 CHECK (discount_percent_bp BETWEEN 0 AND 10000),
    discount_micros       bigint NOT NULL DEFAULT 0 CHECK (discount_micros >= 0),
    countries             text[] NOT NULL DEFAULT '{}',
    device_types          text[] NOT NULL DEFAULT '{}',
    channels              text[] NOT NULL DEFAULT '{}',
    skus                  text[] NOT NULL DEFAULT '{}',
    min_order_micros      bigint NOT NULL DEFAULT 0 CHECK (min_order_micros >= 0),
    assigned_customer_id  text NOT NULL DEFAULT '',
    batch_id              text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, code),
    -- The last line of defence for exact limits: whatever the code path,
    -- PostgreSQL refuses a use past the limit.
    CHECK (usage_limit = 0 OR used <= usage_limit),
    CHECK (valid_from IS NULL OR valid_until IS NULL OR valid_from < valid_until)
);
CREATE INDEX coupons_batch ON coupons (batch_id) WHERE batch_id IS NOT NULL;

-- Status changes of coupons made by people or by the leak response.
CREATE TABLE coupon_events (
    id           bigserial PRIMARY KEY,
    campaign_id  text NOT NULL,
    code         text NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    from_status  text,
    to_status    text,
    detail       text NOT NULL DEFAULT ''
);
CREATE INDEX coupon_events_code ON coupon_events (campaign_id, code, id);
