-- Runs: one execution of a scenario version for one contact, walking the
-- version's compiled program with a counter (`pc`). A run is claimed by one
-- executor at a time: `lease_until` is when an executor that stopped
-- answering loses it; a waiting run's `lease_until` is when it resumes.
CREATE TABLE runs (
    tenant_id        text        NOT NULL,
    run_id           text        NOT NULL,
    scenario_id      text        NOT NULL,
    version          bigint      NOT NULL,
    line_user_id     text        NOT NULL,
    channel_id       text        NOT NULL,
    -- running | waiting | completed | stopped | failed
    status           text        NOT NULL,
    pc               integer     NOT NULL DEFAULT 0,
    current_step_id  text        NOT NULL DEFAULT '',
    lease_until      timestamptz,
    trigger_event_id text        NOT NULL DEFAULT '',
    reply_token      text        NOT NULL DEFAULT '',
    reply_until      timestamptz,
    traceparent      text        NOT NULL DEFAULT '',
    error            text        NOT NULL DEFAULT '',
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    PRIMARY KEY (tenant_id, run_id)
);

-- A redelivered event never starts a second run of a scenario.
CREATE UNIQUE INDEX runs_per_trigger_event
    ON runs (tenant_id, scenario_id, trigger_event_id) WHERE trigger_event_id <> '';
CREATE INDEX runs_of_contact ON runs (tenant_id, line_user_id, started_at DESC);
CREATE INDEX runs_of_scenario ON runs (tenant_id, scenario_id, started_at DESC);
CREATE INDEX runs_active
    ON runs (tenant_id, scenario_id, line_user_id) WHERE status IN ('running', 'waiting');
CREATE INDEX runs_due ON runs (lease_until) WHERE status IN ('running', 'waiting');

-- Every executed step of a run, in order.
CREATE TABLE run_steps (
    tenant_id   text        NOT NULL,
    run_id      text        NOT NULL,
    seq         integer     NOT NULL,
    step_id     text        NOT NULL,
    executed_at timestamptz NOT NULL DEFAULT now(),
    detail      text        NOT NULL DEFAULT '',
    ok          boolean     NOT NULL,
    PRIMARY KEY (tenant_id, run_id, seq),
    FOREIGN KEY (tenant_id, run_id) REFERENCES runs ON DELETE CASCADE
);
