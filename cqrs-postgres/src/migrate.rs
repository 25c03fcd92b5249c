//! The embedded migrations and how a schema is brought up to date.

use evently_core::StoreError;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::errors::backend;
use crate::sql::Sql;
use crate::store::PostgresEventStore;
use crate::tx::Detached;

/// The embedded migrations: the events, snapshots and command-key tables.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl PostgresEventStore {
    /// Creates the schema if needed and applies the embedded migrations; safe to call from several
    /// processes at once, and to cut at any point (a timeout, a shutdown): each migration is
    /// applied whole or not at all, and the connection, which holds the migration locks and the
    /// schema's `search_path` while it runs, is closed rather than handed back to the pool.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = Detached::acquire(&self.pool).await.map_err(backend)?;
        migrate_on(&mut conn, &self.sql, None).await?;
        // Finished, its locks released and its search_path reset: back to the pool. After an
        // error it is closed instead (dropped), as it is when this future is cut.
        conn.release();
        Ok(())
    }

    /// The migrations applied to this schema, oldest first: version and description (none when
    /// the schema was never migrated).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn applied_migrations(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let table = format!("{}._sqlx_migrations", self.sql.quoted_schema);
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&table)
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT version, description FROM {table} WHERE success ORDER BY version"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)
    }
}

/// Applies the migrations to the schema of `sql`: all of them, or those up to version `up_to`
/// (the upgrade tests start from an older schema).
async fn migrate_on(
    conn: &mut PgConnection,
    sql: &Sql,
    up_to: Option<i64>,
) -> Result<(), StoreError> {
    // Serializes concurrent first migrations of a schema (CREATE SCHEMA IF NOT EXISTS can race).
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(&sql.quoted_schema)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    let result = async {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            sql.quoted_schema
        )))
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
        sqlx::query(AssertSqlSafe(format!(
            "SET search_path TO {}",
            sql.quoted_schema
        )))
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
        let migrated = match up_to {
            None => MIGRATOR.run(&mut *conn).await,
            Some(version) => MIGRATOR.run_to(version, &mut *conn).await,
        }
        .map_err(StoreError::backend);
        sqlx::query("RESET search_path")
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        migrated
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(&sql.quoted_schema)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::empty_schema;
    use evently_core::conformance::read_settled;
    use evently_core::store::ReplayEvent;
    use evently_core::{
        Checkpoint, EventData, EventId, EventStore, ExpectedVersion, StoredEvent, StreamId,
    };
    use futures::StreamExt;

    /// The JSON corpus of the upgrade test: escapes, non-ASCII, numbers at the edges of what
    /// `serde_json` and `numeric` hold, nesting, empty containers, keys `jsonb` reorders.
    fn tricky_payloads() -> Vec<serde_json::Value> {
        vec![
            serde_json::json!({ "text": "tab\t newline\n back\\slash \"quoted\" \u{1} é 🎉 \u{2028}" }),
            serde_json::json!({ "max": u64::MAX, "min": i64::MIN, "tenth": 0.1, "huge": 1e300, "tiny": 5e-324 }),
            serde_json::json!({ "zzz": 1, "a": 2, "mm": [null, true, false, [], {}, [[{ "deep": [1, 2.5, "x"] }]]] }),
            serde_json::json!({}),
            serde_json::json!([1, "two", { "three": 3 }]),
            serde_json::json!("a bare string"),
            serde_json::json!(42),
        ]
    }

    fn tricky_events() -> Vec<EventData> {
        tricky_payloads()
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                let mut metadata = evently_core::Metadata::default()
                    .with_correlation_id(evently_core::CorrelationId::new());
                metadata.causation_id = Some(evently_core::CausationId::new());
                metadata.user_id = Some(format!("ü-{i}\t\"x\""));
                metadata
                    .headers
                    .insert("tenant".to_owned(), format!("t\\{i}\n"));
                EventData {
                    event_id: EventId::new(),
                    event_type: format!("Tricky{i}"),
                    schema_version: 1,
                    payload,
                    metadata,
                }
            })
            .collect()
    }

    async fn json_column_types(store: &PostgresEventStore) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'events' \
               AND column_name IN ('metadata', 'payload') ORDER BY column_name",
        )
        .bind(store.schema())
        .fetch_all(store.pool())
        .await
        .unwrap()
    }

    /// A schema written before migration 0009 (payload and metadata as `jsonb`) reads the same
    /// after it through every read path, and what is appended afterwards is stored as written.
    #[tokio::test]
    async fn events_written_as_jsonb_read_the_same_after_the_json_migration() {
        let store = empty_schema("unit_json_upgrade").await;
        let mut conn = store.pool().acquire().await.unwrap();
        migrate_on(&mut conn, &store.sql, Some(20261130000008))
            .await
            .unwrap();
        drop(conn);
        assert_eq!(json_column_types(&store).await, ["jsonb", "jsonb"]);
        let one = StreamId::new("thing", "one-by-one");
        for event in tricky_events() {
            store
                .append(&one, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
        let batch = StreamId::new("thing", "batch");
        store
            .append(&batch, ExpectedVersion::Any, tricky_events())
            .await
            .unwrap();
        let appended = 2 * tricky_payloads().len();
        let before = read_settled(&store, Checkpoint::START, appended).await;
        assert_eq!(before.len(), appended);

        // The upgrade as it happens in production: the new version's process migrates before it
        // reads (the old process's connections hold prepared reads whose result type changed,
        // which PostgreSQL refuses: "cached plan must not change result type").
        drop(store);
        let store = PostgresEventStore::connect(&crate::database_url(), "unit_json_upgrade")
            .await
            .unwrap();
        store.migrate().await.unwrap();
        assert_eq!(json_column_types(&store).await, ["json", "json"]);
        let after = store
            .read_all(Checkpoint::START, before.len())
            .await
            .unwrap();
        assert_eq!(after, before);
        let raw = store
            .read_all_raw(Checkpoint::START, before.len())
            .await
            .unwrap();
        assert_eq!(raw.len(), after.len());
        for (raw, parsed) in raw.iter().zip(&after) {
            let reparsed: serde_json::Value = serde_json::from_str(raw.payload.get()).unwrap();
            assert_eq!(reparsed, parsed.payload, "{}", raw.event_type);
            assert_eq!(raw.metadata, parsed.metadata);
        }
        for stream in [&one, &batch] {
            let loaded: Vec<StoredEvent> =
                store.load(stream, 0).map(Result::unwrap).collect().await;
            let expected: Vec<&StoredEvent> =
                after.iter().filter(|e| &e.stream == stream).collect();
            assert_eq!(loaded.iter().collect::<Vec<_>>(), expected);
            let replayed: Vec<ReplayEvent> =
                store.replay(stream, 0).map(Result::unwrap).collect().await;
            for (replayed, stored) in replayed.iter().zip(&expected) {
                let evently_core::store::Payload::Text(text) = &replayed.payload else {
                    panic!("replay returned a parsed payload");
                };
                let reparsed: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(reparsed, stored.payload);
            }
        }

        // Appended after the migration, one by one and as a batch: the stored text is the
        // text written, byte for byte.
        let written = tricky_events();
        let later = StreamId::new("thing", "later");
        store
            .append(&later, ExpectedVersion::Any, written[..1].to_vec())
            .await
            .unwrap();
        store
            .append(&later, ExpectedVersion::Exact(1), written[1..].to_vec())
            .await
            .unwrap();
        let last = after.last().unwrap().checkpoint;
        read_settled(&store, last, written.len()).await;
        let raw = store.read_all_raw(last, 100).await.unwrap();
        assert_eq!(raw.len(), written.len());
        for (raw, event) in raw.iter().zip(&written) {
            assert_eq!(
                raw.payload.get(),
                serde_json::to_string(&event.payload).unwrap()
            );
            assert_eq!(raw.metadata, event.metadata);
            assert_eq!(raw.event_id, event.event_id);
        }
    }

    /// Dead letters written before the reason column keep their meaning: the ones that waited
    /// behind another read as `WaitsBehind`, the rest as `Failed`.
    #[tokio::test]
    async fn dead_letters_from_before_the_reason_column_read_with_their_reason() {
        use evently_core::projection::{LetterReason, WAITS_BEHIND};
        let store = empty_schema("unit_reason_upgrade").await;
        let mut conn = store.pool().acquire().await.unwrap();
        migrate_on(&mut conn, &store.sql, Some(20261204000011))
            .await
            .unwrap();
        for (version, error, attempts) in
            [(1, "boom", 3), (2, WAITS_BEHIND, 0), (3, "unknown type", 0)]
        {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {}.projection_dead_letters \
                   (projection, event_id, aggregate_type, aggregate_id, version, error, attempts, first_failed_at, last_failed_at) \
                 VALUES ('p', $1, 'thing', 't-1', $2, $3, $4, now(), now())",
                store.sql.quoted_schema
            )))
            .bind(uuid::Uuid::now_v7())
            .bind(version)
            .bind(error)
            .bind(attempts)
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        migrate_on(&mut conn, &store.sql, None).await.unwrap();
        drop(conn);
        let letters = crate::control::DeadLetters::new(store)
            .list("p")
            .await
            .unwrap();
        let reasons: Vec<(u64, LetterReason)> =
            letters.iter().map(|l| (l.version, l.reason)).collect();
        assert_eq!(
            reasons,
            [
                (1, LetterReason::Failed),
                (2, LetterReason::WaitsBehind),
                (3, LetterReason::Failed)
            ]
        );
    }
}
