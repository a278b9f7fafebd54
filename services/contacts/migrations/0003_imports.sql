-- Bulk contact imports (ImportContacts): progress, and which chunks of an
-- import have committed, so a re-run with the same import id skips them.

CREATE TABLE imports (
    tenant_id   text NOT NULL,
    import_id   text NOT NULL,
    received    bigint NOT NULL DEFAULT 0,
    upserted    bigint NOT NULL DEFAULT 0,
    rejected    bigint NOT NULL DEFAULT 0,
    -- The first rejected rows: [{"row": n, "field": "...", "message": "..."}].
    errors      jsonb NOT NULL DEFAULT '[]',
    done        boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (tenant_id, import_id)
);

-- A chunk is skipped on a re-run only when it committed with the same number
-- of rows: a short last chunk (the client ended its stream early) is done
-- again, in full, when the rest of its rows arrive.
CREATE TABLE import_chunks (
    tenant_id text NOT NULL,
    import_id text NOT NULL,
    chunk     bigint NOT NULL,
    received  bigint NOT NULL,
    upserted  bigint NOT NULL,
    rejected  bigint NOT NULL,
    PRIMARY KEY (tenant_id, import_id, chunk)
);
