-- Messages a consumer has applied, recorded in the transaction of their effect: a redelivered
-- message finds its row and has no second effect.
CREATE TABLE inbox (
    consumer     TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
