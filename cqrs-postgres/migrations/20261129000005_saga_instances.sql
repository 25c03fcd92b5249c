-- Saga instances: the whole state as JSON (steps, outcomes, data), the columns the orchestrators
-- query on, and the lease that keeps two orchestrators from running one instance at once.
CREATE TABLE saga_instances (
    id          UUID        PRIMARY KEY,
    saga        TEXT        NOT NULL,
    status      TEXT        NOT NULL,
    state       JSONB       NOT NULL,
    version     BIGINT      NOT NULL,
    retry_at    TIMESTAMPTZ,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    started_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- The unfinished instances of a saga, oldest first: what `claim` scans.
CREATE INDEX saga_instances_unfinished
    ON saga_instances (saga, started_at)
    WHERE status IN ('running', 'compensating', 'failed');
