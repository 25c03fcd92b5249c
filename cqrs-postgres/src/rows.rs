//! Reading rows into the core types, with every out-of-range value a typed error.

use evently_core::store::{Payload, ReplayEvent};
use evently_core::{
    AggregateId, Checkpoint, EventId, Metadata, RawStoredEvent, StoreError, StoredEvent, StreamId,
};
use std::ops::ControlFlow;

use sqlx::Row;

use crate::errors::backend;
use sqlx::postgres::PgRow;

/// A version or position as PostgreSQL's `bigint`.
pub(crate) fn to_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n)
        .map_err(|_| StoreError::InvalidInput(format!("{n} does not fit PostgreSQL's bigint")))
}

/// A stored `bigint` that must not be negative.
pub(crate) fn to_u64(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| {
        StoreError::backend(format!(
            "negative value {n} where a version or position was expected"
        ))
    })
}

/// A row's `transaction_text` and `global_position` as a checkpoint.
pub(crate) fn checkpoint(row: &PgRow) -> Result<Checkpoint, StoreError> {
    let transaction: String = row.try_get("transaction_text").map_err(backend)?;
    let position: i64 = row.try_get("global_position").map_err(backend)?;
    Ok(Checkpoint::new(xid(&transaction)?, to_u64(position)?))
}

/// A transaction id (`xid8`) read as text.
pub(crate) fn xid(text: &str) -> Result<u64, StoreError> {
    text.parse()
        .map_err(|e| StoreError::backend(format!("transaction id `{text}` is not a number: {e}")))
}

/// Runs `query` (which selects `EVENT_COLUMNS`) and reads every row as a stored event, into a
/// vector made for `expected` rows.
pub(crate) async fn fetch_events<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    pool: &sqlx::PgPool,
    expected: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut events = Vec::with_capacity(expected.min(10_000));
    each_event(query, pool, stored_event, |e| {
        events.push(e);
        ControlFlow::Continue(())
    })
    .await?;
    Ok(events)
}

/// Runs `query` (which selects `EVENT_COLUMNS`), reads each row with `read` and hands it to
/// `each` as it arrives; after a `Break` the remaining rows are read and dropped.
///
/// A [`StoreError::Corrupt`] row ends the read there: after rows were handed over, the read
/// succeeds with them (the reader's next read starts at the corrupt row); as the first row, it is
/// the read's error, naming the row and its checkpoint, so the reader can park it and go on.
pub(crate) async fn each_event<'q, 'c, E>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    executor: impl sqlx::Executor<'c, Database = sqlx::Postgres>,
    read: fn(&PgRow) -> Result<E, StoreError>,
    mut each: impl FnMut(E) -> ControlFlow<()>,
) -> Result<(), StoreError>
where
    'q: 'c,
{
    use futures::TryStreamExt;
    let mut rows = query.fetch(executor);
    let mut open = true;
    let mut handed = false;
    while let Some(row) = rows.try_next().await.map_err(backend)? {
        if open {
            match read(&row) {
                Ok(event) => {
                    handed = true;
                    open = each(event).is_continue();
                }
                Err(StoreError::Corrupt(_)) if handed => open = false,
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}

/// A row of `EVENT_COLUMNS` as a stored event. The payload stays JSON (decoding it is the caller's);
/// unreadable metadata or numbers are [`StoreError::Corrupt`] naming the event.
pub(crate) fn stored_event(row: &PgRow) -> Result<StoredEvent, StoreError> {
    stored_event_with(row)
}

/// A row of `EVENT_COLUMNS` as a stored event whose payload is the stored JSON text.
pub(crate) fn raw_stored_event(row: &PgRow) -> Result<RawStoredEvent, StoreError> {
    stored_event_with::<sqlx::types::Json<Box<serde_json::value::RawValue>>>(row)
        .map(|e| e.map_payload(|payload| payload.0))
}

/// A row of `EVENT_COLUMNS` with the payload decoded as `P`.
///
/// The columns that place the row (event id, stream, type, transaction id and position) are typed
/// by the table and always read; anything else that does not fit (a negative version or schema
/// version, metadata that is not ours, a payload that does not parse) is [`StoreError::Corrupt`]
/// naming the row and its checkpoint, so a reader can park it and go on after it.
fn stored_event_with<P>(row: &PgRow) -> Result<StoredEvent<P>, StoreError>
where
    P: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    // By index (`sql::EVENT_COLUMNS`): a lookup by name costs a hash per column of every event;
    // unchecked: the columns' types are those of the store's own statements, and a value that
    // does not decode is still an error (the check compares type infos per column and event).
    // The fixed-width columns are read from their binary form here (see `fixed`).
    let aggregate_type: String = row.try_get_unchecked(3).map_err(backend)?;
    let aggregate_id: String = row.try_get_unchecked(4).map_err(backend)?;
    let stream = StreamId::new(aggregate_type, AggregateId::new(aggregate_id));
    let position = i64::from_be_bytes(fixed(row, 0)?);
    // An `xid8`: eight bytes, as a `bigint`'s.
    let transaction = i64::from_be_bytes(fixed(row, 1)?);
    let event_id = EventId(uuid::Uuid::from_bytes(fixed(row, 2)?));
    let event_type: String = row.try_get_unchecked(6).map_err(backend)?;
    // Without a checkpoint no reader could move past the row: only then is it a backend error.
    let checkpoint = Checkpoint::new(
        u64::try_from(transaction).map_err(|_| {
            StoreError::backend(format!(
                "event {event_id} of {stream}: transaction id {} is past the largest a \
                 checkpoint holds",
                transaction.cast_unsigned()
            ))
        })?,
        u64::try_from(position).map_err(|_| {
            StoreError::backend(format!(
                "event {event_id} of {stream}: negative position {position}"
            ))
        })?,
    );
    let version = i64::from_be_bytes(fixed(row, 5)?);
    let corrupt = |message: String| {
        StoreError::Corrupt(Box::new(evently_core::store::CorruptEvent {
            stream: stream.clone(),
            version: u64::try_from(version).unwrap_or(0),
            event_id,
            event_type: event_type.clone(),
            checkpoint,
            message,
        }))
    };
    let version =
        u64::try_from(version).map_err(|_| corrupt(format!("negative version {version}")))?;
    let schema_version = i32::from_be_bytes(fixed(row, 7)?);
    let schema_version = u32::try_from(schema_version)
        .map_err(|_| corrupt(format!("negative schema version {schema_version}")))?;
    // Straight into the struct: no `serde_json::Value` in between.
    let metadata: sqlx::types::Json<Metadata> = row
        .try_get_unchecked(9)
        .map_err(|e| corrupt(format!("metadata: {}", decode_cause(&e))))?;
    let payload: P = row
        .try_get_unchecked(8)
        .map_err(|e| corrupt(format!("payload: {}", decode_cause(&e))))?;
    let micros = i64::from_be_bytes(fixed(row, 10)?);
    let recorded_at = recorded_at(micros).ok_or_else(|| {
        corrupt(format!(
            "recorded_at: {} is not a time this reader can hold",
            match micros {
                i64::MAX => "infinity".to_owned(),
                i64::MIN => "-infinity".to_owned(),
                _ => format!("{micros} microseconds after 2000-01-01"),
            }
        ))
    })?;
    Ok(StoredEvent {
        event_id,
        version,
        checkpoint,
        recorded_at,
        schema_version,
        payload,
        metadata: metadata.0,
        event_type,
        stream,
    })
}

/// The binary form of the fixed-width, non-null column `index` (`bigint`, `xid8`, `integer`,
/// `uuid`, `timestamptz`): read here rather than through sqlx's decoders, which for these
/// columns cost more than the rest of the row (a generic variable-width integer read; calendar
/// arithmetic for a time) and panic on a `timestamptz` past chrono's range, which PostgreSQL
/// stores (`'infinity'`, or the year 294000).
fn fixed<const N: usize>(row: &PgRow, index: usize) -> Result<[u8; N], StoreError> {
    use sqlx::ValueRef;
    let value = row.try_get_raw(index).map_err(backend)?;
    if value.is_null() {
        return Err(StoreError::backend(format!(
            "column {index} of an event is NULL"
        )));
    }
    if value.format() != sqlx::postgres::PgValueFormat::Binary {
        return Err(StoreError::backend(format!(
            "column {index} of an event came as text, not in its binary form"
        )));
    }
    let bytes = value
        .as_bytes()
        .map_err(|e| StoreError::backend(e.to_string()))?;
    bytes.try_into().map_err(|_| {
        StoreError::backend(format!(
            "column {index} of an event holds {} bytes where {N} were expected",
            bytes.len()
        ))
    })
}

/// A `timestamptz` (microseconds since 2000-01-01 UTC) as a time, if chrono can hold it
/// (`'infinity'`, `'-infinity'` and years past 262,143 it cannot).
fn recorded_at(micros: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    /// 2000-01-01 in microseconds since 1970-01-01.
    const POSTGRES_EPOCH: i64 = 946_684_800_000_000;
    chrono::DateTime::from_timestamp_micros(micros.checked_add(POSTGRES_EPOCH)?)
}

/// What a column decode error says, without sqlx's "error occurred while decoding column N" frame.
fn decode_cause(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::ColumnDecode { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// A row of the replay query: version, type, schema version and the payload as JSON text, read by
/// column index (this runs once per event of every rehydration).
pub(crate) fn replay_event(row: &PgRow) -> Result<ReplayEvent, StoreError> {
    let version: i64 = row.try_get(0).map_err(backend)?;
    let schema_version: i32 = row.try_get(2).map_err(backend)?;
    Ok(ReplayEvent {
        version: to_u64(version)?,
        event_type: row.try_get(1).map_err(backend)?,
        schema_version: u32::try_from(schema_version).map_err(|_| {
            StoreError::backend(format!("negative schema version {schema_version}"))
        })?,
        payload: Payload::Text(row.try_get(3).map_err(backend)?),
    })
}

#[cfg(test)]
mod tests {
    use super::recorded_at;
    use chrono::{TimeZone, Utc};

    #[test]
    fn times_are_read_from_postgres_epoch_microseconds() {
        assert_eq!(
            recorded_at(0),
            Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single()
        );
        // 2026-12-05 09:00:00.000001 UTC, as PostgreSQL sends it.
        let sent = 849_776_400_000_001;
        let time = recorded_at(sent).unwrap_or_else(|| panic!("in range"));
        assert_eq!(time.to_rfc3339(), "2026-12-05T09:00:00.000001+00:00");
        assert_eq!(
            recorded_at(-1).map(|t| t.timestamp_micros()),
            Some(946_684_799_999_999)
        );
        assert_eq!(recorded_at(i64::MAX), None, "infinity");
        assert_eq!(recorded_at(i64::MIN), None, "-infinity");
    }
}
