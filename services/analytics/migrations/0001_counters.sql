-- Live segment counts: folded from contacts' membership changes (+1 or -1
-- each), bulk deltas and snapshots (a deleted segment's count set to 0).
-- `version` grows with every change, so a watcher asks only for what
-- changed since it last looked.
CREATE SEQUENCE segment_counts_version;
CREATE TABLE segment_counts (
    tenant_id    text        NOT NULL,
    segment_id   text        NOT NULL,
    member_count bigint      NOT NULL,
    as_of        timestamptz NOT NULL,
    deleted      boolean     NOT NULL DEFAULT false,
    version      bigint      NOT NULL DEFAULT nextval('segment_counts_version'),
    PRIMARY KEY (tenant_id, segment_id)
);
CREATE INDEX segment_counts_changed ON segment_counts (tenant_id, version);

-- A segment's count at the end of each minute it changed in.
CREATE TABLE segment_minutes (
    tenant_id    text        NOT NULL,
    segment_id   text        NOT NULL,
    minute       timestamptz NOT NULL,
    member_count bigint      NOT NULL,
    PRIMARY KEY (tenant_id, segment_id, minute)
);

-- Inbound events per minute and LINE type.
CREATE TABLE event_minutes (
    tenant_id  text        NOT NULL,
    minute     timestamptz NOT NULL,
    event_type text        NOT NULL,
    count      bigint      NOT NULL,
    PRIMARY KEY (tenant_id, minute, event_type)
);

-- Delivery outcomes per minute, channel and LINE endpoint.
CREATE TABLE delivery_minutes (
    tenant_id        text        NOT NULL,
    minute           timestamptz NOT NULL,
    channel_id       text        NOT NULL,
    endpoint         text        NOT NULL,
    accepted         bigint      NOT NULL DEFAULT 0,
    already_accepted bigint      NOT NULL DEFAULT 0,
    retrying         bigint      NOT NULL DEFAULT 0,
    dead_lettered    bigint      NOT NULL DEFAULT 0,
    recipients       bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, minute, channel_id, endpoint)
);

-- What has been counted, by source and id, so a replayed record never
-- counts twice. Kept for 8 days (longer than any stream holds a record).
CREATE TABLE folded (
    tenant_id text        NOT NULL,
    source    text        NOT NULL,
    id        text        NOT NULL,
    folded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, source, id)
);
CREATE INDEX folded_age ON folded (folded_at);
