-- A run's history moves onto the run's own row, as a JSON array of
-- {"step", "at", "detail", "ok"} in execution order. Kept in `run_steps`,
-- every advance inserted a row per step, each with its primary-key entry
-- and a foreign-key check on `runs`, beside the advance's update of the
-- run itself, which rewrites the whole row anyway: in the campaign storm
-- (2026-12-01) the advances were PostgreSQL's largest cost, about 61 buffer
-- hits and 13 WAL records per run, three of each run's steps. A run's
-- history is read only with the run (GetRun) or by its scenario's funnel.
ALTER TABLE runs ADD COLUMN steps jsonb NOT NULL DEFAULT '[]';

UPDATE runs r
   SET steps = h.steps
  FROM (SELECT tenant_id, run_id,
               jsonb_agg(jsonb_build_object('step', step_id, 'at', executed_at,
                                            'detail', detail, 'ok', ok)
                         ORDER BY seq) AS steps
          FROM run_steps
         GROUP BY tenant_id, run_id) AS h
 WHERE r.tenant_id = h.tenant_id AND r.run_id = h.run_id;

DROP TABLE run_steps;
