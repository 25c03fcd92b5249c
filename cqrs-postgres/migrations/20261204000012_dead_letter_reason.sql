-- Why each dead letter is parked, as a kind rather than a sentence: `failed` (its projection kept
-- failing on it; `error` holds the last error) or `waits_behind` (never tried: an earlier dead
-- letter of its stream blocks it). Rows from before this column were told apart by their text.
ALTER TABLE projection_dead_letters
    ADD COLUMN reason TEXT NOT NULL DEFAULT 'failed'
    CHECK (reason IN ('failed', 'waits_behind'));

UPDATE projection_dead_letters
   SET reason = 'waits_behind'
 WHERE attempts = 0 AND error = 'waits behind an earlier dead letter of its stream';
