-- LINE calls that failed for good: a 4xx other than 409 and 429, or the
-- last of their attempts. Each row keeps the whole queued call (protobuf
-- `QueuedCall`), so a replay sends exactly what failed, with the same
-- X-Line-Retry-Key.
CREATE TABLE dead_letters (
    tenant_id      text        NOT NULL,
    -- Derived from the call's parts, so the same call dead-lettered again
    -- (after a replay, or when a worker died before acknowledging) is the
    -- same row.
    dead_letter_id text        NOT NULL,
    channel_id     text        NOT NULL,
    job_ids        text[]      NOT NULL,
    endpoint       text        NOT NULL,
    recipients     bigint      NOT NULL,
    line_status    integer     NOT NULL,
    line_body      text        NOT NULL,
    call           bytea       NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now(),
    replay_count   integer     NOT NULL DEFAULT 0,
    -- Set when replayed; a replayed dead letter is no longer listed.
    replayed_at    timestamptz,
    PRIMARY KEY (tenant_id, dead_letter_id)
);

CREATE INDEX dead_letters_listing
    ON dead_letters (tenant_id, dead_at DESC, dead_letter_id)
    WHERE replayed_at IS NULL;
