-- Holdout experiments (issue #17): the experiment, the units assigned to an
-- arm (visitors of tracking links and units of AssignVariant), and the arm of
-- each click. Conversions are not touched: they reach an arm at result time,
-- through their click or their customer id (equal to a unit id).

CREATE TABLE experiments (
    id                     text PRIMARY KEY,
    campaign_id            text NOT NULL REFERENCES campaigns (id),
    coupon_code            text NOT NULL,           -- normalized (upper-case)
    name                   text NOT NULL DEFAULT '',
    holdout_percent        int NOT NULL CHECK (holdout_percent BETWEEN 1 AND 50),
    starts_at              timestamptz NOT NULL,
    ends_at                timestamptz,             -- NULL: until stopped
    min_detectable_effect  double precision NOT NULL CHECK (min_detectable_effect > 0),
    margin_percent         double precision CHECK (margin_percent BETWEEN 0 AND 100),
    created_at             timestamptz NOT NULL DEFAULT now(),
    -- Set by StopExperiment, or to ends_at when a new experiment on the code
    -- finds this one already ended: "open" means stopped_at IS NULL.
    stopped_at             timestamptz,
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);
-- One open experiment per code: a second is ALREADY_EXISTS, on any replica.
CREATE UNIQUE INDEX experiments_one_open_per_code
    ON experiments (campaign_id, coupon_code) WHERE stopped_at IS NULL;
CREATE INDEX experiments_campaign ON experiments (campaign_id, created_at);

-- One row per unit and experiment: the first time it was assigned (a repeat
-- click or a second AssignVariant is not a new unit). The segment values are
-- the first click's; an AssignVariant unit has none.
CREATE TABLE experiment_units (
    experiment_id  text NOT NULL REFERENCES experiments (id),
    unit_key       text NOT NULL,   -- the vid or unit id; else a digest of IP and user agent
    arm            text NOT NULL CHECK (arm IN ('treatment', 'control')),
    source         text NOT NULL CHECK (source IN ('click', 'variant')),
    affiliate_id   text,
    country        text,
    device_type    text,
    first_seen_at  timestamptz NOT NULL,
    PRIMARY KEY (experiment_id, unit_key)
);

-- The arm of each click that joined one (written with the click, in its group commit).
CREATE TABLE experiment_clicks (
    click_id       text PRIMARY KEY,
    created_at     timestamptz NOT NULL,
    experiment_id  text NOT NULL REFERENCES experiments (id),
    unit_key       text NOT NULL,
    arm            text NOT NULL CHECK (arm IN ('treatment', 'control'))
);
CREATE INDEX experiment_clicks_experiment ON experiment_clicks (experiment_id);
CREATE INDEX conversions_customer ON conversions (campaign_id, customer_id) WHERE customer_id IS NOT NULL;
