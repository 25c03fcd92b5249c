-- Commit notifications are sent by the store after the commit, coalesced (see notify.rs): a NOTIFY
-- inside every appending transaction takes a global lock at commit and serializes all writers.
DROP TRIGGER events_notify ON events;
DROP FUNCTION cqrs_notify_events();
