//! The in-memory event store: the embedded default, with the PostgreSQL store's semantics.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;
use futures::stream::{self, BoxStream, StreamExt};

use super::{
    AppendResult, AppendedEvent, EventStore, ExpectedVersion, KeyRecord, Snapshot, SnapshotStore,
    StoreError, StoreScope, classify_stored_ids, validate_append,
};
use crate::envelope::{Checkpoint, EventData, EventId, StoredEvent, StreamId, TenantId};

/// An event store in process memory, safe to share between tasks (clone it: clones share the data).
///
/// It has the exact semantics of the PostgreSQL store (same conformance suite): all-or-nothing
/// appends checked against the expected version, idempotency by event id, and one global order by
/// `(commit, position)`. Nothing survives the process.
///
/// [`for_tenant`](Self::for_tenant) gives a view of one tenant's streams (the tenant's own
/// streams, keys, snapshots and events, with the tenant stamped on every event appended) and
/// [`all_tenants`](Self::all_tenants) a read-only view of every tenant's events in the one global
/// order; the store itself is the space of data that belongs to no tenant.
#[derive(Clone, Default)]
pub struct InMemoryEventStore {
    inner: Arc<Mutex<Inner>>,
    /// Whose data this handle sees (`TenantView` or `AllTenants` for the views).
    scope: StoreScope,
    /// Bumped after every commit: the wake-up of in-process readers.
    commits: Arc<tokio::sync::watch::Sender<u64>>,
    /// The appends' metric handles.
    appends: Arc<crate::telemetry::AppendMetrics>,
    /// Crypto-shredding: what is sealed, and the keys.
    personal: Arc<Personal>,
}

/// The store's personal-data settings (see [`crate::personal`]).
#[derive(Clone)]
struct Personal {
    sealing: crate::personal::Sealing,
    keys: Arc<dyn crate::personal::KeyStore>,
}

impl Default for Personal {
    fn default() -> Self {
        Self {
            sealing: crate::personal::Sealing::default(),
            keys: Arc::new(crate::personal::InMemoryKeyStore::new()),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// The data of each tenant (`None`: of no tenant).
    spaces: HashMap<Option<TenantId>, Space>,
    /// Every event of every space in the global order; sorted by checkpoint because commits are
    /// serialized.
    log: Vec<Arc<StoredEvent>>,
    commits: u64,
}

/// One tenant's data (or the data of no tenant).
#[derive(Default)]
struct Space {
    streams: HashMap<StreamId, Vec<Arc<StoredEvent>>>,
    /// This space's events in the global order.
    log: Vec<Arc<StoredEvent>>,
    by_id: HashMap<EventId, Arc<StoredEvent>>,
    keys: HashMap<String, KeyRecord>,
    snapshots: HashMap<StreamId, Snapshot>,
}

impl std::fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("InMemoryEventStore")
            .field("scope", &self.scope)
            .field("tenants", &inner.spaces.keys().flatten().count())
            .field("events", &inner.log.len())
            .finish()
    }
}

impl InMemoryEventStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A view of `tenant`'s data in this store: its own streams (a stream id of another tenant is
    /// another stream), idempotency keys, snapshots and events (its [`read_all`](EventStore::read_all)
    /// reads only them, in the global order). Every event it appends carries `tenant` in its
    /// metadata; one that names another tenant is refused. Clones share the data.
    #[must_use]
    pub fn for_tenant(&self, tenant: TenantId) -> Self {
        Self {
            scope: StoreScope::TenantView(tenant),
            ..self.clone()
        }
    }

    /// A read-only view of every tenant's events (and those of no tenant) in the one global order,
    /// for a projection or a relay that runs across all tenants: each event names its tenant in
    /// its metadata. Appends, stream reads, keys and snapshots through it are refused with
    /// [`StoreError::InvalidInput`]: they belong to one tenant's view.
    #[must_use]
    pub fn all_tenants(&self) -> Self {
        Self {
            scope: StoreScope::AllTenants,
            ..self.clone()
        }
    }

    /// The tenant this view is scoped to, if any.
    #[must_use]
    pub fn tenant(&self) -> Option<&TenantId> {
        self.scope.tenant()
    }

    /// The space this handle writes to and reads streams from; an error for the all-tenants view.
    fn space_key(&self) -> Result<Option<TenantId>, StoreError> {
        self.scope.writable().map(|tenant| tenant.cloned())
    }

    /// Seals the fields `E` marks `#[pii(subject = ...)]` in the events of its types appended
    /// from now on, with keys kept in memory (or in [`with_key_store`](Self::with_key_store)'s);
    /// every read opens them, and [`forget`](Self::forget) makes them read as placeholders, as
    /// the PostgreSQL store does.
    #[must_use]
    pub fn with_personal_data<E: crate::DomainEvent>(mut self) -> Self {
        let mut personal = (*self.personal).clone();
        personal.sealing.add::<E>();
        self.personal = Arc::new(personal);
        self
    }

    /// Keeps the subjects' data keys in `keys`.
    #[must_use]
    pub fn with_key_store(mut self, keys: Arc<dyn crate::personal::KeyStore>) -> Self {
        let mut personal = (*self.personal).clone();
        personal.keys = keys;
        self.personal = Arc::new(personal);
        self
    }

    /// Forgets `subject`: its sealed fields read as placeholders from now on; `false` when it had
    /// no key.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the key store fails.
    ///
    /// A tenant's view forgets the subject of that tenant only (its keys are the tenant's own,
    /// [`TenantKeys`](crate::personal::TenantKeys)); the all-tenants view refuses.
    pub async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        let tenant = self.space_key()?;
        self.keys_of(tenant.as_ref())
            .forget(subject)
            .await
            .map_err(StoreError::from)
    }

    async fn seal(&self, events: &mut [EventData]) -> Result<(), StoreError> {
        if self.personal.sealing.is_empty() {
            return Ok(());
        }
        let tenant = self.space_key()?;
        self.personal
            .sealing
            .seal(events, &*self.keys_of(tenant.as_ref()))
            .await
            .map_err(StoreError::from)
    }

    /// The keys of `tenant`'s data ([`TenantKeys`](crate::personal::TenantKeys) over the
    /// store's key store).
    fn keys_of(&self, tenant: Option<&TenantId>) -> Arc<dyn crate::personal::KeyStore> {
        crate::personal::TenantKeys::of(&self.personal.keys, tenant)
    }

    /// Opens each event with the keys of the tenant it names.
    async fn open(&self, events: &mut [StoredEvent]) -> Result<(), StoreError> {
        crate::personal::open_all_by_tenant(
            events
                .iter_mut()
                .map(|e| (e.metadata.tenant.as_ref(), &mut e.payload)),
            |tenant| self.keys_of(tenant),
        )
        .await
        .map(drop)
        .map_err(StoreError::from)
    }

    /// How many events the store holds (of every tenant).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().log.len()
    }

    /// Whether the store holds no event.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes the readers waiting on [`EventStore::commit_signal`] when `result` committed events.
    fn signal<T>(&self, result: &Result<T, StoreError>, committed: impl Fn(&T) -> bool) {
        if result.as_ref().is_ok_and(committed) {
            self.commits.send_modify(|n| *n += 1);
        }
    }

    /// The events this handle reads in the global order: its space's, or all for the
    /// all-tenants view.
    fn log<'a>(&self, inner: &'a Inner) -> &'a [Arc<StoredEvent>] {
        if self.scope == StoreScope::AllTenants {
            return &inner.log;
        }
        inner
            .spaces
            .get(&self.scope.tenant().cloned())
            .map_or(&[][..], |space| &space.log)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written: every append validates
        // first and mutates after, so the data behind a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// The space of `tenant`, created when first written.
    fn space_mut(&mut self, tenant: &Option<TenantId>) -> &mut Space {
        self.spaces.entry(tenant.clone()).or_default()
    }

    /// Appends under the lock: idempotency first, then the expected version.
    fn append(
        &mut self,
        tenant: &Option<TenantId>,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let space = self.spaces.get(tenant);
        if let Some(error) = classify_stored_ids(stream, &events, |id| {
            space.and_then(|space| space.by_id.get(id)).map(|e| &**e)
        }) {
            return Err(error);
        }
        let actual = space.map_or(0, |space| space.version(stream));
        if !expected.is_met_by(actual) {
            return Err(StoreError::Conflict {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        if events.is_empty() {
            return Ok(AppendResult {
                stream: stream.clone(),
                version: actual,
                events: Vec::new(),
            });
        }
        self.commits += 1;
        let transaction = self.commits;
        let recorded_at = Utc::now();
        let mut position = self.log.len() as u64;
        let mut appended = Vec::with_capacity(events.len());
        let mut stored = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            position += 1;
            let record = Arc::new(StoredEvent {
                event_id: event.event_id,
                stream: stream.clone(),
                version: actual + 1 + i as u64,
                checkpoint: Checkpoint::new(transaction, position),
                recorded_at,
                event_type: event.event_type,
                schema_version: event.schema_version,
                payload: event.payload,
                metadata: event.metadata,
            });
            appended.push(AppendedEvent {
                event_id: record.event_id,
                version: record.version,
                checkpoint: record.checkpoint,
                recorded_at,
            });
            stored.push(record);
        }
        self.log.extend(stored.iter().cloned());
        let space = self.space_mut(tenant);
        for record in &stored {
            space.by_id.insert(record.event_id, Arc::clone(record));
            space.log.push(Arc::clone(record));
        }
        let version = actual + appended.len() as u64;
        match space.streams.entry(stream.clone()) {
            Entry::Occupied(mut entry) => entry.get_mut().extend(stored),
            Entry::Vacant(entry) => {
                entry.insert(stored);
            }
        }
        Ok(AppendResult {
            stream: stream.clone(),
            version,
            events: appended,
        })
    }
}

impl Space {
    fn version(&self, stream: &StreamId) -> u64 {
        self.streams
            .get(stream)
            .map_or(0, |events| events.len() as u64)
    }
}

#[async_trait::async_trait]
impl EventStore for InMemoryEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        let tenant = self.space_key()?;
        super::stamp_tenant(tenant.as_ref(), &mut events)?;
        self.seal(&mut events).await?;
        let count = events.len();
        crate::telemetry::observe_append("memory", &self.appends, stream, count, async {
            let result = self.lock().append(&tenant, stream, expected, events);
            self.signal(&result, |r| !r.events.is_empty());
            result
        })
        .await
    }

    async fn append_with_key(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<EventData>,
        key: &str,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        let tenant = self.space_key()?;
        super::stamp_tenant(tenant.as_ref(), &mut events)?;
        self.seal(&mut events).await?;
        let count = events.len();
        crate::telemetry::observe_append("memory", &self.appends, stream, count, async {
            let mut inner = self.lock();
            if let Some(record) = inner.spaces.get(&tenant).and_then(|s| s.keys.get(key)) {
                return Err(StoreError::KeyUsed(Box::new(record.clone())));
            }
            let result = inner.append(&tenant, stream, expected, events)?;
            let record = KeyRecord {
                key: key.to_owned(),
                stream: stream.clone(),
                first_version: result
                    .events
                    .first()
                    .map_or(result.version + 1, |e| e.version),
                last_version: result.version,
            };
            inner.space_mut(&tenant).keys.insert(key.to_owned(), record);
            drop(inner);
            let result = Ok(result);
            self.signal(&result, |r: &AppendResult| !r.events.is_empty());
            result
        })
        .await
    }

    async fn find_key(&self, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        let tenant = self.space_key()?;
        Ok(self
            .lock()
            .spaces
            .get(&tenant)
            .and_then(|space| space.keys.get(key))
            .cloned())
    }

    fn load<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> BoxStream<'a, Result<StoredEvent, StoreError>> {
        let tenant = match self.space_key() {
            Ok(tenant) => tenant,
            Err(error) => return stream::once(async { Err(error) }).boxed(),
        };
        let events: Vec<Arc<StoredEvent>> = {
            let inner = self.lock();
            let skip = usize::try_from(after_version).unwrap_or(usize::MAX);
            inner
                .spaces
                .get(&tenant)
                .and_then(|space| space.streams.get(stream))
                .map_or_else(Vec::new, |events| {
                    events.iter().skip(skip).cloned().collect()
                })
        };
        stream::once(async move {
            let mut events: Vec<StoredEvent> =
                events.iter().map(|e| StoredEvent::clone(e)).collect();
            let opened = self.open(&mut events).await;
            let items: Vec<Result<StoredEvent, StoreError>> = match opened {
                Ok(()) => events.into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            };
            stream::iter(items)
        })
        .flatten()
        .boxed()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        let tenant = self.space_key()?;
        Ok(self
            .lock()
            .spaces
            .get(&tenant)
            .map_or(0, |space| space.version(stream)))
    }

    async fn read_all(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events: Vec<StoredEvent> = {
            let inner = self.lock();
            let log = self.log(&inner);
            let start = log.partition_point(|e| e.checkpoint <= after);
            log[start..]
                .iter()
                .take(limit)
                .map(|e| StoredEvent::clone(e))
                .collect()
        };
        self.open(&mut events).await?;
        Ok(events)
    }

    async fn head(&self) -> Result<Option<Checkpoint>, StoreError> {
        let inner = self.lock();
        Ok(self.log(&inner).last().map(|e| e.checkpoint))
    }

    async fn lag(&self, after: Checkpoint) -> Result<Option<super::Lag>, StoreError> {
        let inner = self.lock();
        let log = self.log(&inner);
        let start = log.partition_point(|e| e.checkpoint <= after);
        let behind = &log[start..];
        let seconds = behind.first().map_or(0.0, |oldest| {
            (Utc::now() - oldest.recorded_at)
                .to_std()
                .map_or(0.0, |age| age.as_secs_f64())
        });
        Ok(Some(super::Lag {
            events: behind.len() as u64,
            seconds,
        }))
    }

    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.commits.subscribe())
    }

    fn scope(&self) -> StoreScope {
        self.scope.clone()
    }
}

#[async_trait::async_trait]
impl SnapshotStore for InMemoryEventStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let tenant = self.space_key()?;
        let found = self
            .lock()
            .spaces
            .get(&tenant)
            .and_then(|space| space.snapshots.get(stream))
            .cloned();
        let Some(mut snapshot) = found else {
            return Ok(None);
        };
        // Sealed for its subjects: absent once one is forgotten (as on PostgreSQL).
        let keys = self.keys_of(tenant.as_ref());
        match crate::personal::open_state(std::mem::take(&mut snapshot.state), &*keys)
            .await
            .map_err(StoreError::from)?
        {
            Some(state) => {
                snapshot.state = state;
                Ok(Some(snapshot))
            }
            None => Ok(None),
        }
    }

    async fn save_snapshot(&self, mut snapshot: Snapshot) -> Result<(), StoreError> {
        let tenant = self.space_key()?;
        if !self.personal.sealing.is_empty() {
            let mut subjects: Vec<String> = self
                .lock()
                .spaces
                .get(&tenant)
                .and_then(|space| space.streams.get(&snapshot.stream))
                .map(|events| {
                    events
                        .iter()
                        .take(usize::try_from(snapshot.version).unwrap_or(usize::MAX))
                        .flat_map(|e| crate::personal::subjects(&e.payload))
                        .collect()
                })
                .unwrap_or_default();
            subjects.sort_unstable();
            subjects.dedup();
            snapshot.state = crate::personal::seal_state(
                std::mem::take(&mut snapshot.state),
                &subjects,
                &*self.keys_of(tenant.as_ref()),
            )
            .await
            .map_err(StoreError::from)?;
        }
        let mut inner = self.lock();
        match inner
            .space_mut(&tenant)
            .snapshots
            .entry(snapshot.stream.clone())
        {
            Entry::Occupied(mut entry) => {
                if entry.get().version <= snapshot.version {
                    entry.insert(snapshot);
                }
            }
            Entry::Vacant(entry) => {
                entry.insert(snapshot);
            }
        }
        Ok(())
    }
}
