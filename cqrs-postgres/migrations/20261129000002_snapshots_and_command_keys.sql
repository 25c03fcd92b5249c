-- The latest snapshot of each aggregate: its state as JSON at a version, with the schema version of
-- that state so a snapshot written by other code is ignored, never misread.
CREATE TABLE snapshots (
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    schema_version INTEGER     NOT NULL,
    state          JSONB       NOT NULL,
    taken_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Command idempotency: a key is recorded in the transaction that appends the command's events, with
-- where they went, so a repeated key returns the first outcome.
CREATE TABLE command_keys (
    idempotency_key TEXT        PRIMARY KEY,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    first_version   BIGINT      NOT NULL,
    last_version    BIGINT      NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
