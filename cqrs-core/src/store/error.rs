//! What a store says went wrong: conflicts, replays, corrupt rows, a store moved to another server.

use crate::envelope::{Checkpoint, EventId, StreamId};
use crate::event::DecodeError;
use std::fmt;

use super::*;

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
    /// An event id of the append is already used by an event this store cannot see: another
    /// tenant's, in a layout where tenants share one table (PostgreSQL under row-level security,
    /// where event ids are unique across tenants, as the brokers' deduplication needs). Nothing
    /// was appended; give the events new ids.
    #[error("event ids already used by events this store cannot see (another tenant's; ids are unique across tenants), nothing appended: one of {}", ids(.event_ids))]
    EventIdTaken {
        /// The ids of the refused append (which of them is taken is not shown to this store).
        event_ids: Vec<EventId>,
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
    /// The tenancy knows no such tenant (on PostgreSQL's schema-per-tenant layout: not registered
    /// with `cqrs tenants add` or `SchemaPerTenant::register`).
    #[error("unknown tenant `{0}`: register it first (`cqrs tenants add {0}`)")]
    UnknownTenant(crate::envelope::TenantId),
    /// The backend failed: a broken connection, a database error that is not one of the above.
    #[error("event store backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}
/// The ids of [`StoreError::EventIdTaken`], as its message shows them.
fn ids(event_ids: &[EventId]) -> String {
    event_ids
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
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

impl From<crate::personal::PersonalError> for StoreError {
    /// A missing subject is the caller's input; the key store's failures are the backend's.
    fn from(error: crate::personal::PersonalError) -> Self {
        match error {
            crate::personal::PersonalError::NoSubject { .. } => {
                Self::InvalidInput(error.to_string())
            }
            other => Self::backend(other),
        }
    }
}
