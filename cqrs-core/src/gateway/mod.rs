//! The command gateway: load an aggregate, decide a command, append the events, retry on conflict.

mod outcome;

pub use outcome::{CommandError, Executed};

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::StreamExt;
use lru::LruCache;
use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::command::{Command, CommandMetadata, StreamExpectation};
use crate::envelope::{AggregateId, EventData, Metadata, RecordedEvent, StreamId};
use crate::store::{
    AppendResult, EventStore, ExpectedVersion, KeyRecord, Snapshot, SnapshotStore, StoreError,
};

/// How many aggregates the gateway keeps in memory by default.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;
/// How many times the gateway retries a command after a version conflict by default.
pub const DEFAULT_MAX_RETRIES: usize = 5;
/// How many locks serialize commands per aggregate inside one gateway.
const LOCK_STRIPES: usize = 256;
struct Cached<A> {
    version: u64,
    state: A,
}
/// A state to decide against.
struct Loaded<A> {
    state: A,
    version: u64,
    /// Read from the store just now, not only from the cache.
    verified: bool,
}
/// Reads and writes snapshots of `A`; built only when `A` is serializable.
struct Snapshotter<A> {
    store: Arc<dyn SnapshotStore>,
    encode: fn(&A) -> serde_json::Result<serde_json::Value>,
    decode: fn(serde_json::Value) -> serde_json::Result<A>,
}
/// Executes commands against aggregates of type `A` stored in `S`.
///
/// `execute` loads the aggregate (from an in-process LRU cache of recent states, or from the latest
/// snapshot, plus the events recorded since, so a hot aggregate is not replayed from its start),
/// decides the command, appends the events with [`ExpectedVersion::Exact`] and, on a version
/// conflict, reloads and decides again up to a bounded number of times. Commands to one aggregate
/// are serialized inside the gateway, so they do not collide with each other; conflicts then only
/// come from other processes. Every event gets the command's correlation id and the command id as
/// its causation id.
pub struct CommandGateway<A: Aggregate, S> {
    store: S,
    cache: Option<Mutex<LruCache<AggregateId, Cached<A>>>>,
    max_retries: usize,
    snapshots: Option<Snapshotter<A>>,
    stripes: Box<[futures::lock::Mutex<()>]>,
    hasher: RandomState,
    metrics: crate::telemetry::CommandMetrics,
}
impl<A: Aggregate, S> std::fmt::Debug for CommandGateway<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandGateway")
            .field("aggregate", &A::NAME)
            .field("cached", &self.cache.as_ref().map(|c| lock(c).len()))
            .field("max_retries", &self.max_retries)
            .field("snapshots", &self.snapshots.is_some())
            .finish_non_exhaustive()
    }
}
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The cache holds only complete entries: a panic elsewhere cannot leave one half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<A: Aggregate, S: EventStore> CommandGateway<A, S> {
    /// A gateway over `store` with the default cache size and retry limit, without snapshots.
    pub fn new(store: S) -> Self {
        Self {
            store,
            cache: NonZeroUsize::new(DEFAULT_CACHE_CAPACITY).map(|n| Mutex::new(LruCache::new(n))),
            max_retries: DEFAULT_MAX_RETRIES,
            snapshots: None,
            stripes: (0..LOCK_STRIPES)
                .map(|_| futures::lock::Mutex::new(()))
                .collect(),
            hasher: RandomState::new(),
            metrics: crate::telemetry::CommandMetrics::default(),
        }
    }

    /// Keeps at most `capacity` aggregates in memory; 0 turns the cache off (every command loads
    /// from the store).
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

    /// Loads aggregates from their latest snapshot in `snapshots` plus the events after it, and
    /// saves a snapshot whenever a command crosses the aggregate's `snapshot(every = N)` point.
    ///
    /// A stored snapshot of another schema version than `#[aggregate(snapshot(version = V))]`, or
    /// one that does not deserialize, is ignored (the aggregate is replayed from its events). A
    /// failure to save a snapshot is logged, never a command failure.
    #[must_use]
    pub fn with_snapshots(mut self, snapshots: impl SnapshotStore + 'static) -> Self
    where
        A: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.snapshots = Some(Snapshotter {
            store: Arc::new(snapshots),
            encode: |state| serde_json::to_value(state),
            decode: serde_json::from_value::<A>,
        });
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Rebuilds the current state of an aggregate from its latest snapshot (when configured) and
    /// the events after it, bypassing the cache.
    ///
    /// # Errors
    /// A store failure, or a stored event that does not decode.
    pub async fn load(&self, id: impl Into<AggregateId>) -> Result<(A, u64), StoreError> {
        let stream = StreamId::new(A::NAME, id);
        let (state, version) = self.start_state(&stream).await;
        replay(&self.store, &stream, state, version).await
    }

    /// The latest usable snapshot, or the initial state.
    async fn start_state(&self, stream: &StreamId) -> (A, u64) {
        let Some(snapshots) = &self.snapshots else {
            return (A::initial(), 0);
        };
        match snapshots.store.load_snapshot(stream).await {
            Ok(Some(snapshot)) if snapshot.schema_version == A::SNAPSHOT.schema_version => {
                match (snapshots.decode)(snapshot.state) {
                    Ok(state) => return (state, snapshot.version),
                    Err(error) => tracing::warn!(
                        %stream, version = snapshot.version, %error,
                        "snapshot does not deserialize; replaying from the first event"
                    ),
                }
            }
            Ok(Some(snapshot)) => tracing::debug!(
                %stream, found = snapshot.schema_version, expected = A::SNAPSHOT.schema_version,
                "ignoring a snapshot of another schema version"
            ),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%stream, %error, "cannot read snapshot; replaying from the first event")
            }
        }
        (A::initial(), 0)
    }

    async fn maybe_snapshot(&self, stream: &StreamId, before: u64, after: u64, state: &A) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        if !A::SNAPSHOT.is_due(before, after) {
            return;
        }
        let saved = match (snapshots.encode)(state) {
            Ok(json) => {
                let snapshot = Snapshot {
                    stream: stream.clone(),
                    version: after,
                    schema_version: A::SNAPSHOT.schema_version,
                    state: json,
                };
                snapshots
                    .store
                    .save_snapshot(snapshot)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = saved {
            tracing::warn!(%stream, version = after, %error, "cannot save snapshot");
        }
    }

    /// The state to decide against: a cached state as it is (`verified: false`: another process
    /// may have appended since; the append's expected version will tell), or, with `refresh` or
    /// on a cache miss, the cached state or latest snapshot brought up to date from the store.
    async fn load_state(
        &self,
        id: &AggregateId,
        stream: &StreamId,
        refresh: bool,
    ) -> Result<Loaded<A>, StoreError> {
        let cached = self.cache.as_ref().and_then(|cache| lock(cache).pop(id));
        let (state, version) = match cached {
            Some(c) if !refresh => {
                return Ok(Loaded {
                    state: c.state,
                    version: c.version,
                    verified: false,
                });
            }
            Some(c) => (c.state, c.version),
            None => self.start_state(stream).await,
        };
        let (state, version) = replay(&self.store, stream, state, version).await?;
        Ok(Loaded {
            state,
            version,
            verified: true,
        })
    }

    fn put_back(&self, id: AggregateId, version: u64, state: A) {
        if let Some(cache) = &self.cache {
            let mut cache = lock(cache);
            // Another gateway instance may share nothing with us, but a concurrent command through
            // this one cannot run (commands per aggregate are serialized): keep the newest anyway.
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
        self.run(id.into(), command, metadata, None).await
    }

    /// Executes `command` at most once in effect per idempotency `key`: the key is recorded in the
    /// transaction that appends the events, and a repeated key returns the events the first command
    /// recorded without deciding again, also when two callers race with the same key (the store
    /// lets one record it; the other gets the first outcome).
    ///
    /// A rejected command records no key: a retry decides again against the current state.
    ///
    /// # Errors
    /// As [`CommandGateway::execute`], and [`CommandError::KeyReused`] when the key was used for
    /// another aggregate.
    pub async fn execute_idempotent(
        &self,
        key: &str,
        id: impl Into<AggregateId>,
        command: A::Command,
        metadata: CommandMetadata,
    ) -> Result<Executed<A::Event>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let id = id.into();
        if let Some(record) = self.store.find_key(key).await? {
            return self
                .first_outcome(record, &StreamId::new(A::NAME, id))
                .await;
        }
        self.run(id, command, metadata, Some(key)).await
    }

    /// Rebuilds what the first command with a key recorded.
    async fn first_outcome(
        &self,
        record: KeyRecord,
        stream: &StreamId,
    ) -> Result<Executed<A::Event>, CommandError<A::Error>> {
        if record.stream != *stream {
            return Err(CommandError::KeyReused {
                key: record.key,
                used_for: record.stream,
                stream: stream.clone(),
            });
        }
        self.recorded(record).await
    }

    /// The outcome a keyed command recorded, rebuilt from the store: its stream, the version
    /// after it and its events (`record.first_version..=record.last_version`). For idempotency
    /// records kept outside the store (a Redis backend) that answer a retry as
    /// [`execute_idempotent`](Self::execute_idempotent) does.
    ///
    /// # Errors
    /// A store failure, or an event that does not decode.
    pub async fn recorded(
        &self,
        record: KeyRecord,
    ) -> Result<Executed<A::Event>, CommandError<A::Error>> {
        let mut events = Vec::new();
        {
            let mut tail = self
                .store
                .load(&record.stream, record.first_version.saturating_sub(1));
            while let Some(stored) = tail.next().await {
                let stored = stored?;
                if stored.version > record.last_version {
                    break;
                }
                events.push(stored.into_recorded()?);
            }
        }
        Ok(Executed {
            stream: record.stream,
            version: record.last_version,
            events,
        })
    }

    async fn run(
        &self,
        id: AggregateId,
        command: A::Command,
        metadata: CommandMetadata,
        key: Option<&str>,
    ) -> Result<Executed<A::Event>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let given = metadata.trace;
        let trace = given.or_else(crate::trace::current);
        let correlation = metadata.effective_correlation_id();
        let span = tracing::info_span!(
            "cqrs.execute",
            aggregate = A::NAME,
            id = %id,
            command = command.command_name(),
            command_id = %metadata.command_id,
            correlation_id = %correlation.0,
            causation_id = %metadata.command_id,
            trace_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let name = command.command_name();
        let started = std::time::Instant::now();
        let work = async {
            // One command per aggregate at a time inside this gateway: they would only collide.
            let stripe = self.hasher.hash_one(&id) as usize % self.stripes.len();
            let _serialized = self.stripes[stripe].lock().await;
            self.decide_and_append(id, command, metadata, key).await
        }
        .instrument(span.clone());
        if let Some(trace) = &trace {
            if given.is_some() {
                // A trace from elsewhere (a request's header): the command's span continues it.
                crate::trace::follow(&span, trace);
            } else {
                // The caller's own (its span is already the parent).
                crate::trace::record(&span, trace);
            }
        }
        let outcome = crate::trace::scope_if_needed(trace, work).await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(CommandError::Rejected(_)) => "rejected",
            Err(CommandError::NotFound { .. }) => "not_found",
            Err(CommandError::AlreadyExists { .. }) => "already_exists",
            Err(CommandError::TooManyConflicts { .. }) => "conflict",
            Err(_) => "error",
        };
        span.record("outcome", label);
        self.metrics.record(A::NAME, name, label, started.elapsed());
        outcome
    }

    async fn decide_and_append(
        &self,
        id: AggregateId,
        command: A::Command,
        metadata: CommandMetadata,
        key: Option<&str>,
    ) -> Result<Executed<A::Event>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let stream = StreamId::new(A::NAME, id.clone());
        let mut event_metadata = metadata.event_metadata();
        if let Some(trace) = crate::trace::current() {
            // Inside the command's span: with OpenTelemetry, its readers become its children.
            event_metadata
                .headers
                .insert(crate::trace::TRACEPARENT.to_owned(), trace.to_string());
        }
        let expectation = command.expectation();
        let mut conflicts = 0;
        let mut refresh = false;
        loop {
            let Loaded {
                mut state,
                version,
                verified,
            } = self.load_state(&id, &stream, refresh).await?;
            // An outcome that does not reach the store (a rejection, a missing aggregate, no events)
            // must not rest on a cached state that another process may have moved past: check the
            // store once and decide again. An append needs no check: its expected version is one.
            match expectation {
                StreamExpectation::MustExist if version == 0 => {
                    if !verified {
                        self.put_back(id.clone(), version, state);
                        refresh = true;
                        continue;
                    }
                    return Err(CommandError::NotFound { stream });
                }
                StreamExpectation::MustNotExist if version > 0 => {
                    // Versions only grow: a stream that existed still exists.
                    self.put_back(id, version, state);
                    return Err(CommandError::AlreadyExists { stream, version });
                }
                _ => {}
            }
            let events = match state.handle(command.clone()) {
                Ok(events) => events,
                Err(rejection) => {
                    self.put_back(id.clone(), version, state);
                    if !verified {
                        refresh = true;
                        continue;
                    }
                    return Err(CommandError::Rejected(rejection));
                }
            };
            if events.is_empty() && key.is_none() {
                self.put_back(id.clone(), version, state);
                if !verified {
                    refresh = true;
                    continue;
                }
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
            let appended = match key {
                Some(key) => {
                    self.store
                        .append_with_key(&stream, expected, data, key)
                        .await
                }
                None => self.store.append(&stream, expected, data).await,
            };
            match appended {
                Ok(result) => {
                    for event in &events {
                        state.apply(event);
                    }
                    self.maybe_snapshot(&stream, version, result.version, &state)
                        .await;
                    self.put_back(id, result.version, state);
                    return Ok(recorded(stream, result, events, &event_metadata));
                }
                Err(StoreError::Conflict { actual, .. }) => {
                    conflicts += 1;
                    crate::telemetry::conflict(A::NAME);
                    tracing::debug!(conflicts, expected = version, actual, "version conflict");
                    if conflicts > self.max_retries {
                        return Err(CommandError::TooManyConflicts {
                            stream,
                            attempts: conflicts,
                            actual,
                        });
                    }
                    // The state at `version` is still right; the next attempt loads only the tail.
                    self.put_back(id.clone(), version, state);
                    refresh = true;
                }
                Err(StoreError::KeyUsed(record)) => {
                    self.put_back(id, version, state);
                    return self.first_outcome(*record, &stream).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// The typed envelopes of the events a command appended.
fn recorded<E>(
    stream: StreamId,
    result: AppendResult,
    events: Vec<E>,
    metadata: &Metadata,
) -> Executed<E> {
    let version = result.version;
    let events = result
        .events
        .into_iter()
        .zip(events)
        .map(|(at, event)| RecordedEvent {
            event_id: at.event_id,
            stream: stream.clone(),
            version: at.version,
            checkpoint: at.checkpoint,
            recorded_at: at.recorded_at,
            metadata: metadata.clone(),
            event,
        })
        .collect();
    Executed {
        stream,
        version,
        events,
    }
}
/// Applies the events of `stream` after `version` to `state`.
async fn replay<A: Aggregate, S: EventStore>(
    store: &S,
    stream: &StreamId,
    mut state: A,
    mut version: u64,
) -> Result<(A, u64), StoreError> {
    let mut tail = store.replay(stream, version);
    while let Some(stored) = tail.next().await {
        let stored = stored?;
        state.apply(&stored.decode::<A::Event>(stream)?);
        version = stored.version;
    }
    Ok((state, version))
}
