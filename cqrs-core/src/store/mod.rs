//! The event store: append-only streams with optimistic concurrency, idempotent appends and one
//! global order.

mod decode;
mod filter;
mod memory;

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

pub use filter::{Lag, Subscription};
pub use memory::InMemoryEventStore;

use crate::envelope::{Checkpoint, EventData, EventId, RawStoredEvent, StoredEvent, StreamId};
use crate::event::{DecodeError, DomainEvent};

/// What an append expects of the stream's current version.
///
/// Versions count events: a stream with `n` events is at version `n`; a missing stream is at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No expectation: append whatever the version.
    Any,
    /// The stream must not exist (version 0).
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream must be exactly at this version (`Exact(0)` is the same as `NoStream`).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` meets this expectation.
    #[must_use]
    pub const fn is_met_by(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::StreamExists => actual > 0,
            Self::Exact(expected) => actual == expected,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("an existing stream"),
            Self::Exact(version) => write!(f, "version {version}"),
        }
    }
}

/// Where one appended event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendedEvent {
    /// The event's id.
    pub event_id: EventId,
    /// Its version in the stream.
    pub version: u64,
    /// Its place in the global order.
    pub checkpoint: Checkpoint,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
}

/// The outcome of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream appended to.
    pub stream: StreamId,
    /// The stream's version after the append.
    pub version: u64,
    /// The appended events, in order.
    pub events: Vec<AppendedEvent>,
}

/// A stored payload: a JSON value, or JSON text as a database hands it over.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A parsed value.
    Value(serde_json::Value),
    /// JSON text.
    Text(String),
}

/// A stored event reduced to what rehydration needs, from [`EventStore::replay`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayEvent {
    /// Its version in the stream.
    pub version: u64,
    /// The stable type name.
    pub event_type: String,
    /// The schema version of the payload.
    pub schema_version: u32,
    /// The event's fields.
    pub payload: Payload,
}

impl ReplayEvent {
    /// Decodes into `E`; errors name `stream`, the version and the type.
    ///
    /// # Errors
    /// [`StoreError::Decode`].
    pub fn decode<E: DomainEvent>(&self, stream: &StreamId) -> Result<E, StoreError> {
        let decoded = match &self.payload {
            Payload::Value(value) => E::decode(&self.event_type, self.schema_version, value),
            Payload::Text(text) => E::decode_json(&self.event_type, self.schema_version, text),
        };
        decoded.map_err(|error| StoreError::Decode {
            stream: stream.clone(),
            version: self.version,
            event_type: self.event_type.clone(),
            error: Box::new(error),
        })
    }
}

/// What a command idempotency key recorded: the stream and the versions of the events that the first
/// command with this key appended (`first_version > last_version` when it appended none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    /// The key.
    pub key: String,
    /// The stream the command ran against.
    pub stream: StreamId,
    /// The version of its first event (the stream's version + 1 when it recorded none).
    pub first_version: u64,
    /// The version of its last event (the stream's version when it recorded none).
    pub last_version: u64,
}

/// A snapshot of an aggregate's state at a version.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The version the state reflects.
    pub version: u64,
    /// The schema version of `state` (`#[aggregate(snapshot(version = N))]`): a snapshot of another
    /// version is ignored, never misread.
    pub schema_version: u32,
    /// The state as JSON.
    pub state: serde_json::Value,
}

/// Stores the latest snapshot of each aggregate.
#[async_trait::async_trait]
pub trait SnapshotStore: Send + Sync {
    /// The latest snapshot of `stream`, if any.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError>;

    /// Saves `snapshot` unless a snapshot of a later version is stored already.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError>;
}

/// Why a store operation failed. Every variant names what was wrong; a caller can match on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: the stream is not at the expected version.
    #[error("version conflict on {stream}: expected {expected}, stream is at version {actual}")]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's version (0: no stream).
        actual: u64,
    },
    /// Idempotent replay: these event ids were appended before, with the same content, so nothing
    /// was appended now. Holds the original append's outcome; a retry after an unknown outcome can
    /// treat this as success.
    #[error("already appended: events {}..={} of {}", .0.events.first().map_or(0, |e| e.version), .0.version, .0.stream)]
    AlreadyAppended(Box<AppendResult>),
    /// An event id that is already stored was sent with different content (or twice in one batch).
    #[error("event id {event_id} is already used by another event (in {existing_stream})")]
    EventIdReused {
        /// The reused id.
        event_id: EventId,
        /// The stream that holds the stored event with this id.
        existing_stream: StreamId,
    },
    /// A stored event could not be decoded; nothing else is affected.
    #[error("cannot decode event {version} (`{event_type}`) of {stream}: {error}")]
    Decode {
        /// The stream.
        stream: StreamId,
        /// The event's version in it.
        version: u64,
        /// The stored type name.
        event_type: String,
        /// What went wrong.
        #[source]
        error: Box<DecodeError>,
    },
    /// The idempotency key was recorded before: nothing was appended now. Holds where the first
    /// command with this key recorded its events.
    #[error("idempotency key `{}` was used already (events {}..={} of {})", .0.key, .0.first_version, .0.last_version, .0.stream)]
    KeyUsed(Box<KeyRecord>),
    /// A stored row cannot be read as an event (a negative version, metadata that does not fit,
    /// a payload that is not JSON or nested too deep: written from outside the store, or by an
    /// older version of it). Named, never skipped: a global read returns the events before it and
    /// then this error for it, with its checkpoint, so a reader can park it (a projection worker
    /// does) and go on after it.
    #[error("{0}")]
    Corrupt(Box<CorruptEvent>),
    /// A projection run inside the append's transaction failed, so nothing was appended.
    #[error("inline projection `{projection}` failed: {source}")]
    InlineProjection {
        /// The projection.
        projection: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The arguments cannot be stored (for example an empty aggregate type).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The store's global order cannot be trusted on the server it is on now (it was restored or
    /// replicated from another one, or a reader holds a position from before such a move).
    /// Reads in the global order and appends are refused until the operator repairs it, so no
    /// reader skips an event; what to run is in the error.
    #[error("{0}")]
    Moved(Box<StoreMoved>),
    /// The backend failed: a broken connection, a database error that is not one of the above.
    #[error("event store backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What [`StoreError::Moved`] found, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{store}: {evidence}; {remedy}")]
pub struct StoreMoved {
    /// Which store (for PostgreSQL: the schema).
    pub store: String,
    /// What was found.
    pub evidence: MoveEvidence,
    /// What to run.
    pub remedy: String,
}

/// The evidence that a store's global order was moved under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveEvidence {
    /// The stored events carry transaction ids at or past the server's next one: they were
    /// stamped by another server. Readers would never read them, and events appended here would
    /// be ordered before them.
    TransactionIdsAhead {
        /// The highest transaction id stored.
        highest: u64,
        /// The server's next transaction id.
        next: u64,
    },
    /// The store was written on another server (a restore, a logical replica, an upgrade by
    /// dump or `pg_upgrade`): its transaction ids do not order against this server's.
    ServerChanged {
        /// The server identity the store recorded.
        recorded: String,
        /// This server's identity.
        current: String,
    },
    /// A reader's position is past every transaction the server has run: the store was restored
    /// or re-stamped under it, and the position means nothing here.
    CheckpointAhead {
        /// The reader's position.
        checkpoint: Checkpoint,
        /// The server's next transaction id.
        next: u64,
    },
}

impl fmt::Display for MoveEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TransactionIdsAhead { highest, next } => write!(
                f,
                "its events carry transaction ids up to {highest}, past this server's next \
                 ({next}): they were stamped by another server (a restore or a move), so readers \
                 would never read them and events appended here would be ordered before them"
            ),
            Self::ServerChanged { recorded, current } => write!(
                f,
                "its events were written on another PostgreSQL server (system identifier \
                 {recorded}; this one is {current}): restored, replicated or upgraded here, \
                 their transaction ids may not order against this server's"
            ),
            Self::CheckpointAhead { checkpoint, next } => write!(
                f,
                "a reader's position {checkpoint} is past every transaction this server has run \
                 (next {next}): the store was restored or re-stamped under it"
            ),
        }
    }
}

/// A stored row that cannot be read as an event: what [`StoreError::Corrupt`] names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "stored event {version} of {stream} (`{event_type}`, id {event_id}, at {checkpoint}) is corrupt: {message}"
)]
pub struct CorruptEvent {
    /// The stream.
    pub stream: StreamId,
    /// The event's version (0 when the stored one is negative: `message` says so).
    pub version: u64,
    /// The row's event id.
    pub event_id: EventId,
    /// The row's type name.
    pub event_type: String,
    /// Where the row is in the global order: a reader goes on after it.
    pub checkpoint: Checkpoint,
    /// What is wrong.
    pub message: String,
}

impl StoreError {
    /// A backend error from anything that is an error.
    pub fn backend(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(error.into())
    }

    /// Whether this is a version conflict.
    #[must_use]
    pub const fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

/// An append-only store of event streams with one global order.
///
/// Every implementation passes the same conformance suite (`evently_core::conformance`, feature
/// `conformance`): the expected-version matrix, idempotent appends, concurrent writers and the global
/// order.
#[async_trait::async_trait]
pub trait EventStore: Send + Sync {
    /// Appends `events` to `stream` if its version meets `expected`: all of them or none.
    ///
    /// Idempotent by event id: when every id was appended before to this stream with the same
    /// content, nothing is appended and [`StoreError::AlreadyAppended`] carries the first outcome.
    ///
    /// # Errors
    /// [`StoreError::Conflict`], [`StoreError::AlreadyAppended`], [`StoreError::EventIdReused`],
    /// [`StoreError::InvalidInput`] or [`StoreError::Backend`].
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError>;

    /// The events of `stream` with a version greater than `after_version`, in order, streamed.
    fn load<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<StoredEvent, StoreError>>;

    /// The events of `stream` after `after_version`, with only what rehydrating an aggregate needs
    /// (version, type, schema version, payload). Stores override it to read less and hand over the
    /// payload as JSON text, which the derive decodes without an intermediate value; the default
    /// maps [`EventStore::load`].
    fn replay<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<ReplayEvent, StoreError>> {
        self.load(stream, after_version)
            .map_ok(|e| ReplayEvent {
                version: e.version,
                event_type: e.event_type,
                schema_version: e.schema_version,
                payload: Payload::Value(e.payload),
            })
            .boxed()
    }

    /// The current version of `stream` (0: no stream).
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError>;

    /// Appends like [`EventStore::append`] and records the command idempotency `key` in the same
    /// transaction; with no events, records the key only (after checking `expected`).
    ///
    /// # Errors
    /// [`StoreError::KeyUsed`] with the first record when the key was recorded before (also when
    /// a concurrent caller recorded it first), and the errors of [`EventStore::append`].
    async fn append_with_key(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError>;

    /// What `key` recorded, if it was used.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn find_key(&self, key: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// The events matching `filter` among the next `scan` events after `after` in the global order,
    /// and the checkpoint of the last event scanned (matching or not; `after` when none was). A
    /// reader moves its checkpoint to that one, so events it does not subscribe to are neither
    /// transferred nor scanned twice. Same ordering guarantees as [`EventStore::read_all`].
    ///
    /// The default reads and filters in memory; stores override it to filter in the query.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn read_filtered(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[Subscription],
    ) -> Result<(Vec<StoredEvent>, Checkpoint), StoreError> {
        let page = self.read_all(after, scan).await?;
        let scanned_to = page.last().map_or(after, |e| e.checkpoint);
        let matching = page
            .into_iter()
            .filter(|e| filter.iter().any(|s| s.matches(e)))
            .collect();
        Ok((matching, scanned_to))
    }

    /// Up to `limit` events after `after` in the global order.
    ///
    /// Never skips: an event that is not returned now because its transaction has not committed is
    /// returned by a later call with the same checkpoint.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn read_all(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// [`EventStore::read_all`] with each payload kept as the stored JSON text: what a reader that
    /// decodes payloads itself reads (the projection engine decodes straight into the event enum,
    /// a publisher forwards the text), since building a [`serde_json::Value`] is most of a read's
    /// cost. The default reads parsed events and writes each payload back to text; stores that
    /// hold the text override it.
    ///
    /// # Errors
    /// As [`EventStore::read_all`].
    async fn read_all_raw(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<RawStoredEvent>, StoreError> {
        self.read_all(after, limit)
            .await?
            .into_iter()
            .map(StoredEvent::into_raw)
            .collect()
    }

    /// [`EventStore::read_filtered`] with each payload kept as the stored JSON text (see
    /// [`EventStore::read_all_raw`]).
    ///
    /// # Errors
    /// As [`EventStore::read_filtered`].
    async fn read_filtered_raw(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[Subscription],
    ) -> Result<(Vec<RawStoredEvent>, Checkpoint), StoreError> {
        let (events, scanned_to) = self.read_filtered(after, scan, filter).await?;
        let events = events
            .into_iter()
            .map(StoredEvent::into_raw)
            .collect::<Result<_, _>>()?;
        Ok((events, scanned_to))
    }

    /// The checkpoint of the last event in the global order among those committed now (`None` for
    /// an empty store). A reader whose checkpoint has reached it has seen every event committed
    /// before the call, even where the store holds the newest events back for a moment (the
    /// PostgreSQL store does while an older transaction is open).
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn head(&self) -> Result<Option<Checkpoint>, StoreError>;

    /// How far a reader at `after` is behind: the committed events after it and the age of the
    /// oldest (`None` when the store cannot count them; the default). Projection workers sample
    /// it for their lag metrics.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn lag(&self, after: Checkpoint) -> Result<Option<Lag>, StoreError> {
        let _ = after;
        Ok(None)
    }

    /// A signal that changes whenever events commit, for readers to wait on instead of polling
    /// (mark it seen before reading, then wait for `changed()`); `None` when the store has no such
    /// signal in this process, and readers poll.
    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Helpers on every [`EventStore`].
pub trait EventStoreExt: EventStore {
    /// Loads the whole stream into memory.
    fn load_all<'a>(
        &'a self,
        stream: &'a StreamId,
    ) -> futures::future::BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(self.load(stream, 0).try_collect())
    }
}

impl<S: EventStore + ?Sized> EventStoreExt for S {}

#[async_trait::async_trait]
impl<S: EventStore + ?Sized> EventStore for Arc<S> {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        (**self).append(stream, expected, events).await
    }

    fn load<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<StoredEvent, StoreError>> {
        (**self).load(stream, after_version)
    }

    fn replay<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<ReplayEvent, StoreError>> {
        (**self).replay(stream, after_version)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        (**self).stream_version(stream).await
    }

    async fn append_with_key(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError> {
        (**self)
            .append_with_key(stream, expected, events, key)
            .await
    }

    async fn find_key(&self, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        (**self).find_key(key).await
    }

    async fn read_all(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        (**self).read_all(after, limit).await
    }

    async fn read_filtered(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[Subscription],
    ) -> Result<(Vec<StoredEvent>, Checkpoint), StoreError> {
        (**self).read_filtered(after, scan, filter).await
    }

    async fn read_all_raw(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<RawStoredEvent>, StoreError> {
        (**self).read_all_raw(after, limit).await
    }

    async fn read_filtered_raw(
        &self,
        after: Checkpoint,
        scan: usize,
        filter: &[Subscription],
    ) -> Result<(Vec<RawStoredEvent>, Checkpoint), StoreError> {
        (**self).read_filtered_raw(after, scan, filter).await
    }

    async fn head(&self) -> Result<Option<Checkpoint>, StoreError> {
        (**self).head().await
    }

    async fn lag(&self, after: Checkpoint) -> Result<Option<Lag>, StoreError> {
        (**self).lag(after).await
    }

    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        (**self).commit_signal()
    }
}

#[async_trait::async_trait]
impl<S: SnapshotStore + ?Sized> SnapshotStore for Arc<S> {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        (**self).load_snapshot(stream).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        (**self).save_snapshot(snapshot).await
    }
}

/// Whether a stored event is the same event as one being appended again: same stream, type, schema
/// version, payload and metadata.
#[must_use]
pub fn same_event(stored: &StoredEvent, stream: &StreamId, new: &EventData) -> bool {
    stored.stream == *stream
        && stored.event_type == new.event_type
        && stored.schema_version == new.schema_version
        && stored.payload == new.payload
        && stored.metadata == new.metadata
}

/// Classifies a batch whose ids are (partly) stored already, given a lookup of the stored events by
/// id: [`StoreError::AlreadyAppended`] when the batch is exactly a run of stored events of this
/// stream with the same content, [`StoreError::EventIdReused`] otherwise, `None` when no id is
/// stored. Every store decides idempotency with this one function.
pub fn classify_stored_ids<'a>(
    stream: &StreamId,
    events: &[EventData],
    stored: impl Fn(&EventId) -> Option<&'a StoredEvent>,
) -> Option<StoreError> {
    let first = events.iter().find_map(|e| stored(&e.event_id))?;
    let mut appended = Vec::with_capacity(events.len());
    for (i, new) in events.iter().enumerate() {
        let reused = |existing: &StoredEvent| StoreError::EventIdReused {
            event_id: new.event_id,
            existing_stream: existing.stream.clone(),
        };
        let Some(found) = stored(&new.event_id) else {
            return Some(reused(first));
        };
        if !same_event(found, stream, new) || found.version != first.version + i as u64 {
            return Some(reused(found));
        }
        appended.push(AppendedEvent {
            event_id: found.event_id,
            version: found.version,
            checkpoint: found.checkpoint,
            recorded_at: found.recorded_at,
        });
    }
    let version = appended.last().map_or(0, |e| e.version);
    Some(StoreError::AlreadyAppended(Box::new(AppendResult {
        stream: stream.clone(),
        version,
        events: appended,
    })))
}

/// How deeply arrays and objects may nest in a payload. `serde_json` reads at most 127 levels
/// back (its recursion limit); this leaves room for the envelopes a payload travels in (a broker
/// message wraps it in an object or two). Appends refuse deeper payloads with
/// [`StoreError::InvalidInput`], so whatever an append accepts, every reader can read; a deeper
/// one written from outside the store is a [`StoreError::Corrupt`] row that readers park and pass.
pub const MAX_JSON_DEPTH: usize = 100;

/// How deeply arrays and objects nest in `value` (a scalar: 0), without recursion.
#[must_use]
pub fn json_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    fn containers(value: &Value) -> Option<Box<dyn Iterator<Item = &Value> + '_>> {
        match value {
            Value::Array(items) => Some(Box::new(items.iter())),
            Value::Object(fields) => Some(Box::new(fields.values())),
            _ => None,
        }
    }
    // The common payload, an object of scalars, without allocating.
    let Some(children) = containers(value) else {
        return 0;
    };
    let mut deepest = 1;
    let mut stack: Vec<(&Value, usize)> = Vec::new();
    for child in children {
        if matches!(child, Value::Array(_) | Value::Object(_)) {
            stack.push((child, 2));
        }
    }
    while let Some((value, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        if let Some(children) = containers(value) {
            stack.extend(
                children
                    .filter(|c| matches!(c, Value::Array(_) | Value::Object(_)))
                    .map(|c| (c, depth + 1)),
            );
        }
    }
    deepest
}

/// Rejects what no store can hold (empty names, an id twice in one batch, a payload nested deeper
/// than [`MAX_JSON_DEPTH`]), so every store fails alike before it writes anything.
///
/// # Errors
/// [`StoreError::InvalidInput`] or [`StoreError::EventIdReused`].
pub fn validate_append(stream: &StreamId, events: &[EventData]) -> Result<(), StoreError> {
    if stream.aggregate_type.is_empty() {
        return Err(StoreError::InvalidInput(
            "the aggregate type is empty".into(),
        ));
    }
    if stream.aggregate_id.as_str().is_empty() {
        return Err(StoreError::InvalidInput(format!(
            "the aggregate id of a `{}` stream is empty",
            stream.aggregate_type
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        if event.event_type.is_empty() {
            return Err(StoreError::InvalidInput(format!(
                "event {i} of the batch for {stream} has an empty type"
            )));
        }
        let depth = json_depth(&event.payload);
        if depth > MAX_JSON_DEPTH {
            return Err(StoreError::InvalidInput(format!(
                "the payload of event {i} (`{}`) of the batch for {stream} is nested {depth} levels deep; \
                 at most {MAX_JSON_DEPTH} can be read back, so it is refused",
                event.event_type
            )));
        }
        if !seen.insert(event.event_id) {
            return Err(StoreError::EventIdReused {
                event_id: event.event_id,
                existing_stream: stream.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod depth_tests {
    use super::json_depth;
    use serde_json::json;

    #[test]
    fn depth_counts_nested_containers() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!({"a": 1, "b": "x"})), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}]})), 4);
        assert_eq!(json_depth(&json!([[], [[[]]], {}])), 4);
        let mut deep = json!(null);
        for _ in 0..10_000 {
            deep = serde_json::Value::Array(vec![deep]);
        }
        assert_eq!(json_depth(&deep), 10_000);
        // Dropping a value that deep recurses in serde_json; leak it rather than overflow the
        // test thread's stack.
        std::mem::forget(deep);
    }
}
