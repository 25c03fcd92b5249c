-- One row per projection: its checkpoint in the global order, and the lease of the worker that owns
-- it. Every checkpoint move names the owner's epoch, in the transaction of the read-model change.
CREATE TABLE projection_checkpoints (
    projection      TEXT        PRIMARY KEY,
    transaction_id  XID8        NOT NULL DEFAULT '0',
    global_position BIGINT      NOT NULL DEFAULT 0,
    owner           TEXT,
    epoch           BIGINT      NOT NULL DEFAULT 0,
    lease_until     TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
