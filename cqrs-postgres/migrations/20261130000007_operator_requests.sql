-- Requests from operators (the `cqrs` command line) to the worker that owns a projection: rebuild
-- the read model, redrive dead letters. The worker answers them on its next wake-up (the command
-- line sends a NOTIFY) and records the outcome here.
ALTER TABLE projection_checkpoints
    ADD COLUMN rebuild_requested_at TIMESTAMPTZ,
    ADD COLUMN rebuilt_at           TIMESTAMPTZ,
    ADD COLUMN request_error        TEXT;

ALTER TABLE projection_dead_letters
    ADD COLUMN retry_requested_at TIMESTAMPTZ;
