-- The subjects whose personal data a snapshot's stream held up to the snapshot's version, as the
-- store that saved it found them (NULL: not looked for, by a store that seals nothing, or saved
-- before this column). The stream's next snapshot looks only at the events after this one for
-- more, instead of reading the whole stream again.
ALTER TABLE snapshots ADD COLUMN personal_subjects TEXT[];
