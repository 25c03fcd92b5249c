-- Sagas that nothing can wedge.
-- started_by: the event that started an instance. Instances are keyed by (saga, starting event),
--   so any number of sagas start from one event, each once. Before this migration an event-started
--   instance's id was the event's id: backfilling started_by = id keeps those from starting again
--   under the new id scheme (ids of instances not started by an event are random and match no
--   event).
-- lease_epoch: bumped by every claim; a fenced save names it, so an orchestrator whose lease was
--   taken over cannot save.
-- quarantine_error / quarantined_at: an instance set aside as unreadable (status 'unreadable').
ALTER TABLE saga_instances
    ADD COLUMN started_by      UUID,
    ADD COLUMN lease_epoch     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN quarantine_error TEXT,
    ADD COLUMN quarantined_at  TIMESTAMPTZ;

UPDATE saga_instances SET started_by = id;

CREATE UNIQUE INDEX saga_instances_started_by ON saga_instances (saga, started_by);
