//! The SQL of the store, with the schema name quoted in once at construction. Every value is a bind
//! parameter; the schema name is the only text put into a statement, validated and quoted.

use evently_core::StoreError;

/// Opens the transaction of a large ordered read (see `in_global_order`): sorts and JIT
/// compilation off for that transaction only, in the `BEGIN`'s round trip.
pub(crate) const BEGIN_ORDERED_READ: &str =
    "BEGIN; SET LOCAL enable_sort = off; SET LOCAL jit = off";

/// The columns every read of events selects, first and in this order (`rows::stored_event` reads
/// them by index). The transaction id goes out as it is stored (`xid8`, whose binary form is
/// eight bytes like a `bigint`'s: `rows` reads it so, with no text made on the server and none
/// parsed here: 9 ms of a 100,000-event read's 36 on the server) under another name, so that
/// every `ORDER BY` names the table's column.
const EVENT_COLUMNS: &str = "global_position, transaction_id AS transaction_xid8, event_id, \
     aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata, recorded_at";

/// The statements of one schema.
pub(crate) struct Sql {
    pub(crate) quoted_schema: String,
    pub(crate) channel: String,
    /// The `NOTIFY` channel of the schema's checkpoint moves.
    pub(crate) checkpoint_channel: String,
    pub(crate) insert: String,
    pub(crate) insert_one: String,
    pub(crate) stream_version: String,
    /// Before a binary `COPY`: whether the stream is at the base version, the transaction's id
    /// and time, the events' global positions.
    pub(crate) copy_prepare: String,
    pub(crate) copy: String,
    /// The appends of a group in one statement, each on its own condition.
    pub(crate) insert_group: String,
    /// The events table's name, quoted, as `pg_get_serial_sequence` takes it.
    pub(crate) events_table: String,
    pub(crate) load: String,
    pub(crate) replay: String,
    pub(crate) read_all: String,
    pub(crate) read_window_filtered: String,
    pub(crate) lag: String,
    pub(crate) head: String,
    pub(crate) nth_after: String,
    pub(crate) nth_from_end: String,
    pub(crate) events_by_id: String,
    pub(crate) claim_key: String,
    pub(crate) insert_keyed: String,
    pub(crate) set_key_versions: String,
    pub(crate) find_key: String,
    pub(crate) load_snapshot: String,
    pub(crate) acquire_lease: String,
    pub(crate) move_checkpoint: String,
    pub(crate) checkpoint_state: String,
    pub(crate) renew_lease: String,
    pub(crate) read_checkpoint: String,
    pub(crate) acquire_segment: String,
    pub(crate) release_lease: String,
    pub(crate) progress_checkpoint: String,
    pub(crate) blocked_streams: String,
    pub(crate) park: String,
    pub(crate) list_dead_letters: String,
    pub(crate) stream_dead_letters: String,
    pub(crate) event_by_id: String,
    pub(crate) resolve_dead_letter: String,
    pub(crate) fail_dead_letter: String,
    pub(crate) purge_dead_letters: String,
    pub(crate) hold_lease: String,
    pub(crate) reset_checkpoint: String,
    pub(crate) reset_dead_letters: String,
    pub(crate) save_snapshot: String,
    // Operator requests and status (`control`).
    pub(crate) request_rebuild: String,
    pub(crate) request_retry: String,
    pub(crate) request_retry_all: String,
    pub(crate) requests: String,
    pub(crate) letter_state: String,
    pub(crate) projection_statuses: String,
}

/// Quotes an identifier for PostgreSQL: in double quotes, with inner double quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The `NOTIFY` channel of a schema: `cqrs_` and the MD5 of its name
/// (a fixed length, whatever the schema name).
fn channel(schema: &str) -> String {
    use md5::Digest;
    let digest = md5::Md5::digest(schema.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("cqrs_{hex}")
}

impl Sql {
    /// The statements for `schema`, which must be a PostgreSQL identifier: 1 to 63 bytes, no NUL.
    pub(crate) fn new(schema: &str) -> Result<Self, StoreError> {
        if schema.is_empty() || schema.len() > 63 || schema.contains('\0') {
            return Err(StoreError::InvalidInput(format!(
                "schema name {schema:?} is not a PostgreSQL identifier (1 to 63 bytes, no NUL)"
            )));
        }
        let s = quote_ident(schema);
        Ok(Self {
            channel: channel(schema),
            checkpoint_channel: format!("{}_checkpoints", channel(schema)),
            // One row back whatever the batch size: the positions in version order, and the
            // transaction id and time that every row of the statement shares.
            insert: format!(
                "WITH inserted AS ( \
                   INSERT INTO {s}.events \
                     (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
                   SELECT e.event_id, $1, $2, $3 + e.ord, e.event_type, e.schema_version, e.payload::json, e.metadata::json \
                   FROM UNNEST($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                     WITH ORDINALITY AS e(event_id, event_type, schema_version, payload, metadata, ord) \
                   WHERE $3 = 0 OR EXISTS ( \
                     SELECT 1 FROM {s}.events WHERE aggregate_type = $1 AND aggregate_id = $2 AND version = $3) \
                   ORDER BY e.ord \
                   RETURNING global_position, version) \
                 SELECT COALESCE(array_agg(global_position ORDER BY version), '{{}}') AS positions, \
                        pg_current_xact_id()::text AS transaction_text, now() AS recorded_at \
                 FROM inserted"
            ),
            // One event: a plain INSERT .. SELECT returning at most one row of the same shape.
            insert_one: format!(
                "INSERT INTO {s}.events \
                   (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
                 SELECT $4::uuid, $1, $2, $3::int8 + 1, $5::text, $6::int4, $7::text::json, $8::text::json \
                 WHERE $3 = 0 OR EXISTS ( \
                   SELECT 1 FROM {s}.events WHERE aggregate_type = $1 AND aggregate_id = $2 AND version = $3) \
                 RETURNING ARRAY[global_position] AS positions, \
                   transaction_id::text AS transaction_text, recorded_at"
            ),
            copy_prepare: format!(
                "SELECT ($3 = 0 OR EXISTS ( \
                   SELECT 1 FROM {s}.events WHERE aggregate_type = $1 AND aggregate_id = $2 AND version = $3)) AS at_base, \
                   pg_current_xact_id()::text AS transaction_text, now() AS recorded_at, \
                   ARRAY(SELECT nextval((SELECT pg_get_serial_sequence($5, 'global_position'))::regclass) \
                         FROM generate_series(1, $4) ORDER BY 1) AS positions"
            ),
            insert_group: format!(
                "INSERT INTO {s}.events \
                   (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
                 SELECT e.event_id, e.aggregate_type, e.aggregate_id, e.base + e.ord, e.event_type, e.schema_version, \
                        e.payload::json, e.metadata::json \
                 FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::int8[], $5::int8[], \
                             $6::uuid[], $7::text[], $8::int4[], $9::text[], $10::text[]) \
                   AS e(idx, aggregate_type, aggregate_id, base, ord, event_id, event_type, schema_version, payload, metadata) \
                 WHERE e.base = coalesce((SELECT max(x.version) FROM {s}.events x \
                          WHERE x.aggregate_type = e.aggregate_type AND x.aggregate_id = e.aggregate_id), 0) \
                 ORDER BY e.idx, e.ord \
                 RETURNING aggregate_type, aggregate_id, version, global_position, \
                   transaction_id::text AS transaction_text, recorded_at"
            ),
            copy: format!(
                "COPY {s}.events \
                   (global_position, transaction_id, event_id, aggregate_type, aggregate_id, version, \
                    event_type, schema_version, payload, metadata) \
                 FROM STDIN (FORMAT binary)"
            ),
            events_table: format!("{s}.events"),
            stream_version: format!(
                "SELECT COALESCE(MAX(version), 0) FROM {s}.events WHERE aggregate_type = $1 AND aggregate_id = $2"
            ),
            load: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 ORDER BY version"
            ),
            replay: format!(
                "SELECT version, event_type, schema_version, payload::text AS payload FROM {s}.events \
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 ORDER BY version"
            ),
            read_all: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                   AND (transaction_id, global_position) > ($1::text::xid8, $2) \
                 ORDER BY events.transaction_id, events.global_position LIMIT $3"
            ),
            // The next $3 readable events (the window), of which only those of a subscribed type
            // (and, when $5 is not empty, aggregate type) leave the server, plus the window's last
            // event so the reader learns how far it scanned. The caller filters the exact
            // (aggregate type, event type) pairs.
            read_window_filtered: format!(
                "WITH scanned AS MATERIALIZED ( \
                   SELECT {EVENT_COLUMNS}, transaction_id AS xid FROM {s}.events \
                   WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                     AND (transaction_id, global_position) > ($1::text::xid8, $2) \
                   ORDER BY transaction_id, global_position LIMIT $3), \
                 last AS (SELECT xid, global_position FROM scanned ORDER BY xid DESC, global_position DESC LIMIT 1) \
                 SELECT scanned.* FROM scanned \
                 WHERE (event_type = ANY($5::text[]) AND (cardinality($4::text[]) = 0 OR aggregate_type = ANY($4::text[]))) \
                    OR (xid, global_position) = (SELECT xid, global_position FROM last) \
                 ORDER BY xid, global_position"
            ),
            // Every committed event after a checkpoint: a reader never passes an open
            // transaction, so nothing at or before its checkpoint is still unread.
            lag: format!(
                "SELECT count(*) AS events, \
                        COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(recorded_at))::float8, 0) AS seconds \
                 FROM {s}.events WHERE (transaction_id, global_position) > ($1::text::xid8, $2)"
            ),
            head: format!(
                "SELECT transaction_id::text AS transaction_text, global_position FROM {s}.events \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
            ),
            // The $3-th readable event after ($1, $2), from the index alone where it can.
            nth_after: format!(
                "SELECT transaction_id::text AS transaction_text, global_position FROM {s}.events \
                 WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                   AND (transaction_id, global_position) > ($1::text::xid8, $2) \
                 ORDER BY transaction_id, global_position OFFSET $3 - 1 LIMIT 1"
            ),
            // The ($1 + 1)-th readable event from the end, by the index read backwards.
            nth_from_end: format!(
                "SELECT transaction_id::text AS transaction_text, global_position FROM {s}.events \
                 WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY transaction_id DESC, global_position DESC OFFSET $1 LIMIT 1"
            ),
            events_by_id: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events WHERE event_id = ANY($1)"
            ),
            // A keyed append in one statement: the key is recorded (with the versions the events
            // get) only when the stream is at the expected version and the key is free (a caller
            // racing with the same key waits on it), and the events go in only when it was. No
            // row position back means: taken key, moved stream, or both; the caller then takes
            // the transaction path, which tells them apart.
            insert_keyed: format!(
                "WITH claimed AS ( \
                   INSERT INTO {s}.command_keys (idempotency_key, aggregate_type, aggregate_id, first_version, last_version) \
                   SELECT $9, $1, $2, $3 + 1, $3 + cardinality($4::uuid[]) \
                   WHERE $3 = 0 OR EXISTS ( \
                     SELECT 1 FROM {s}.events WHERE aggregate_type = $1 AND aggregate_id = $2 AND version = $3) \
                   ON CONFLICT (idempotency_key, tenant_id) DO NOTHING \
                   RETURNING 1), \
                 inserted AS ( \
                   INSERT INTO {s}.events \
                     (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
                   SELECT e.event_id, $1, $2, $3 + e.ord, e.event_type, e.schema_version, e.payload::json, e.metadata::json \
                   FROM UNNEST($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                     WITH ORDINALITY AS e(event_id, event_type, schema_version, payload, metadata, ord) \
                   WHERE EXISTS (SELECT 1 FROM claimed) \
                   ORDER BY e.ord \
                   RETURNING global_position, version) \
                 SELECT COALESCE(array_agg(global_position ORDER BY version), '{{}}') AS positions, \
                        pg_current_xact_id()::text AS transaction_text, now() AS recorded_at \
                 FROM inserted"
            ),
            claim_key: format!(
                "INSERT INTO {s}.command_keys (idempotency_key, aggregate_type, aggregate_id, first_version, last_version) \
                 VALUES ($1, $2, $3, 0, 0) ON CONFLICT (idempotency_key, tenant_id) DO NOTHING"
            ),
            set_key_versions: format!(
                "UPDATE {s}.command_keys SET first_version = $2, last_version = $3 WHERE idempotency_key = $1"
            ),
            find_key: format!(
                "SELECT aggregate_type, aggregate_id, first_version, last_version FROM {s}.command_keys \
                 WHERE idempotency_key = $1"
            ),
            // Takes the lease when it is free, expired or held under this owner name. Only a renewal
            // by the holder of the current epoch ($4) keeps the epoch: any other take (a new owner, a
            // restarted process under the same name, a second live process under it) gets a new one,
            // which fences every transaction still working under the old. Lease times are taken at
            // the statement (`clock_timestamp()`), not at the transaction's start. A retired
            // projection version's row is never made again (see `crate::versions`).
            acquire_lease: format!(
                "INSERT INTO {s}.projection_checkpoints (projection, owner, epoch, lease_until) \
                 SELECT $1, $2, 1, clock_timestamp() + make_interval(secs => $3) \
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.projection_versions \
                                   WHERE name = $1 AND state = 'retired') \
                 ON CONFLICT (projection, tenant_id) DO UPDATE SET \
                   epoch = CASE WHEN {s}.projection_checkpoints.owner = EXCLUDED.owner \
                                 AND {s}.projection_checkpoints.epoch = $4::int8 \
                                THEN {s}.projection_checkpoints.epoch \
                                ELSE {s}.projection_checkpoints.epoch + 1 END, \
                   owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until \
                 WHERE ({s}.projection_checkpoints.owner IS NULL \
                    OR {s}.projection_checkpoints.owner = EXCLUDED.owner \
                    OR {s}.projection_checkpoints.lease_until < clock_timestamp()) \
                   AND {s}.projection_checkpoints.segments IS NULL \
                   AND {s}.projection_checkpoints.segment_of IS NULL \
                 RETURNING epoch, transaction_id::text AS transaction_text, global_position"
            ),
            // Compare-and-set: moves the checkpoint from exactly the window's start ($6, $7) to its
            // end, for the current epoch and a live lease, and renews the lease from this moment.
            // A stalled old owner matches no row; neither does a retry of a window whose first
            // commit went through after all (an in-doubt COMMIT): its transaction, with the
            // read-model change, is rolled back and nothing is applied twice.
            move_checkpoint: format!(
                "UPDATE {s}.projection_checkpoints \
                 SET transaction_id = $3::text::xid8, global_position = $4, updated_at = clock_timestamp(), \
                     lease_until = clock_timestamp() + make_interval(secs => $5) \
                 WHERE projection = $1 AND epoch = $2 AND lease_until >= clock_timestamp() \
                   AND transaction_id = $6::text::xid8 AND global_position = $7"
            ),
            // Why a move matched no row: another epoch or an expired lease, or a moved checkpoint.
            checkpoint_state: format!(
                "SELECT epoch, COALESCE(lease_until >= clock_timestamp(), false) AS live, \
                        transaction_id::text AS transaction_text, global_position \
                 FROM {s}.projection_checkpoints WHERE projection = $1"
            ),
            // Extends a live lease of the current epoch (a heartbeat while a long batch runs).
            renew_lease: format!(
                "UPDATE {s}.projection_checkpoints SET lease_until = clock_timestamp() + make_interval(secs => $3) \
                 WHERE projection = $1 AND epoch = $2 AND lease_until >= clock_timestamp()"
            ),
            blocked_streams: format!(
                "SELECT DISTINCT aggregate_type, aggregate_id FROM {s}.projection_dead_letters WHERE projection = $1"
            ),
            park: format!(
                "INSERT INTO {s}.projection_dead_letters \
                   (projection, event_id, aggregate_type, aggregate_id, version, error, attempts, first_failed_at, last_failed_at, reason) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (projection, event_id, tenant_id) DO NOTHING"
            ),
            list_dead_letters: format!(
                "SELECT id, event_id, aggregate_type, aggregate_id, version, reason, error, attempts, first_failed_at, last_failed_at \
                 FROM {s}.projection_dead_letters WHERE projection = $1 ORDER BY aggregate_type, aggregate_id, version"
            ),
            stream_dead_letters: format!(
                "SELECT id, event_id, aggregate_type, aggregate_id, version, reason, error, attempts, first_failed_at, last_failed_at \
                 FROM {s}.projection_dead_letters \
                 WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND version > $4 \
                 ORDER BY version LIMIT $5"
            ),
            event_by_id: format!("SELECT {EVENT_COLUMNS} FROM {s}.events WHERE event_id = $1"),
            resolve_dead_letter: format!("DELETE FROM {s}.projection_dead_letters WHERE id = $1"),
            fail_dead_letter: format!(
                "UPDATE {s}.projection_dead_letters \
                 SET attempts = attempts + 1, reason = 'failed', error = $2, last_failed_at = now() WHERE id = $1"
            ),
            purge_dead_letters: format!(
                "DELETE FROM {s}.projection_dead_letters WHERE projection = $1 AND ($2::timestamptz IS NULL OR last_failed_at < $2)"
            ),
            reset_checkpoint: format!(
                "UPDATE {s}.projection_checkpoints SET transaction_id = '0', global_position = 0, updated_at = now(), \
                   rebuild_requested_at = NULL, rebuilt_at = now(), request_error = NULL \
                 WHERE projection = $1 AND epoch = $2 AND lease_until >= clock_timestamp()"
            ),
            request_rebuild: format!(
                "UPDATE {s}.projection_checkpoints SET rebuild_requested_at = now(), request_error = NULL \
             WHERE projection = $1 RETURNING rebuild_requested_at"
            ),
            request_retry: format!(
                "UPDATE {s}.projection_dead_letters SET retry_requested_at = now() WHERE id = $1 RETURNING projection"
            ),
            request_retry_all: format!(
                "UPDATE {s}.projection_dead_letters SET retry_requested_at = now() WHERE projection = $1"
            ),
            requests: format!(
                "SELECT rebuild_requested_at, rebuilt_at, request_error, \
                    (SELECT count(*) FROM {s}.projection_dead_letters d WHERE d.projection = c.projection \
                       AND d.retry_requested_at IS NOT NULL) AS retries_pending \
             FROM {s}.projection_checkpoints c WHERE projection = $1"
            ),
            letter_state: format!(
                "SELECT retry_requested_at IS NOT NULL AS pending, error FROM {s}.projection_dead_letters WHERE id = $1"
            ),
            projection_statuses: format!(
                "WITH c AS ( \
                   SELECT p.projection, p.owner, p.epoch, p.lease_until, p.updated_at, p.segments, \
                          p.segment_of, p.segment_index, COALESCE(m.transaction_id, p.transaction_id) AS transaction_id, \
                          COALESCE(m.global_position, p.global_position) AS global_position \
                   FROM {s}.projection_checkpoints p LEFT JOIN LATERAL ( \
                     SELECT q.transaction_id, q.global_position FROM {s}.projection_checkpoints q \
                     WHERE p.segments IS NOT NULL AND q.segment_of = p.projection \
                     ORDER BY q.transaction_id, q.global_position LIMIT 1) m ON true) \
                SELECT c.projection, c.transaction_id::text AS transaction_text, c.global_position, c.owner, c.epoch, \
                COALESCE(c.lease_until > now(), false) AS leased, c.updated_at, c.segments, c.segment_of, \
                (SELECT count(*) FROM {s}.projection_dead_letters d WHERE d.projection = c.projection) AS dead_letters, \
                l.lag, l.lag_seconds \
         FROM c, LATERAL ( \
           SELECT count(*) AS lag, \
                  COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(e.recorded_at))::float8, 0) AS lag_seconds \
           FROM {s}.events e WHERE (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)) l \
         ORDER BY COALESCE(c.segment_of, c.projection), c.segment_of IS NOT NULL, c.segment_index, c.projection"
            ),
            reset_dead_letters: format!(
                "DELETE FROM {s}.projection_dead_letters WHERE projection = $1"
            ),
            hold_lease: format!(
                "SELECT 1 FROM {s}.projection_checkpoints \
                 WHERE projection = $1 AND epoch = $2 AND lease_until >= clock_timestamp() FOR UPDATE"
            ),
            // A segment's lease: only an existing row (a rescale deletes the rows it replaces,
            // and a worker of the old layout must not bring one back).
            acquire_segment: format!(
                "UPDATE {s}.projection_checkpoints SET \
                   epoch = CASE WHEN owner = $2 AND epoch = $4::int8 THEN epoch ELSE epoch + 1 END, \
                   owner = $2, lease_until = clock_timestamp() + make_interval(secs => $3) \
                 WHERE projection = $1 AND segment_of IS NOT NULL \
                   AND (owner IS NULL OR owner = $2 OR lease_until < clock_timestamp()) \
                 RETURNING epoch, transaction_id::text AS transaction_text, global_position"
            ),
            release_lease: format!(
                "UPDATE {s}.projection_checkpoints \
                 SET lease_until = clock_timestamp() - interval '1 millisecond' \
                 WHERE projection = $1 AND epoch = $2 AND lease_until >= clock_timestamp()"
            ),
            // What a projection has passed: its own checkpoint, or the least of its segments'.
            progress_checkpoint: format!(
                "SELECT transaction_id::text AS transaction_text, global_position \
                 FROM {s}.projection_checkpoints \
                 WHERE segment_of = $1 OR (projection = $1 AND segments IS NULL) \
                 ORDER BY transaction_id, global_position LIMIT 1"
            ),
            read_checkpoint: format!(
                "SELECT transaction_id::text AS transaction_text, global_position, owner, epoch \
                 FROM {s}.projection_checkpoints WHERE projection = $1"
            ),
            load_snapshot: format!(
                "SELECT version, schema_version, state FROM {s}.snapshots WHERE aggregate_type = $1 AND aggregate_id = $2"
            ),
            save_snapshot: format!(
                "INSERT INTO {s}.snapshots (aggregate_type, aggregate_id, version, schema_version, state, personal_subjects) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (aggregate_type, aggregate_id, tenant_id) DO UPDATE \
                   SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
                       state = EXCLUDED.state, personal_subjects = EXCLUDED.personal_subjects, \
                       taken_at = now() \
                 WHERE {s}.snapshots.version <= EXCLUDED.version"
            ),
            quoted_schema: s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_with_inner_quotes_doubled() {
        assert_eq!(quote_ident("plain"), "\"plain\"");
        assert_eq!(
            quote_ident("a\"; DROP SCHEMA x; --"),
            "\"a\"\"; DROP SCHEMA x; --\""
        );
    }

    #[test]
    fn schema_names_are_validated() {
        assert!(Sql::new("cqrs").is_ok());
        assert!(Sql::new("ünïcødé \"quoted\"; semi").is_ok());
        assert!(matches!(Sql::new(""), Err(StoreError::InvalidInput(_))));
        assert!(matches!(
            Sql::new(&"x".repeat(64)),
            Err(StoreError::InvalidInput(_))
        ));
        assert!(matches!(
            Sql::new("nul\0"),
            Err(StoreError::InvalidInput(_))
        ));
    }

    #[test]
    fn the_channel_is_short_and_per_schema() {
        // md5('cqrs') as PostgreSQL computes it: `SELECT md5('cqrs')`.
        assert_eq!(channel("cqrs"), "cqrs_c3a86fb40a66d6043b320163a6976fa7");
        assert_eq!(channel(&"é".repeat(31)).len(), 37);
        assert_ne!(channel("a"), channel("b"));
    }
}
