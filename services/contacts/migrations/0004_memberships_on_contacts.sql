-- Segment memberships move onto the contact row.
--
-- A membership was a row of segment_members with two btree indexes: the
-- bulk import paid ~60 µs per contact to maintain them (about three
-- memberships a contact over ten segments). Now each segment has a number
-- that is never reused, and a contact lists the numbers of the segments it
-- is in, sorted, in `segs`. Every writer already holds the contact's row
-- lock, so the memberships change under the lock that guards the contact,
-- with no extra rows or indexes to write.
--
-- A deleted segment's number may linger in `segs`; numbers are never
-- reused, so it is ignored, and dropped when the contact is next rewritten.
--
-- Counts: every writer (realtime mutations, the bulk import, the background
-- computation) adds its net change as a row of segment_count_deltas instead
-- of updating the segment row, so no writer holds a segment's row lock: a
-- hot segment's writers do not queue on it, nor on a large import
-- transaction. The count of a segment is member_count plus its pending
-- deltas; the contacts service folds the deltas into member_count every
-- second. Writers hold segments FOR KEY SHARE, which only a rule change or
-- a deletion waits for.

ALTER TABLE segments ADD COLUMN no integer GENERATED ALWAYS AS IDENTITY;
ALTER TABLE segments ADD CONSTRAINT segments_no UNIQUE (no);

ALTER TABLE contacts ADD COLUMN segs integer[] NOT NULL DEFAULT '{}';

UPDATE contacts c SET segs = m.segs
FROM (
    SELECT m.tenant_id, m.line_user_id, array_agg(s.no ORDER BY s.no) AS segs
    FROM segment_members m
    JOIN segments s ON s.tenant_id = m.tenant_id AND s.segment_id = m.segment_id
    GROUP BY m.tenant_id, m.line_user_id
) m
WHERE c.tenant_id = m.tenant_id AND c.line_user_id = m.line_user_id;

DROP TABLE segment_members;

-- The sweep of a new or changed rule: whether it has visited every contact
-- with the current rule version.
ALTER TABLE segments ADD COLUMN computed_version bigint NOT NULL DEFAULT 0;
UPDATE segments SET computed_version = version WHERE status = 2;

CREATE TABLE segment_count_deltas (
    id         bigserial PRIMARY KEY,
    tenant_id  text NOT NULL,
    segment_id text NOT NULL,
    delta      bigint NOT NULL,
    FOREIGN KEY (tenant_id, segment_id) REFERENCES segments ON DELETE CASCADE
);

CREATE INDEX segment_count_deltas_segment ON segment_count_deltas (tenant_id, segment_id);

-- Contacts are rewritten constantly (every event moves last_seen_at, every
-- sync updates attributes and memberships) and none of that touches an
-- indexed column: room on each page lets those updates stay on the page
-- (HOT), with no new index entries and less WAL.
ALTER TABLE contacts SET (fillfactor = 80);

-- Imports remember the stream positions they committed as ranges, not as
-- fixed-size chunks: chunk sizes change with the realtime load (smaller
-- while realtime calls arrive), and a re-run skips exactly the positions
-- already committed. Imports interrupted before this migration start over.
DROP TABLE import_chunks;

CREATE TABLE import_ranges (
    tenant_id text NOT NULL,
    import_id text NOT NULL,
    -- Stream positions first_row .. first_row + rows - 1 (1-based, bad
    -- records included) committed in one transaction.
    first_row bigint NOT NULL,
    rows      bigint NOT NULL,
    upserted  bigint NOT NULL,
    rejected  bigint NOT NULL,
    PRIMARY KEY (tenant_id, import_id, first_row)
);

-- The outbox and the count deltas are queues: rows come and go every
-- second. Vacuum them by row count, not by a share of a table that is
-- always nearly empty, or their index scans wade through dead rows.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
ALTER TABLE segment_count_deltas SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
