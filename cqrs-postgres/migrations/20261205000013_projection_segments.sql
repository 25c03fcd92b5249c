-- Projections run in segments (several workers share one projection, each stream in one segment).
--
-- A segmented projection keeps its own row (`segments` says how many segments it runs in; its
-- `epoch` is bumped by every rescale and names the generation of the segment rows) and one row
-- per segment, named `<projection>#<index>/<count>@<generation>`, holding that segment's
-- checkpoint, lease and what earlier segments applied beyond the checkpoint (`applied`, after a
-- split or a merge). A plain worker never takes the lease of a segmented projection's own row.
ALTER TABLE projection_checkpoints
    ADD COLUMN segments      INT CHECK (segments BETWEEN 1 AND 1024),
    ADD COLUMN segment_of    TEXT,
    ADD COLUMN segment_index INT,
    ADD COLUMN segment_count INT,
    ADD COLUMN applied       JSONB NOT NULL DEFAULT '[]',
    ADD CONSTRAINT projection_checkpoints_segment_shape CHECK (
        (segment_of IS NULL AND segment_index IS NULL AND segment_count IS NULL)
        OR (segment_of IS NOT NULL AND segment_index >= 0 AND segment_index < segment_count)
    );

CREATE INDEX projection_checkpoints_segment_of
    ON projection_checkpoints (segment_of, segment_index) WHERE segment_of IS NOT NULL;

-- The processes sharing a segmented projection: each renews its row while it runs, so the others
-- know how many share it (a process holding no segment yet included) and hand segments over.
CREATE TABLE projection_members (
    projection TEXT        NOT NULL,
    member     TEXT        NOT NULL,
    seen_until TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (projection, member)
);
