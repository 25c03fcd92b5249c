//! Large appends through binary `COPY`.
//!
//! One round trip first, in the append's transaction: whether the stream is at the base version,
//! the transaction's id and time, and a global position for every event from the table's own
//! sequence. Then every column of every row is encoded straight from the events into PostgreSQL's
//! binary `COPY` format (payload and metadata serialized by serde_json into the buffer, no
//! intermediate strings, nothing to escape) and sent in one `COPY`. Knowing the positions and the
//! transaction id beforehand, the append reads nothing back: the outcome is built from what was
//! sent. The unique constraints still decide races, as for `INSERT`: a concurrent writer at the
//! same versions or a repeated event id makes the `COPY` fail and the transaction roll back.
//!
//! The values written are those the column defaults would give: `pg_current_xact_id()` of this
//! transaction and positions from the identity's sequence, in version order (`COPY` writes given
//! identity values as `INSERT .. OVERRIDING SYSTEM VALUE` does). `recorded_at` keeps its default,
//! `now()`, the same for every statement of a transaction.

use evently_core::store::AppendResult;
use evently_core::{EventData, StoreError, StreamId};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use crate::errors::backend;
use crate::insert::{Columns, Insert, appended, refused};
use crate::rows::{to_i64, xid};
use crate::sql::Sql;
use crate::tx::Transaction;

/// From this many events, an append streams them with `COPY` instead of one `INSERT`.
pub(crate) const COPY_THRESHOLD: usize = 1_000;

/// The signature and header of the binary `COPY` format: no flags, no header extension.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The fields of each row, in the order of `Sql::copy`'s column list.
const FIELDS: i16 = 10;
/// The end of the data.
const TRAILER: [u8; 2] = (-1_i16).to_be_bytes();

/// Appends a large batch with binary `COPY` in a transaction, if the stream is at `base`.
pub(crate) async fn copy_at(
    pool: &PgPool,
    sql: &Sql,
    stream: &StreamId,
    base: u64,
    events: &[EventData],
) -> Result<AppendResult, Insert> {
    let failed = refused;
    let base_i64 = to_i64(base).map_err(Insert::Failed)?;
    let count = i32::try_from(events.len()).map_err(|_| {
        Insert::Failed(StoreError::InvalidInput(format!(
            "{} events in one append: at most {} fit one COPY",
            events.len(),
            i32::MAX
        )))
    })?;
    // Encoded before the transaction opens (the positions and the transaction id are patched in
    // once known): a payload that cannot be written fails the append without a round trip, and
    // the transaction is held only while the data goes out.
    let mut rows = Rows::new(events.len());
    for (event, version) in events.iter().zip(base + 1..) {
        rows.push(stream, event, version).map_err(Insert::Failed)?;
    }
    let mut tx = Transaction::begin(pool).await.map_err(failed)?;
    let prepared = sqlx::query(AssertSqlSafe(sql.copy_prepare.clone()))
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .bind(base_i64)
        .bind(count)
        .bind(&sql.events_table)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed);
    let prepared = match prepared.and_then(|row| Prepared::of(&row)) {
        Ok(Some(prepared)) if prepared.positions.len() == events.len() => prepared,
        // Not at base: another writer got there first (or the stream moved on).
        Ok(_) => {
            tx.rollback().await;
            return Err(Insert::Lost);
        }
        Err(error) => {
            tx.rollback().await;
            return Err(error);
        }
    };
    rows.patch(&prepared.positions, prepared.transaction);
    let data = rows.finish();
    let mut copy = tx.copy_in_raw(&sql.copy).await.map_err(failed)?;
    // A failure while sending leaves the protocol state to chance: returning drops the
    // transaction, which closes the connection. `finish` reports the server's verdict cleanly.
    copy.send(data).await.map_err(failed)?;
    let outcome = match copy.finish().await {
        Ok(copied) if copied == events.len() as u64 => Ok(()),
        Ok(copied) => Err(Insert::Failed(StoreError::backend(format!(
            "COPY wrote {copied} rows of {}",
            events.len()
        )))),
        Err(error) => Err(failed(error)),
    };
    tx.end(outcome, failed).await?;
    appended(
        stream,
        base,
        events.iter().map(|e| e.event_id),
        &prepared.positions,
        prepared.transaction,
        prepared.recorded_at,
    )
    .map_err(Insert::Failed)
}

/// What the round trip before the `COPY` returned.
struct Prepared {
    transaction: u64,
    recorded_at: chrono::DateTime<chrono::Utc>,
    positions: Vec<i64>,
}

impl Prepared {
    /// `None` when the stream is not at the base version.
    fn of(row: &sqlx::postgres::PgRow) -> Result<Option<Self>, Insert> {
        let failed = |e: sqlx::Error| Insert::Failed(backend(e));
        if !row.try_get::<bool, _>("at_base").map_err(failed)? {
            return Ok(None);
        }
        let transaction: &str = row.try_get("transaction_text").map_err(failed)?;
        let transaction = xid(transaction).map_err(Insert::Failed)?;
        Ok(Some(Self {
            transaction,
            recorded_at: row.try_get("recorded_at").map_err(failed)?,
            positions: row.try_get("positions").map_err(failed)?,
        }))
    }
}

/// The binary `COPY` data of a batch, encoded field by field into one buffer.
struct Rows {
    data: Vec<u8>,
    /// Where each row starts in `data`.
    starts: Vec<usize>,
}

impl Rows {
    fn new(events: usize) -> Self {
        let mut data = Vec::with_capacity(HEADER.len() + events * 320 + TRAILER.len());
        data.extend_from_slice(HEADER);
        Self {
            data,
            starts: Vec::with_capacity(events),
        }
    }

    /// One row: the columns of `Sql::copy`, in its order, the position and the transaction id
    /// left zero for [`patch`](Self::patch).
    fn push(
        &mut self,
        stream: &StreamId,
        event: &EventData,
        version: u64,
    ) -> Result<(), StoreError> {
        let schema_version = Columns::schema_version(event)?;
        self.starts.push(self.data.len());
        self.data.extend_from_slice(&FIELDS.to_be_bytes());
        self.fixed(&0_i64.to_be_bytes());
        self.fixed(&0_u64.to_be_bytes());
        self.fixed(event.event_id.0.as_bytes());
        self.text(stream.aggregate_type.as_bytes())?;
        self.text(stream.aggregate_id.as_str().as_bytes())?;
        self.fixed(&to_i64(version)?.to_be_bytes());
        self.text(event.event_type.as_bytes())?;
        self.fixed(&schema_version.to_be_bytes());
        self.json(&event.payload)
            .map_err(|e| Columns::unwritable(event, "payload", e))?;
        self.json(&event.metadata)
            .map_err(|e| Columns::unwritable(event, "metadata", e))?;
        Ok(())
    }

    /// Writes each row's global position and the transaction id into the rows pushed.
    fn patch(&mut self, positions: &[i64], transaction: u64) {
        for (&start, position) in self.starts.iter().zip(positions) {
            // The field count (2 bytes), the position's length (4) and value (8), the
            // transaction id's length (4) and value (8).
            self.data[start + 6..start + 14].copy_from_slice(&position.to_be_bytes());
            self.data[start + 18..start + 26].copy_from_slice(&transaction.to_be_bytes());
        }
    }

    /// A fixed-size field: its length, then its bytes.
    fn fixed(&mut self, bytes: &[u8]) {
        // Fixed sizes are 4 to 16 bytes: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let len = bytes.len() as i32;
        self.data.extend_from_slice(&len.to_be_bytes());
        self.data.extend_from_slice(bytes);
    }

    /// A text field (a `json` field's binary form is its text too).
    fn text(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let len = i32::try_from(bytes.len()).map_err(|_| {
            StoreError::InvalidInput(format!(
                "a field of {} bytes: PostgreSQL takes at most 1 GB",
                bytes.len()
            ))
        })?;
        self.data.extend_from_slice(&len.to_be_bytes());
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    /// A `json` field serialized in place: a length slot, the text, the length written back.
    fn json(&mut self, value: &impl serde::Serialize) -> Result<(), serde_json::Error> {
        let slot = self.data.len();
        self.data.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut self.data, value)?;
        let len = self.data.len() - slot - 4;
        let len = i32::try_from(len).map_err(|_| {
            <serde_json::Error as serde::ser::Error>::custom(format!(
                "{len} bytes of JSON: PostgreSQL takes at most 1 GB in a field"
            ))
        })?;
        self.data[slot..slot + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.data.extend_from_slice(&TRAILER);
        self.data
    }
}
