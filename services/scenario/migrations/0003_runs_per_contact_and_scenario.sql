-- Starting a run checks the contact's earlier runs of the same scenario
-- (the re-entry policy and the triggering event): one index finds them
-- whatever their status, instead of walking every run of the scenario.
CREATE INDEX runs_of_contact_in_scenario ON runs (tenant_id, scenario_id, line_user_id);
-- The index above serves the active-run check too.
DROP INDEX runs_active;
