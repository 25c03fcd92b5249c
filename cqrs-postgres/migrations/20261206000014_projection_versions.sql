-- Blue/green projection versions: the registry of a read model's versions.
--
-- One row per version of a projection (`projection` is the base name, `name` the checkpoint
-- row's: `balances` for version 1, `balances@v2` after). `state` is `live` for the version readers
-- read (at most one per projection), `catching_up` for one built beside it, `previous` for the
-- version live before the last promotion (still running up to the handover), `retired` once its
-- tables and checkpoint are gone. A version runs the side effects of the events after
-- `effects_after_*` and up to `effects_through_*` (none while catching up): a promotion sets the
-- handover as the live version's `through` and the promoted one's `after`, so each event's
-- effects run in exactly one version. `tables` are the read model's tables by the names readers use (views over
-- `<table>_v<version>`).
CREATE TABLE projection_versions (
    projection           TEXT        NOT NULL,
    version              INT         NOT NULL CHECK (version >= 1),
    name                 TEXT        NOT NULL UNIQUE,
    tables               TEXT[]      NOT NULL DEFAULT '{}',
    state                TEXT        NOT NULL
        CHECK (state IN ('live', 'catching_up', 'previous', 'retired')),
    effects_after_transaction   xid8,
    effects_after_position      BIGINT,
    effects_through_transaction xid8,
    effects_through_position    BIGINT,
    registered_at        TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    promoted_at          TIMESTAMPTZ,
    retire_at            TIMESTAMPTZ,
    retired_at           TIMESTAMPTZ,
    PRIMARY KEY (projection, version)
);

CREATE UNIQUE INDEX projection_versions_one_live ON projection_versions (projection) WHERE state = 'live';
