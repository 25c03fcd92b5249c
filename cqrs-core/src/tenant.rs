//! Multi-tenancy: one store per tenant, handed out by a [`Tenancy`], and a command gateway per
//! tenant from [`TenantGateways`].
//!
//! A tenant's data is reached only through a store *scoped* to it: the in-memory store's
//! [`for_tenant`](crate::InMemoryEventStore::for_tenant) view, or on PostgreSQL the tenant's
//! schema (`evently_postgres::SchemaPerTenant`). A scoped store sees only its tenant's streams,
//! idempotency keys, snapshots and events, and stamps its tenant
//! ([`Metadata::tenant`](crate::Metadata::tenant)) on every event it appends, refusing an event
//! that names another tenant ([`stamp_tenant`](crate::store::stamp_tenant)). Everything built on a
//! scoped store (gateways, projection checkpoints and dead letters, saga instances, the outbox relay,
//! which adds the tenant to every broker message's headers) is therefore per tenant by
//! construction.
//!
//! Why a scoped handle and not a tenant field in every [`StreamId`](crate::StreamId): with a
//! field, every call site must pass the right tenant and one forgotten argument writes into
//! another tenant's stream (the class of bug multi-tenant stores have shipped). With a handle, the
//! tenant is decided once, where the request is authenticated, and code below cannot name another
//! tenant's data at all.
//!
//! ```
//! use evently_core::tenant::{Tenancy, TenantGateways};
//! use evently_core::{InMemoryEventStore, TenantId};
//! # use evently_core::prelude::*;
//! # #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, DomainEvent)]
//! # #[event(aggregate = Counter)]
//! # enum CounterEvent { Added { by: u64 } }
//! # #[derive(Debug, Clone, Command)]
//! # #[command(aggregate = Counter)]
//! # enum CounterCommand { #[command(create_or_update)] Add { by: u64 } }
//! # #[derive(Debug, Default, Aggregate)]
//! # #[aggregate(name = "counter", command = CounterCommand, event = CounterEvent, error = std::convert::Infallible)]
//! # struct Counter { total: u64 }
//! # impl Counter {
//! #     fn add(&self, by: u64) -> Result<Vec<CounterEvent>, std::convert::Infallible> { Ok(vec![CounterEvent::Added { by }]) }
//! #     fn apply_added(&mut self, by: &u64) { self.total += by; }
//! # }
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = InMemoryEventStore::new();
//! let gateways = TenantGateways::<Counter, _>::new(store.clone());
//! let acme = TenantId::new("acme")?;
//! let globex = TenantId::new("globex")?;
//! // One aggregate id, two tenants: two streams that never meet.
//! gateways.tenant(&acme).await?.execute("c-1", CounterCommand::Add { by: 2 }, CommandMetadata::new()).await?;
//! gateways.tenant(&globex).await?.execute("c-1", CounterCommand::Add { by: 5 }, CommandMetadata::new()).await?;
//! let (acme_counter, _) = gateways.tenant(&acme).await?.load("c-1").await?;
//! assert_eq!(acme_counter.total, 2);
//! let stored = store.tenant_store(&globex).await?.read_all(evently_core::Checkpoint::START, 10).await?;
//! assert_eq!(stored[0].metadata.tenant.as_ref(), Some(&globex));
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::aggregate::Aggregate;
use crate::envelope::TenantId;
use crate::gateway::CommandGateway;
use crate::store::{EventStore, InMemoryEventStore, SnapshotStore, StoreError};

/// Hands out the store of each tenant.
#[async_trait::async_trait]
pub trait Tenancy: Send + Sync {
    /// A store scoped to one tenant.
    type Store: EventStore + SnapshotStore + Clone + 'static;

    /// The store of `tenant`: it sees only that tenant's data and stamps the tenant on every event
    /// it appends.
    ///
    /// # Errors
    /// [`StoreError::UnknownTenant`] when the tenancy knows no such tenant (a PostgreSQL
    /// schema-per-tenant layout has not registered it), [`StoreError::Backend`].
    async fn tenant_store(&self, tenant: &TenantId) -> Result<Self::Store, StoreError>;
}

#[async_trait::async_trait]
impl Tenancy for InMemoryEventStore {
    type Store = Self;

    async fn tenant_store(&self, tenant: &TenantId) -> Result<Self, StoreError> {
        Ok(self.for_tenant(tenant.clone()))
    }
}

/// Which tenants' events a projection reads, as it declares with `#[projection(tenants = "...")]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TenantScope {
    /// One tenant's events per worker (the default): the read model holds one tenant's data,
    /// in the tenant's schema or under the tenant's row-level policies. Running it on a view of
    /// every tenant is refused (it would mix tenants in a read model that does not tell them
    /// apart).
    #[default]
    Each,
    /// Every tenant's events (`tenants = "all"`): the read model tells tenants apart itself (by
    /// [`Metadata::tenant`](crate::Metadata::tenant)). On PostgreSQL it runs on the all-tenants
    /// view of a one-schema layout, or once per tenant store of a schema-per-tenant layout;
    /// running it on one tenant's row-level view is refused (it would see one tenant only).
    All,
}

/// The gateways made so far, by tenant.
type Gateways<A, S> = HashMap<TenantId, Arc<CommandGateway<A, S>>>;

type Configure<A, S> = dyn Fn(CommandGateway<A, S>, &S) -> CommandGateway<A, S> + Send + Sync;

/// A [`CommandGateway`] per tenant, made on first use over the tenant's store and kept.
///
/// Each tenant's gateway has its own cache of aggregates (a cache shared between tenants would
/// mix two tenants' aggregates of one id), so the tenant is chosen per call:
/// `gateways.tenant(&tenant).await?.execute(..)`. The gateways are kept for the life of this
/// value, each with its cache: with many tenants, bound the memory with
/// [`with_configure`](Self::with_configure) and `gateway.with_cache_capacity(n)`.
pub struct TenantGateways<A: Aggregate, T: Tenancy> {
    tenancy: T,
    configure: Arc<Configure<A, T::Store>>,
    gateways: Mutex<Gateways<A, T::Store>>,
}

impl<A: Aggregate, T: Tenancy> std::fmt::Debug for TenantGateways<A, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenants = self
            .gateways
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("TenantGateways")
            .field("aggregate", &A::NAME)
            .field("tenants", &tenants)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, T: Tenancy> TenantGateways<A, T> {
    /// Gateways with the default settings over the tenants of `tenancy`.
    pub fn new(tenancy: T) -> Self {
        Self::with_configure(tenancy, |gateway, _| gateway)
    }

    /// Gateways each made by `configure` from the default gateway and the tenant's store (for a
    /// cache size, retries, or `with_snapshots(store.clone())`).
    pub fn with_configure(
        tenancy: T,
        configure: impl Fn(CommandGateway<A, T::Store>, &T::Store) -> CommandGateway<A, T::Store>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            tenancy,
            configure: Arc::new(configure),
            gateways: Mutex::new(HashMap::new()),
        }
    }

    /// The gateway of `tenant`.
    ///
    /// # Errors
    /// What [`Tenancy::tenant_store`] returns.
    pub async fn tenant(
        &self,
        tenant: &TenantId,
    ) -> Result<Arc<CommandGateway<A, T::Store>>, StoreError> {
        if let Some(gateway) = self.lock().get(tenant) {
            return Ok(Arc::clone(gateway));
        }
        let store = self.tenancy.tenant_store(tenant).await?;
        let gateway = Arc::new((self.configure)(CommandGateway::new(store.clone()), &store));
        // Two first calls may race: the first one kept wins, so each tenant has one cache.
        Ok(Arc::clone(
            self.lock().entry(tenant.clone()).or_insert(gateway),
        ))
    }

    /// The tenancy the gateways are made from.
    pub fn tenancy(&self) -> &T {
        &self.tenancy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gateways<A, T::Store>> {
        self.gateways.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
