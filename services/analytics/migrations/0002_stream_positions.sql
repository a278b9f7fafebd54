-- Where folding stands in each stream analytics reads: the id of the last
-- entry folded from it (Redis stream ids, `<ms>-<seq>`, as two numbers).
-- Each fold moves the position in the same transaction as the counters, so
-- an entry read again (a replay after a crash, a lease handed over) is at
-- or before the position and counts nothing. One row per stream, not per
-- tenant: a stream carries every tenant's records. (-1, -1): nothing
-- folded from the stream yet.
CREATE TABLE stream_positions (
    stream     text        PRIMARY KEY,
    ms         bigint      NOT NULL,
    seq        bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- `folded` (the ids of every record counted, until this migration) is no
-- longer written. A stream's first fold after the upgrade still looks its
-- records up there, so a record folded but not acknowledged before the
-- upgrade counts once; the hourly expiry empties it within 8 days.
