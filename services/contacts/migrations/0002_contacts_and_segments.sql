-- Contacts, segments with maintained membership and counts, idempotency
-- records, and the outbox of membership changes.

CREATE TABLE contacts (
    tenant_id         text NOT NULL,
    line_user_id      text NOT NULL,
    -- hibiki.contacts.v1.FollowState: 0 unknown, 1 following, 2 blocked.
    follow_state      smallint NOT NULL DEFAULT 0,
    first_followed_at timestamptz,
    followed_at       timestamptz,
    blocked_at        timestamptz,
    refollow_count    integer NOT NULL DEFAULT 0,
    -- LINE's timestamp of the follow / unfollow event that set follow_state:
    -- an older event arriving late does not undo a newer one.
    follow_event_at   timestamptz,
    display_name      text NOT NULL DEFAULT '',
    last_seen_at      timestamptz,
    tags              text[] NOT NULL DEFAULT '{}',
    -- Strings, numbers and booleans as JSON values; timestamps as
    -- {"ts": microseconds}. See src/attrs.rs.
    attributes        jsonb NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, line_user_id)
);

CREATE INDEX contacts_tags ON contacts USING gin (tags);

CREATE TABLE segments (
    tenant_id      text NOT NULL,
    segment_id     text NOT NULL,
    name           text NOT NULL,
    description    text NOT NULL DEFAULT '',
    -- The rule as an encoded hibiki.contacts.v1.SegmentRule.
    rule           bytea NOT NULL,
    -- What the rule reads, so a mutation re-evaluates only the segments it
    -- can affect (src/rules.rs, Refs).
    ref_tags       text[] NOT NULL,
    ref_attributes text[] NOT NULL,
    ref_follow     boolean NOT NULL,
    -- hibiki.contacts.v1.SegmentStatus: 1 computing, 2 ready.
    status         smallint NOT NULL,
    -- Maintained in the same transaction as every membership change.
    member_count   bigint NOT NULL DEFAULT 0,
    version        bigint NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, segment_id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE segment_members (
    tenant_id    text NOT NULL,
    segment_id   text NOT NULL,
    line_user_id text NOT NULL,
    PRIMARY KEY (tenant_id, segment_id, line_user_id)
);

-- A contact's memberships: realtime maintenance reads them for a batch of
-- contacts across segments, which the primary key alone serves badly.
CREATE INDEX segment_members_contact ON segment_members (tenant_id, line_user_id);

-- Webhook events already applied (ApplyEvents is idempotent per
-- webhookEventId). Rows older than the dedupe window are purged.
CREATE TABLE applied_events (
    tenant_id        text NOT NULL,
    webhook_event_id text NOT NULL,
    applied_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, webhook_event_id)
);

-- Results of mutations by idempotency key: a repeat returns the first result.
CREATE TABLE mutation_results (
    tenant_id       text NOT NULL,
    idempotency_key text NOT NULL,
    operation       text NOT NULL,
    response        bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_key)
);

-- Membership change records waiting to be published to Redis: written in the
-- transaction that made the change, so a committed change is always
-- published and an uncommitted one never is.
CREATE TABLE outbox (
    tenant_id  text NOT NULL,
    id         bigserial PRIMARY KEY,
    -- An encoded hibiki.contacts.v1.MembershipChangeRecord.
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
