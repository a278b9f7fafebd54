-- A table created unqualified: it must land in the service's own schema.
CREATE TABLE notes (
    tenant_id text NOT NULL,
    note_id bigint NOT NULL,
    body text NOT NULL,
    PRIMARY KEY (tenant_id, note_id)
);
