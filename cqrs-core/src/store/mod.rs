//! The event store: append-only streams with optimistic concurrency, idempotent appends and one
//! global order.

mod decode;
mod error;
mod filter;
mod memory;
mod validate;

pub use error::{CorruptEvent, MoveEvidence, StoreError, StoreMoved};
pub use filter::{Lag, Subscription};
pub use memory::InMemoryEventStore;
pub use validate::{
    MAX_JSON_DEPTH, classify_stored_ids, json_depth, same_event, stamp_tenant, validate_append,
};

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use crate::envelope::{Checkpoint, EventData, EventId, RawStoredEvent, StoredEvent, StreamId};
use crate::event::DomainEvent;

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
/// Whose data a store handle reads and writes (see `evently_core::tenant`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreScope {
    /// Data of no tenant: a store used without tenants.
    #[default]
    Untenanted,
    /// One tenant's view of a log that holds every tenant's (the in-memory store's
    /// `for_tenant`, the PostgreSQL row-level layout's `for_tenant`).
    TenantView(crate::envelope::TenantId),
    /// A store holding one tenant's data alone (a PostgreSQL schema per tenant).
    TenantStore(crate::envelope::TenantId),
    /// A read-only view of every tenant's events.
    AllTenants,
}

impl StoreScope {
    /// The tenant whose data the handle holds, if one.
    #[must_use]
    pub fn tenant(&self) -> Option<&crate::envelope::TenantId> {
        match self {
            Self::TenantView(tenant) | Self::TenantStore(tenant) => Some(tenant),
            Self::Untenanted | Self::AllTenants => None,
        }
    }

    /// The tenant appends, stream reads, keys and snapshots go to (`None`: no tenant's).
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for the all-tenants view, which only reads the global order.
    pub fn writable(&self) -> Result<Option<&crate::envelope::TenantId>, StoreError> {
        if *self == Self::AllTenants {
            return Err(StoreError::InvalidInput(
                "the all-tenants view of the store only reads the global order: append, load \
                 streams, keys and snapshots through `for_tenant`"
                    .into(),
            ));
        }
        Ok(self.tenant())
    }
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

impl crate::personal::Openable for Payload {
    fn prepare(&mut self) {
        if let Self::Text(text) = self
            && crate::personal::may_hold_envelopes(text)
            && let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
        {
            *self = Self::Value(value);
        }
    }

    fn sealed_subjects(&self) -> Vec<String> {
        match self {
            Self::Value(value) => crate::personal::subjects(value),
            Self::Text(text) if crate::personal::may_hold_envelopes(text) => {
                serde_json::from_str::<serde_json::Value>(text)
                    .map(|v| crate::personal::subjects(&v))
                    .unwrap_or_default()
            }
            Self::Text(_) => Vec::new(),
        }
    }

    fn open_with(
        &mut self,
        keys: &std::collections::HashMap<String, crate::personal::DataKey>,
    ) -> crate::personal::Opened {
        match self {
            Self::Value(value) => crate::personal::open(value, keys),
            Self::Text(text) => {
                if !crate::personal::may_hold_envelopes(text) {
                    return crate::personal::Opened::default();
                }
                let Ok(mut value) = serde_json::from_str::<serde_json::Value>(text) else {
                    return crate::personal::Opened::default();
                };
                let outcome = crate::personal::open(&mut value, keys);
                // Parsed already: decoded from the value, not written out and parsed again.
                *self = Self::Value(value);
                outcome
            }
        }
    }
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

    /// Whose data this handle reads and writes; projection runners check it against what a
    /// projection declares ([`Projection::TENANTS`](crate::projection::Projection::TENANTS)).
    fn scope(&self) -> StoreScope {
        StoreScope::Untenanted
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
