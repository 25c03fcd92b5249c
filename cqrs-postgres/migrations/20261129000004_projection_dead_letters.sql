-- Events a projection could not apply (after its retries), and the later events of the same stream
-- parked behind them so per-stream order holds until a redrive.
CREATE TABLE projection_dead_letters (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection      TEXT        NOT NULL,
    event_id        UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    version         BIGINT      NOT NULL,
    error           TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL,
    first_failed_at TIMESTAMPTZ NOT NULL,
    last_failed_at  TIMESTAMPTZ NOT NULL,
    CONSTRAINT projection_dead_letters_event_key UNIQUE (projection, event_id)
);

CREATE INDEX projection_dead_letters_stream
    ON projection_dead_letters (projection, aggregate_type, aggregate_id, version);
