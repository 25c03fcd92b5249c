//! What a command gives back: the events it recorded with their places in the order, or why it
//! did not run.

use crate::envelope::{RecordedEvent, StreamId};
use crate::event::EncodeError;
use crate::store::StoreError;

/// What a successful command did.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed<E> {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The stream's version after the command (unchanged when it recorded no event).
    pub version: u64,
    /// The events it recorded, in order, with their envelopes.
    pub events: Vec<RecordedEvent<E>>,
}

impl<E> Executed<E> {
    /// The place of the command's last event in the global order: what to hand to
    /// [`wait_until_caught_up`](crate::projection::wait_until_caught_up) to read a projection
    /// that reflects the command (read-your-writes). `None` when the command recorded no event.
    #[must_use]
    pub fn checkpoint(&self) -> Option<crate::envelope::Checkpoint> {
        self.events.last().map(|e| e.checkpoint)
    }
}

/// Why a command did not record its events.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E> {
    /// The aggregate rejected the command; its error, unchanged.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// The command needs an existing aggregate and there is none.
    #[error("{stream} does not exist")]
    NotFound {
        /// The missing aggregate's stream.
        stream: StreamId,
    },
    /// The command creates an aggregate that exists already.
    #[error("{stream} exists already (version {version})")]
    AlreadyExists {
        /// The stream.
        stream: StreamId,
        /// Its version.
        version: u64,
    },
    /// Other writers kept changing the aggregate: every retry met a newer version.
    #[error(
        "{stream} kept changing: gave up after {attempts} attempts (last seen version {actual})"
    )]
    TooManyConflicts {
        /// The stream.
        stream: StreamId,
        /// How many times the command was decided.
        attempts: usize,
        /// The version the last attempt met.
        actual: u64,
    },
    /// The idempotency key was used before by a command on another aggregate.
    #[error("idempotency key `{key}` was used for {used_for}, not for {stream}")]
    KeyReused {
        /// The key.
        key: String,
        /// The aggregate it was used for.
        used_for: StreamId,
        /// The aggregate of this command.
        stream: StreamId,
    },
    /// An event the aggregate decided could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The store failed (including an undecodable stored event of this aggregate).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<E> CommandError<E> {
    /// The aggregate's error, if the command was rejected by it.
    pub fn into_rejection(self) -> Option<E> {
        match self {
            Self::Rejected(error) => Some(error),
            _ => None,
        }
    }
}
