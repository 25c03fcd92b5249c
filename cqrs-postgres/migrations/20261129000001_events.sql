-- The event log. Applied with `search_path` set to the store's schema, so names are unqualified.

CREATE TABLE events (
    -- Order of insertion; unique, but NOT the order readers follow (see transaction_id).
    global_position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction: readers only read below the oldest running transaction and order
    -- by (transaction_id, global_position), so an event that commits late is never skipped.
    transaction_id  XID8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    version         BIGINT      NOT NULL,
    event_type      TEXT        NOT NULL,
    schema_version  INTEGER     NOT NULL,
    payload         JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    -- Decides concurrent appends: one writer per (stream, version). Also serves load-by-stream.
    CONSTRAINT events_stream_version_key UNIQUE (aggregate_type, aggregate_id, version),
    CONSTRAINT events_version_positive CHECK (version > 0),
    CONSTRAINT events_type_not_empty CHECK (event_type <> ''),
    CONSTRAINT events_stream_not_empty CHECK (aggregate_type <> '' AND aggregate_id <> '')
);

-- The global order readers follow.
CREATE INDEX events_global_order ON events (transaction_id, global_position);

-- A wake-up hint for subscribers, sent at commit; readers poll without it too.
CREATE FUNCTION cqrs_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cqrs_' || md5(TG_TABLE_SCHEMA), '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION cqrs_notify_events();
