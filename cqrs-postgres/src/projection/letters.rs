//! The dead-letter statements both PostgreSQL backends run (on `projection_dead_letters`, under
//! `projection`), in the unit's transaction.

use std::collections::HashSet;

use evently_core::projection::engine::{Parked, Savepoint};
use evently_core::projection::{DeadLetter, DeliveryError};
use evently_core::{StoreError, StreamId};
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::WorkerError;
use crate::PostgresEventStore;
use crate::errors::backend;
use crate::rows::{to_i64, to_u64};

pub(super) async fn savepoint(conn: &mut PgConnection, op: Savepoint) -> Result<(), DeliveryError> {
    let statement = match op {
        Savepoint::Set => "SAVEPOINT cqrs_event",
        Savepoint::Release => "RELEASE SAVEPOINT cqrs_event",
        Savepoint::Rollback => "ROLLBACK TO SAVEPOINT cqrs_event",
    };
    sqlx::query(statement)
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}

pub(super) async fn blocked_streams(
    store: &PostgresEventStore,
    conn: &mut PgConnection,
    projection: &str,
) -> Result<HashSet<StreamId>, DeliveryError> {
    let rows = sqlx::query(AssertSqlSafe(store.sql.blocked_streams.clone()))
        .bind(projection)
        .fetch_all(conn)
        .await
        .map_err(backend)?;
    rows.iter()
        .map(|row| {
            let aggregate_type: String = row.try_get(0).map_err(backend)?;
            let aggregate_id: String = row.try_get(1).map_err(backend)?;
            Ok(StreamId::new(aggregate_type, aggregate_id))
        })
        .collect()
}

pub(super) async fn park(
    store: &PostgresEventStore,
    conn: &mut PgConnection,
    projection: &str,
    parked: Parked<'_>,
) -> Result<(), DeliveryError> {
    sqlx::query(AssertSqlSafe(store.sql.park.clone()))
        .bind(projection)
        .bind(parked.event_id.0)
        .bind(&parked.stream.aggregate_type)
        .bind(parked.stream.aggregate_id.as_str())
        .bind(to_i64(parked.version)?)
        .bind(&parked.failure.error)
        .bind(i32::try_from(parked.failure.attempts).unwrap_or(i32::MAX))
        .bind(parked.failure.first_failed_at)
        .bind(chrono::Utc::now())
        .bind(parked.failure.reason.as_str())
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}

pub(super) async fn of_stream(
    store: &PostgresEventStore,
    conn: &mut PgConnection,
    projection: &str,
    stream: &StreamId,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, DeliveryError> {
    let after = match after {
        Some(version) => to_i64(version)?,
        None => i64::MIN,
    };
    let rows = sqlx::query(AssertSqlSafe(store.sql.stream_dead_letters.clone()))
        .bind(projection)
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(conn)
        .await
        .map_err(backend)?;
    rows.iter().map(dead_letter).collect()
}

pub(super) async fn reread(
    store: &PostgresEventStore,
    conn: &mut PgConnection,
    letter: &DeadLetter,
) -> Result<Result<evently_core::StoredEvent, String>, DeliveryError> {
    let row = sqlx::query(AssertSqlSafe(store.sql.event_by_id.clone()))
        .bind(letter.event_id.0)
        .fetch_optional(conn)
        .await
        .map_err(backend)?;
    let Some(row) = row else {
        return Ok(Err(format!(
            "event {} (version {} of {}) is not in this database's event store",
            letter.event_id, letter.version, letter.stream
        )));
    };
    match crate::rows::stored_event(&row) {
        Ok(event) => Ok(Ok(event)),
        // Still unreadable: it stays parked, with the reason.
        Err(corrupt @ StoreError::Corrupt(_)) => Ok(Err(corrupt.to_string())),
        Err(error) => Err(error.into()),
    }
}

pub(super) async fn resolve(
    store: &PostgresEventStore,
    conn: &mut PgConnection,
    id: i64,
) -> Result<(), DeliveryError> {
    sqlx::query(AssertSqlSafe(store.sql.resolve_dead_letter.clone()))
        .bind(id)
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}

pub(super) async fn fail_again(
    store: &PostgresEventStore,
    conn: &mut PgConnection,
    id: i64,
    error: &str,
) -> Result<(), DeliveryError> {
    sqlx::query(AssertSqlSafe(store.sql.fail_dead_letter.clone()))
        .bind(id)
        .bind(error)
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}

/// A dead letter from its row.
pub(crate) fn dead_letter(row: &sqlx::postgres::PgRow) -> Result<DeadLetter, WorkerError> {
    let aggregate_type: String = row.try_get("aggregate_type").map_err(backend)?;
    let aggregate_id: String = row.try_get("aggregate_id").map_err(backend)?;
    let attempts: i32 = row.try_get("attempts").map_err(backend)?;
    let reason: String = row.try_get("reason").map_err(backend)?;
    Ok(DeadLetter {
        reason: reason
            .parse()
            .map_err(|e| DeliveryError::Store(StoreError::backend(e)))?,
        id: row.try_get("id").map_err(backend)?,
        event_id: evently_core::EventId(row.try_get("event_id").map_err(backend)?),
        stream: StreamId::new(aggregate_type, aggregate_id),
        version: to_u64(row.try_get("version").map_err(backend)?)?,
        error: row.try_get("error").map_err(backend)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        first_failed_at: row.try_get("first_failed_at").map_err(backend)?,
        last_failed_at: row.try_get("last_failed_at").map_err(backend)?,
    })
}
