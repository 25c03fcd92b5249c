-- Tenants in one schema (the row-level-security layout, `PostgresEventStore::for_tenant`): every
-- table of tenant data gets the tenant it belongs to, taken from the connection's
-- `evently.tenant` setting ('' for a store used without tenants, which is every row written
-- before this migration). The unique keys gain the tenant as their last column, so that two
-- tenants' streams, keys, checkpoints, letters, sagas, inbox rows and data keys never collide,
-- while lookups by the old columns keep their index order (a store without tenants reads as
-- before). A stable default: adding the columns rewrites no table.
ALTER TABLE events
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
ALTER TABLE events
    DROP CONSTRAINT events_stream_version_key,
    ADD CONSTRAINT events_stream_version_key UNIQUE (aggregate_type, aggregate_id, version, tenant_id);

ALTER TABLE snapshots
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
ALTER TABLE snapshots
    DROP CONSTRAINT snapshots_pkey,
    ADD PRIMARY KEY (aggregate_type, aggregate_id, tenant_id);

ALTER TABLE command_keys
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
ALTER TABLE command_keys
    DROP CONSTRAINT command_keys_pkey,
    ADD PRIMARY KEY (idempotency_key, tenant_id);

ALTER TABLE projection_checkpoints
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
ALTER TABLE projection_checkpoints
    DROP CONSTRAINT projection_checkpoints_pkey,
    ADD PRIMARY KEY (projection, tenant_id);

ALTER TABLE projection_dead_letters
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
ALTER TABLE projection_dead_letters
    DROP CONSTRAINT projection_dead_letters_event_key,
    ADD CONSTRAINT projection_dead_letters_event_key UNIQUE (projection, event_id, tenant_id);

ALTER TABLE saga_instances
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
DROP INDEX saga_instances_started_by;
CREATE UNIQUE INDEX saga_instances_started_by ON saga_instances (saga, started_by, tenant_id);

ALTER TABLE inbox
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
ALTER TABLE inbox
    DROP CONSTRAINT inbox_pkey,
    ADD PRIMARY KEY (consumer, event_id, tenant_id);

ALTER TABLE personal_keys
    ADD COLUMN tenant_id TEXT NOT NULL DEFAULT coalesce(current_setting('evently.tenant', true), '');
ALTER TABLE personal_keys
    DROP CONSTRAINT personal_keys_pkey,
    ADD PRIMARY KEY (subject, tenant_id);
