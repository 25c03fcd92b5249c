-- The server this store's transaction ids belong to. Events are ordered by the transaction id
-- that wrote them; those ids are one server's counter, so a store restored or replicated into
-- another server is refused until `cqrs store rebase` re-stamps it (see docs/operations.md).

-- This server's system identifier, or NULL where the role may not read it (the identity check is
-- then skipped; the transaction-id check still runs).
CREATE FUNCTION cqrs_system_identifier() RETURNS BIGINT LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT system_identifier FROM pg_control_system());
EXCEPTION WHEN insufficient_privilege THEN
    RETURN NULL;
END
$$;

CREATE TABLE store_server (
    -- One row.
    only_row          BOOLEAN     PRIMARY KEY DEFAULT true CHECK (only_row),
    system_identifier BIGINT,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO store_server (system_identifier) VALUES (cqrs_system_identifier());
