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
-- Counts: realtime mutations move `segments.member_count` as before; the
-- bulk import and the background computation add rows to
-- segment_count_deltas instead, so they never hold a segment's row lock
-- (which realtime writers need) for the length of a large transaction. The
-- count of a segment is member_count plus its pending deltas; the contacts
-- service folds the deltas into member_count every second.

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
