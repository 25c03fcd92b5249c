//! The append statements themselves, shared by plain, grouped and `COPY` appends: one event's columns, the insert at a base version, and the outcome read back.

use evently_core::store::{AppendResult, AppendedEvent};
use evently_core::{Checkpoint, EventData, EventId, StoreError, StreamId};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use crate::errors::backend;
use crate::rows::{to_i64, to_u64, xid};
use crate::sql::Sql;

/// The columns of an event that the store computes: its schema version as PostgreSQL's `integer`
/// and its payload and metadata as JSON text (the `json` columns keep the text as written).
pub(crate) struct Columns {
    pub(crate) schema_version: i32,
    pub(crate) payload: String,
    pub(crate) metadata: String,
}

impl Columns {
    pub(crate) fn of(event: &EventData) -> Result<Self, StoreError> {
        Ok(Self {
            schema_version: Self::schema_version(event)?,
            payload: serde_json::to_string(&event.payload)
                .map_err(|e| Self::unwritable(event, "payload", e))?,
            metadata: serde_json::to_string(&event.metadata)
                .map_err(|e| Self::unwritable(event, "metadata", e))?,
        })
    }

    /// The event's schema version as PostgreSQL's `integer`.
    pub(crate) fn schema_version(event: &EventData) -> Result<i32, StoreError> {
        i32::try_from(event.schema_version).map_err(|_| {
            StoreError::InvalidInput(format!(
                "schema version {} of `{}` does not fit PostgreSQL's integer",
                event.schema_version, event.event_type
            ))
        })
    }

    /// The error for a payload or metadata (`what`) that serde_json cannot write.
    pub(crate) fn unwritable(
        event: &EventData,
        what: &str,
        error: serde_json::Error,
    ) -> StoreError {
        StoreError::InvalidInput(format!(
            "the {what} of `{}` cannot be written as JSON: {error}",
            event.event_type
        ))
    }
}

/// The columns of a batch, one array per column, as the array statements bind them.
pub(crate) struct ColumnArrays<'e> {
    pub(crate) ids: Vec<uuid::Uuid>,
    pub(crate) types: Vec<&'e str>,
    pub(crate) versions: Vec<i32>,
    pub(crate) payloads: Vec<String>,
    pub(crate) metadata: Vec<String>,
}

impl<'e> ColumnArrays<'e> {
    pub(crate) fn of(events: &'e [EventData]) -> Result<Self, StoreError> {
        let mut arrays = Self {
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            versions: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
        };
        for event in events {
            let columns = Columns::of(event)?;
            arrays.ids.push(event.event_id.0);
            arrays.types.push(event.event_type.as_str());
            arrays.versions.push(columns.schema_version);
            arrays.payloads.push(columns.payload);
            arrays.metadata.push(columns.metadata);
        }
        Ok(arrays)
    }
}

/// The outcome of an append from the one-row summary both append statements return.
fn appended_from(
    row: &sqlx::postgres::PgRow,
    stream: &StreamId,
    base: u64,
    events: &[EventData],
) -> Result<AppendResult, Insert> {
    let failed = |e: sqlx::Error| Insert::Failed(backend(e));
    let positions: Vec<i64> = row.try_get("positions").map_err(failed)?;
    if positions.len() != events.len() {
        // The stream was not at `base` (the statement's condition): nothing went in.
        return Err(Insert::Lost);
    }
    let transaction: &str = row.try_get("transaction_text").map_err(failed)?;
    appended(
        stream,
        base,
        events.iter().map(|e| e.event_id),
        &positions,
        xid(transaction).map_err(Insert::Failed)?,
        row.try_get("recorded_at").map_err(failed)?,
    )
    .map_err(Insert::Failed)
}
/// The outcome of an append whose events (`event_ids`, in version order) went in at versions
/// `base + 1..` and global `positions` in `transaction`: what every append path returns.
pub(crate) fn appended(
    stream: &StreamId,
    base: u64,
    event_ids: impl Iterator<Item = EventId>,
    positions: &[i64],
    transaction: u64,
    recorded_at: chrono::DateTime<chrono::Utc>,
) -> Result<AppendResult, StoreError> {
    let mut events = Vec::with_capacity(positions.len());
    for ((event_id, &position), version) in event_ids.zip(positions).zip(base + 1..) {
        events.push(AppendedEvent {
            event_id,
            version,
            checkpoint: Checkpoint::new(transaction, to_u64(position)?),
            recorded_at,
        });
    }
    Ok(AppendResult {
        stream: stream.clone(),
        version: base + events.len() as u64,
        events,
    })
}
/// Why an `INSERT` attempt did not append.
pub(crate) enum Insert {
    /// A unique violation, or the expected base version was not the stream's: the caller decides
    /// between replay, reuse, conflict and another attempt.
    Lost,
    /// The unique index of the event ids refused a row: an id of the append is stored already
    /// (a replay or a reuse, which the caller tells apart, or an event this store cannot see).
    IdTaken,
    /// Anything else.
    Failed(StoreError),
}
/// Inserts `events` at versions `base + 1..` if the stream is exactly at `base`, in one statement.
pub(crate) async fn insert_at<'c, E: sqlx::PgExecutor<'c>>(
    executor: E,
    sql: &Sql,
    stream: &StreamId,
    base: u64,
    events: &[EventData],
) -> Result<AppendResult, Insert> {
    let ColumnArrays {
        ids,
        types,
        versions,
        payloads,
        metadata,
    } = ColumnArrays::of(events).map_err(Insert::Failed)?;
    let base_i64 = to_i64(base).map_err(Insert::Failed)?;
    let query = sqlx::query(AssertSqlSafe(if events.len() == 1 {
        sql.insert_one.clone()
    } else {
        sql.insert.clone()
    }))
    .bind(&stream.aggregate_type)
    .bind(stream.aggregate_id.as_str())
    .bind(base_i64);
    // One event (most commands) binds scalars: no arrays to encode, unnest and aggregate.
    let query = match (
        &ids[..],
        &types[..],
        &versions[..],
        &payloads[..],
        &metadata[..],
    ) {
        ([id], [event_type], [version], [payload], [meta]) => query
            .bind(id)
            .bind(event_type)
            .bind(version)
            .bind(payload)
            .bind(meta),
        _ => query
            .bind(&ids)
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .bind(&metadata),
    };
    let row = match query.fetch_optional(executor).await {
        Ok(Some(row)) => row,
        // The single-event statement returns no row when the stream is not at `base`.
        Ok(None) => return Err(Insert::Lost),
        Err(error) => return Err(refused(error)),
    };
    appended_from(&row, stream, base, events)
}
/// A keyed append at `base` in one statement (`Sql::insert_keyed`): `None` when the key was
/// taken, the stream was not at `base`, or a unique index refused a row (the statement then
/// wrote nothing): the transaction path sorts out which.
pub(crate) async fn insert_keyed(
    pool: &PgPool,
    sql: &Sql,
    stream: &StreamId,
    base: u64,
    events: &[EventData],
    key: &str,
) -> Result<Option<AppendResult>, StoreError> {
    let columns = ColumnArrays::of(events)?;
    let row = sqlx::query(AssertSqlSafe(sql.insert_keyed.clone()))
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .bind(to_i64(base)?)
        .bind(&columns.ids)
        .bind(&columns.types)
        .bind(&columns.versions)
        .bind(&columns.payloads)
        .bind(&columns.metadata)
        .bind(key)
        .fetch_one(pool)
        .await;
    let row = match row {
        Ok(row) => row,
        Err(error) if is_unique_violation(&error) => return Ok(None),
        Err(error) => return Err(backend(error)),
    };
    match appended_from(&row, stream, base, events) {
        Ok(result) => Ok(Some(result)),
        Err(Insert::Lost | Insert::IdTaken) => Ok(None),
        Err(Insert::Failed(error)) => Err(error),
    }
}
/// What a statement of an append that failed means: a unique violation is a lost race
/// ([`Insert::Lost`]) or, on the event ids' index, [`Insert::IdTaken`]; anything else failed.
pub(crate) fn refused(error: sqlx::Error) -> Insert {
    match error.as_database_error() {
        Some(e) if e.is_unique_violation() => {
            if e.constraint() == Some(EVENT_ID_KEY) {
                Insert::IdTaken
            } else {
                Insert::Lost
            }
        }
        _ => Insert::Failed(backend(error)),
    }
}

/// The unique constraint on `events.event_id` (migration 0001).
const EVENT_ID_KEY: &str = "events_event_id_key";

pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.is_unique_violation())
}
pub(crate) async fn stream_version_on<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    sql: &Sql,
    stream: &StreamId,
) -> Result<u64, StoreError> {
    let version: i64 = sqlx::query_scalar(AssertSqlSafe(sql.stream_version.clone()))
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .fetch_one(executor)
        .await
        .map_err(backend)?;
    to_u64(version)
}
