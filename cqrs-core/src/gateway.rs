//! The command gateway: load an aggregate, decide a command, append the events, retry on conflict.

use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard, PoisonError};

use futures::StreamExt;
use lru::LruCache;
use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::command::{Command, CommandMetadata, StreamExpectation};
use crate::envelope::{AggregateId, EventData, RecordedEvent, StreamId};
use crate::event::EncodeError;
use crate::store::{EventStore, ExpectedVersion, StoreError};

/// How many aggregates the gateway keeps in memory by default.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;
/// How many times the gateway retries a command after a version conflict by default.
pub const DEFAULT_MAX_RETRIES: usize = 5;

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

struct Cached<A> {
    version: u64,
    state: A,
}

/// Executes commands against aggregates of type `A` stored in `S`.
///
/// `execute` loads the aggregate (from an in-process LRU cache of recent states plus the events
/// recorded since, so a hot aggregate is not replayed from its start), decides the command, appends
/// the events with [`ExpectedVersion::Exact`] and, on a version conflict, reloads and decides again up
/// to a bounded number of times. Every event gets the command's correlation id and the command id as
/// its causation id.
pub struct CommandGateway<A: Aggregate, S> {
    store: S,
    cache: Option<Mutex<LruCache<AggregateId, Cached<A>>>>,
    max_retries: usize,
}

impl<A: Aggregate, S> std::fmt::Debug for CommandGateway<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandGateway")
            .field("aggregate", &A::NAME)
            .field("cached", &self.cache.as_ref().map(|c| lock(c).len()))
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The cache holds only complete entries: a panic elsewhere cannot leave one half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<A: Aggregate, S: EventStore> CommandGateway<A, S> {
    /// A gateway over `store` with the default cache size and retry limit.
    pub fn new(store: S) -> Self {
        Self {
            store,
            cache: NonZeroUsize::new(DEFAULT_CACHE_CAPACITY).map(|n| Mutex::new(LruCache::new(n))),
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }

    /// Keeps at most `capacity` aggregates in memory; 0 turns the cache off (every command replays).
    #[must_use]
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = NonZeroUsize::new(capacity).map(|n| Mutex::new(LruCache::new(n)));
        self
    }

    /// Retries a command at most `retries` times after version conflicts.
    #[must_use]
    pub fn with_max_retries(mut self, retries: usize) -> Self {
        self.max_retries = retries;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Rebuilds the current state of an aggregate from all its events, bypassing the cache.
    ///
    /// # Errors
    /// A store failure, or a stored event that does not decode.
    pub async fn load(&self, id: impl Into<AggregateId>) -> Result<(A, u64), StoreError> {
        replay(&self.store, &StreamId::new(A::NAME, id), A::initial(), 0).await
    }

    async fn load_state(
        &self,
        id: &AggregateId,
        stream: &StreamId,
    ) -> Result<(A, u64), StoreError> {
        let cached = self.cache.as_ref().and_then(|cache| lock(cache).pop(id));
        let (state, version) = cached.map_or_else(|| (A::initial(), 0), |c| (c.state, c.version));
        replay(&self.store, stream, state, version).await
    }

    fn put_back(&self, id: AggregateId, version: u64, state: A) {
        if let Some(cache) = &self.cache {
            let mut cache = lock(cache);
            // A concurrent command may have cached a newer state meanwhile: keep the newest.
            if cache.peek(&id).is_none_or(|c| c.version < version) {
                cache.put(id, Cached { version, state });
            }
        }
    }

    /// Executes `command` against the aggregate `id`.
    ///
    /// # Errors
    /// [`CommandError::Rejected`] with the aggregate's error, [`CommandError::NotFound`] or
    /// [`CommandError::AlreadyExists`] when the command's expectation of the stream is not met,
    /// [`CommandError::TooManyConflicts`] when every retry met a concurrent change, and store or
    /// encoding failures.
    pub async fn execute(
        &self,
        id: impl Into<AggregateId>,
        command: A::Command,
        metadata: CommandMetadata,
    ) -> Result<Executed<A::Event>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let id = id.into();
        let span = tracing::debug_span!(
            "cqrs.execute",
            aggregate = A::NAME,
            id = %id,
            command = command.command_name(),
            command_id = %metadata.command_id,
        );
        self.execute_inner(id, command, metadata)
            .instrument(span)
            .await
    }

    async fn execute_inner(
        &self,
        id: AggregateId,
        command: A::Command,
        metadata: CommandMetadata,
    ) -> Result<Executed<A::Event>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let stream = StreamId::new(A::NAME, id.clone());
        let event_metadata = metadata.event_metadata();
        let expectation = command.expectation();
        let mut actual = 0;
        for attempt in 1..=self.max_retries + 1 {
            let (mut state, version) = self.load_state(&id, &stream).await?;
            match expectation {
                StreamExpectation::MustExist if version == 0 => {
                    return Err(CommandError::NotFound { stream });
                }
                StreamExpectation::MustNotExist if version > 0 => {
                    self.put_back(id, version, state);
                    return Err(CommandError::AlreadyExists { stream, version });
                }
                _ => {}
            }
            let events = match state.handle(command.clone()) {
                Ok(events) => events,
                Err(rejection) => {
                    self.put_back(id, version, state);
                    return Err(CommandError::Rejected(rejection));
                }
            };
            if events.is_empty() {
                self.put_back(id, version, state);
                return Ok(Executed {
                    stream,
                    version,
                    events: Vec::new(),
                });
            }
            let data = events
                .iter()
                .map(|event| EventData::from_event(event, event_metadata.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            let expected = if version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            };
            match self.store.append(&stream, expected, data).await {
                Ok(result) => {
                    for event in &events {
                        state.apply(event);
                    }
                    self.put_back(id, result.version, state);
                    let recorded = result
                        .events
                        .into_iter()
                        .zip(events)
                        .map(|(at, event)| RecordedEvent {
                            event_id: at.event_id,
                            stream: stream.clone(),
                            version: at.version,
                            checkpoint: at.checkpoint,
                            recorded_at: at.recorded_at,
                            metadata: event_metadata.clone(),
                            event,
                        })
                        .collect();
                    return Ok(Executed {
                        stream,
                        version: result.version,
                        events: recorded,
                    });
                }
                Err(StoreError::Conflict { actual: seen, .. }) => {
                    tracing::debug!(
                        attempt,
                        expected = version,
                        actual = seen,
                        "version conflict, retrying"
                    );
                    actual = seen;
                    // The state at `version` is still right; the next attempt loads only the tail.
                    self.put_back(id.clone(), version, state);
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(CommandError::TooManyConflicts {
            stream,
            attempts: self.max_retries + 1,
            actual,
        })
    }
}

/// Applies the events of `stream` after `version` to `state`.
async fn replay<A: Aggregate, S: EventStore>(
    store: &S,
    stream: &StreamId,
    mut state: A,
    mut version: u64,
) -> Result<(A, u64), StoreError> {
    let mut tail = store.load(stream, version);
    while let Some(stored) = tail.next().await {
        let stored = stored?;
        state.apply(&stored.decode::<A::Event>()?);
        version = stored.version;
    }
    Ok((state, version))
}
