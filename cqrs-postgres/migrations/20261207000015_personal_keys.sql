-- The data keys of crypto-shredding (`evently_core::personal`): one AES-256 key per subject whose
-- personal data events hold. Forgetting a subject deletes its row; the data sealed under it is
-- unreadable from then on (readers get the fields' placeholders).
CREATE TABLE personal_keys (
    subject    TEXT        PRIMARY KEY,
    key        BYTEA       NOT NULL CHECK (octet_length(key) = 32),
    created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
