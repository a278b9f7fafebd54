-- Tenants (companies using hibiki) and their LINE channels.

CREATE TABLE tenants (
    tenant_id    text PRIMARY KEY,
    display_name text NOT NULL,
    time_zone    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Every change to a channel takes the next revision, so a watcher can tell
-- newer state from older.
CREATE SEQUENCE channel_revisions;

CREATE TABLE channels (
    tenant_id      text NOT NULL REFERENCES tenants (tenant_id),
    channel_id     text NOT NULL,
    display_name   text NOT NULL,
    bot_user_id    text NOT NULL DEFAULT '',
    -- Write-only over the API: read only by WatchChannels, for services.
    channel_secret text NOT NULL,
    access_token   text NOT NULL,
    revision       bigint NOT NULL DEFAULT nextval('channel_revisions'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel_id)
);

-- A LINE channel belongs to exactly one tenant: the gateway resolves the
-- tenant from the channel id of the webhook URL.
CREATE UNIQUE INDEX channels_channel_id ON channels (channel_id);

-- Tell WatchChannels streams about every committed change: NOTIFY is
-- delivered only when (and if) the transaction commits.
CREATE FUNCTION notify_channel_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hibiki_contacts_channels', COALESCE(NEW.channel_id, OLD.channel_id));
    RETURN NULL;
END;
$$;

CREATE TRIGGER channels_notify
AFTER INSERT OR UPDATE OR DELETE ON channels
FOR EACH ROW EXECUTE FUNCTION notify_channel_change();
