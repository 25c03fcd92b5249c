//! Appends: the expected version, idempotency keys, inline projections, and the retry after a lost race.

use evently_core::store::{
    AppendResult, StoreScope, classify_stored_ids, stamp_tenant, validate_append,
};
use evently_core::{
    EventData, EventId, EventStore, ExpectedVersion, StoreError, StoredEvent, StreamId,
};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::copy::{COPY_THRESHOLD, copy_at};
use crate::errors::backend;
use crate::insert::{Insert, insert_at, insert_keyed, refused, stream_version_on};
use crate::rows::{fetch_events, to_i64};
use crate::store::PostgresEventStore;
use crate::tx::Transaction;

/// How many times an append with [`ExpectedVersion::Any`] or [`ExpectedVersion::StreamExists`]
/// retries after losing a race for a version number (it has no expectation to fail).
const ANY_VERSION_ATTEMPTS: usize = 64;

/// The version an expectation names (`Exact(n)`: n, `NoStream`: 0): the base to append at, and
/// what makes a lost race a conflict rather than a reason to try again. `None` for `Any` and
/// `StreamExists`, which take the stream's version as they find it.
fn named_version(expected: ExpectedVersion) -> Option<u64> {
    match expected {
        ExpectedVersion::Exact(n) => Some(n),
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Any | ExpectedVersion::StreamExists => None,
    }
}

impl PostgresEventStore {
    /// [`EventStore::append`] without its span and metrics.
    pub(crate) async fn append_unobserved(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        stamp_tenant(self.scope.writable()?, &mut events)?;
        self.seal(&mut events).await?;
        if events.is_empty() {
            let actual = self.version_of(stream).await?;
            return if expected.is_met_by(actual) {
                Ok(AppendResult {
                    stream: stream.clone(),
                    version: actual,
                    events: Vec::new(),
                })
            } else {
                Err(StoreError::Conflict {
                    stream: stream.clone(),
                    expected,
                    actual,
                })
            };
        }
        self.same_server().await?;
        let appended = self.append_on(stream, expected, &events).await?;
        self.notifier.committed(&self.pool, &self.channel);
        Ok(appended)
    }

    /// [`EventStore::append_with_key`] without its span and metrics.
    pub(crate) async fn append_with_key_unobserved(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        stamp_tenant(self.scope.writable()?, &mut events)?;
        self.seal(&mut events).await?;
        self.same_server().await?;
        // The common case in one statement (no transaction block, one round trip).
        if let Some(base) = named_version(expected)
            && self.inline.is_empty()
            && !events.is_empty()
            && events.len() < COPY_THRESHOLD
            && let Some(result) =
                insert_keyed(&self.pool, &self.sql, stream, base, &events, key).await?
        {
            self.notifier.committed(&self.pool, &self.channel);
            return Ok(result);
        }
        let result = self
            .retry_lost_races(stream, expected, &events, || {
                Box::pin(self.try_keyed(stream, expected, &events, key))
            })
            .await?;
        self.notifier.committed(&self.pool, &self.channel);
        Ok(result)
    }

    /// One try of a keyed append, in a transaction of its own.
    async fn try_keyed(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[EventData],
        key: &str,
    ) -> Result<AppendResult, Insert> {
        let failed = |e: sqlx::Error| Insert::Failed(backend(e));
        let mut tx = Transaction::begin(&self.pool).await.map_err(failed)?;
        match self
            .append_keyed_in(&mut tx, stream, expected, events, key)
            .await
        {
            Ok(Keyed::Appended(result)) => {
                tx.commit().await.map_err(failed)?;
                Ok(result)
            }
            Ok(Keyed::KeyTaken) => {
                tx.rollback().await;
                let record = self.find_key(key).await.map_err(Insert::Failed)?;
                Err(Insert::Failed(record.map_or_else(
                    || StoreError::backend(format!("idempotency key `{key}` vanished")),
                    |r| StoreError::KeyUsed(Box::new(r)),
                )))
            }
            Ok(Keyed::Lost(lost)) => {
                tx.rollback().await;
                Err(lost)
            }
            Err(error) => {
                tx.rollback().await;
                Err(Insert::Failed(error))
            }
        }
    }

    /// Runs `attempt` until it appends, fails, or loses a race it may not retry. After a lost
    /// race the events may be stored already (the same ids appended before: a replay, or ids
    /// reused for other events; the error says which); an expectation that names a version
    /// (`Exact`, `NoStream`) is then a conflict; only `Any` and `StreamExists` try again, at
    /// most [`ANY_VERSION_ATTEMPTS`] times.
    async fn retry_lost_races<'a>(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[EventData],
        mut attempt: impl FnMut() -> BoxFuture<'a, Result<AppendResult, Insert>>,
    ) -> Result<AppendResult, StoreError> {
        for _ in 0..ANY_VERSION_ATTEMPTS {
            match attempt().await {
                Ok(result) => return Ok(result),
                Err(Insert::Failed(error)) => return Err(error),
                Err(Insert::IdTaken) => {
                    // A replay, a reuse, or (under row-level security) an id of another
                    // tenant's event, which this store cannot see.
                    return Err(self.classify_ids(stream, events).await?.unwrap_or_else(|| {
                        StoreError::EventIdTaken {
                            event_ids: events.iter().map(|e| e.event_id).collect(),
                        }
                    }));
                }
                Err(Insert::Lost) => {
                    if let Some(error) = self.classify_ids(stream, events).await? {
                        return Err(error);
                    }
                    if named_version(expected).is_some() {
                        return Err(StoreError::Conflict {
                            stream: stream.clone(),
                            expected,
                            actual: self.version_of(stream).await?,
                        });
                    }
                }
            }
        }
        Err(StoreError::backend(format!(
            "{stream}: lost the race for a version {ANY_VERSION_ATTEMPTS} times in a row"
        )))
    }

    pub(crate) async fn version_of(&self, stream: &StreamId) -> Result<u64, StoreError> {
        stream_version_on(&self.pool, &self.sql, stream).await
    }

    /// Appends, deciding the base version from the expectation; retries lost version races for the
    /// expectations that allow it.
    async fn append_on(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult, StoreError> {
        self.retry_lost_races(stream, expected, events, || {
            Box::pin(self.try_append(stream, expected, events))
        })
        .await
    }

    /// One try of an append: the base version from the expectation, then the insert.
    async fn try_append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult, Insert> {
        let base = match named_version(expected) {
            Some(base) => base,
            None => {
                let actual = self.version_of(stream).await.map_err(Insert::Failed)?;
                if expected == ExpectedVersion::StreamExists && actual == 0 {
                    return Err(Insert::Failed(StoreError::Conflict {
                        stream: stream.clone(),
                        expected,
                        actual,
                    }));
                }
                actual
            }
        };
        // On the pool, not a held connection: the follow-up queries must not wait for a
        // second connection while holding one (64 writers on a pool of 32 would deadlock).
        if !self.inline.is_empty() {
            self.insert_with_inline(stream, base, events).await
        } else if events.len() >= COPY_THRESHOLD && !matches!(self.scope, StoreScope::TenantView(_))
        {
            // PostgreSQL refuses `COPY FROM` into a table with row-level security: a tenant's
            // view of the row-level layout inserts a large batch with one `INSERT` instead.
            copy_at(&self.pool, &self.sql, stream, base, events).await
        } else if let Some(group) = &self.group {
            group
                .insert(&self.pool, &self.sql, stream, base, events)
                .await
        } else {
            insert_at(&self.pool, &self.sql, stream, base, events).await
        }
    }

    /// One try of a keyed append in `conn`'s transaction: the key first (a racing caller with the
    /// same key waits on it until this transaction ends, then sees the key and these events, or
    /// takes it), then the expected version, the events, the inline projections and the key's
    /// versions.
    async fn append_keyed_in(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[EventData],
        key: &str,
    ) -> Result<Keyed, StoreError> {
        let claimed = sqlx::query(AssertSqlSafe(self.sql.claim_key.clone()))
            .bind(key)
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        if claimed.rows_affected() == 0 {
            return Ok(Keyed::KeyTaken);
        }
        let actual = stream_version_on(&mut *conn, &self.sql, stream).await?;
        if !expected.is_met_by(actual) {
            return Err(StoreError::Conflict {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        let result = if events.is_empty() {
            AppendResult {
                stream: stream.clone(),
                version: actual,
                events: Vec::new(),
            }
        } else {
            match insert_at(&mut *conn, &self.sql, stream, actual, events).await {
                Ok(result) => result,
                Err(Insert::Failed(error)) => return Err(error),
                Err(lost @ (Insert::Lost | Insert::IdTaken)) => return Ok(Keyed::Lost(lost)),
            }
        };
        self.run_inline(conn, &result, events).await?;
        let first = result
            .events
            .first()
            .map_or(result.version + 1, |e| e.version);
        sqlx::query(AssertSqlSafe(self.sql.set_key_versions.clone()))
            .bind(key)
            .bind(to_i64(first)?)
            .bind(to_i64(result.version)?)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        Ok(Keyed::Appended(result))
    }

    /// Inserts and runs the inline projections in one transaction.
    async fn insert_with_inline(
        &self,
        stream: &StreamId,
        base: u64,
        events: &[EventData],
    ) -> Result<AppendResult, Insert> {
        let mut tx = Transaction::begin(&self.pool)
            .await
            .map_err(|e| Insert::Failed(backend(e)))?;
        let outcome = async {
            let result = insert_at(&mut *tx, &self.sql, stream, base, events).await?;
            self.run_inline(&mut tx, &result, events)
                .await
                .map_err(Insert::Failed)?;
            Ok(result)
        }
        .await;
        tx.end(outcome, refused).await
    }

    /// Applies the just-appended events to the inline projections, in the append's transaction.
    async fn run_inline(
        &self,
        conn: &mut PgConnection,
        result: &AppendResult,
        events: &[EventData],
    ) -> Result<(), StoreError> {
        if self.inline.is_empty() {
            return Ok(());
        }
        let mut stored: Vec<StoredEvent> = result
            .events
            .iter()
            .zip(events)
            .map(|(at, data)| StoredEvent {
                event_id: at.event_id,
                stream: result.stream.clone(),
                version: at.version,
                checkpoint: at.checkpoint,
                recorded_at: at.recorded_at,
                event_type: data.event_type.clone(),
                schema_version: data.schema_version,
                payload: data.payload.clone(),
                metadata: data.metadata.clone(),
            })
            .collect();
        // The inline projections read what was written, as every reader does.
        self.open(&mut stored).await?;
        for projection in self.inline.iter() {
            projection.apply_all(&stored, conn).await?;
        }
        Ok(())
    }

    /// After a unique violation: are these ids stored already (an idempotent replay, or a reuse)?
    async fn classify_ids(
        &self,
        stream: &StreamId,
        events: &[EventData],
    ) -> Result<Option<StoreError>, StoreError> {
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id.0).collect();
        let stored = fetch_events(
            sqlx::query(AssertSqlSafe(self.sql.events_by_id.clone())).bind(&ids),
            &self.pool,
            ids.len(),
        )
        .await?;
        let by_id: std::collections::HashMap<EventId, &StoredEvent> =
            stored.iter().map(|e| (e.event_id, e)).collect();
        Ok(classify_stored_ids(stream, events, |id| {
            by_id.get(id).copied()
        }))
    }
}

/// How one try of a keyed append in a transaction ended.
enum Keyed {
    /// Appended (and the key recorded): commit.
    Appended(AppendResult),
    /// Another caller recorded the key first.
    KeyTaken,
    /// Another writer took a version first ([`Insert::Lost`]), or an event id is stored already
    /// ([`Insert::IdTaken`]).
    Lost(Insert),
}
