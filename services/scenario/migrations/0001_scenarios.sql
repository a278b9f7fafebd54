-- Scenario definitions and their versions. A scenario is named uniquely
-- within its tenant; every apply that changes the definition adds a version,
-- and runs keep the version they started with.
CREATE TABLE scenarios (
    tenant_id       text        NOT NULL,
    scenario_id     text        NOT NULL,
    name            text        NOT NULL,
    current_version bigint      NOT NULL,
    enabled         boolean     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, scenario_id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE scenario_versions (
    tenant_id   text        NOT NULL,
    scenario_id text        NOT NULL,
    version     bigint      NOT NULL,
    -- The `ScenarioDefinition` (protobuf).
    definition  bytea       NOT NULL,
    -- The YAML as applied; empty when applied as protobuf.
    source_yaml text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, scenario_id, version),
    FOREIGN KEY (tenant_id, scenario_id) REFERENCES scenarios ON DELETE CASCADE
);
