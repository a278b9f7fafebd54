-- Which count deltas were published change by change (realtime mutations
-- write a membership record for each flip) and which were not (an import,
-- a segment's computation): the fold publishes the sum of the latter as
-- one bulk delta, so consumers that sum the records match the count.
ALTER TABLE segment_count_deltas ADD COLUMN announced boolean NOT NULL DEFAULT false;
