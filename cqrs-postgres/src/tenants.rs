//! Schema-per-tenant: each tenant's streams, keys, snapshots, checkpoints, dead letters, saga
//! instances and outbox position in a PostgreSQL schema of its own.
//!
//! A registry table (`evently_tenants`, in a control schema of your choice) maps each tenant to
//! its schema, chosen when the tenant is registered (by default `tenant_<id>`, or by your
//! resolver) and kept, so a later change of the resolver never loses a tenant's data.
//! [`SchemaPerTenant::register`] creates and migrates the schema; `cqrs tenants add <tenant>`
//! does the same from the command line, and `cqrs migrate --all-tenants` (or
//! [`SchemaPerTenant::migrate_all`]) brings every registered schema up to date after an upgrade.
//!
//! [`SchemaPerTenant`] is a [`Tenancy`]: [`TenantGateways`](evently_core::tenant::TenantGateways)
//! makes a command gateway per tenant over it, and every store it hands out stamps its tenant on
//! the events it appends (and refuses events that name another). A projection or a relay runs per
//! tenant, on the tenant's store: its checkpoint and dead letters live in the tenant's schema, and
//! the relay adds the tenant to every broker message's headers.
//!
//! ```no_run
//! use evently_core::tenant::Tenancy;
//! use evently_core::{EventStore, TenantId};
//! use evently_postgres::tenants::SchemaPerTenant;
//! # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let tenants = SchemaPerTenant::open(pool, "evently").await?;
//! let acme = TenantId::new("acme")?;
//! tenants.register(&acme).await?; // creates and migrates schema `tenant_acme`
//! let store = tenants.tenant_store(&acme).await?;
//! assert_eq!(store.schema(), "tenant_acme");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use evently_core::tenant::Tenancy;
use evently_core::{StoreError, TenantId};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use crate::errors::backend;
use crate::sql::quote_ident;
use crate::store::PostgresEventStore;

type Resolver = dyn Fn(&TenantId) -> String + Send + Sync;
type Configure = dyn Fn(PostgresEventStore) -> PostgresEventStore + Send + Sync;

/// The schema-per-tenant layout on one database: a registry of tenants and their schemas, and a
/// store per tenant (made on first use and kept; clones share them).
#[derive(Clone)]
pub struct SchemaPerTenant {
    pool: PgPool,
    registry: Arc<str>,
    resolver: Arc<Resolver>,
    configure: Arc<Configure>,
    stores: Arc<Mutex<HashMap<TenantId, PostgresEventStore>>>,
}

impl std::fmt::Debug for SchemaPerTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaPerTenant")
            .field("registry", &self.registry)
            .field("open_stores", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// The schema a tenant gets by default: `tenant_<id>`.
#[must_use]
pub fn default_schema(tenant: &TenantId) -> String {
    format!("tenant_{tenant}")
}

impl SchemaPerTenant {
    /// The layout whose registry is table `evently_tenants` in schema `control` (both created if
    /// missing; safe from several processes at once).
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for an invalid schema name, [`StoreError::Backend`].
    pub async fn open(pool: PgPool, control: &str) -> Result<Self, StoreError> {
        // Validates the name as the stores do.
        crate::sql::Sql::new(control)?;
        let registry: Arc<str> = format!("{}.evently_tenants", quote_ident(control)).into();
        let mut tx = pool.begin().await.map_err(backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&*registry)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        for statement in [
            format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(control)),
            format!(
                "CREATE TABLE IF NOT EXISTS {registry} (
                     tenant_id text PRIMARY KEY,
                     schema_name text NOT NULL UNIQUE,
                     registered_at timestamptz NOT NULL DEFAULT now())"
            ),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(Self {
            pool,
            registry,
            resolver: Arc::new(default_schema),
            configure: Arc::new(|store| store),
            stores: Arc::default(),
        })
    }

    /// Names the schema of each tenant registered from now on (default [`default_schema`]); a
    /// tenant registered before keeps the schema it was given.
    #[must_use]
    pub fn with_schema_names(
        mut self,
        resolver: impl Fn(&TenantId) -> String + Send + Sync + 'static,
    ) -> Self {
        self.resolver = Arc::new(resolver);
        self
    }

    /// Makes each tenant's store with `configure` (personal data, group commit, inline
    /// projections), applied to the plain store of the tenant's schema.
    #[must_use]
    pub fn with_store(
        mut self,
        configure: impl Fn(PostgresEventStore) -> PostgresEventStore + Send + Sync + 'static,
    ) -> Self {
        self.configure = Arc::new(configure);
        self
    }

    /// Registers `tenant` (its schema from the resolver, unless it was registered before),
    /// creates and migrates its schema, and returns its store. Registering again is harmless.
    ///
    /// The schema is migrated before the tenant's registry row is written, so a registered
    /// tenant always has a migrated schema: a registration cut at any point (a crash, a timeout)
    /// leaves either no tenant (and at most an empty migrated schema, which the next
    /// registration takes) or a tenant whose store works.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] when the resolver names an invalid schema or one another
    /// tenant has, [`StoreError::Backend`].
    pub async fn register(&self, tenant: &TenantId) -> Result<PostgresEventStore, StoreError> {
        let wanted = (self.resolver)(tenant);
        crate::sql::Sql::new(&wanted)?;
        let taken = || {
            StoreError::InvalidInput(format!(
                "schema `{wanted}` for tenant `{tenant}` belongs to another tenant already"
            ))
        };
        // The tenant's row if it has one, and the row of whoever has the wanted schema.
        let known: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT tenant_id, schema_name FROM {} WHERE tenant_id = $1 OR schema_name = $2",
            self.registry
        )))
        .bind(tenant.as_str())
        .bind(&wanted)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        if let Some((_, schema)) = known.iter().find(|(id, _)| id == tenant.as_str()) {
            // Registered before: brought up to date (a no-op when it is).
            return self.migrated(tenant, schema).await;
        }
        if !known.is_empty() {
            return Err(taken());
        }
        self.store_in(tenant, &wanted)?.migrate().await?;
        let inserted = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (tenant_id, schema_name) VALUES ($1, $2)
             ON CONFLICT (tenant_id) DO NOTHING",
            self.registry
        )))
        .bind(tenant.as_str())
        .bind(&wanted)
        .execute(&self.pool)
        .await;
        let refused = match inserted {
            Ok(_) => false,
            // The schema's unique index refused the row. `ON CONFLICT (tenant_id)` covers only
            // the tenant's own index: a registration of the same tenant committing at the same
            // time can be seen first on the schema's, so the registry decides which it was.
            Err(error) if crate::insert::is_unique_violation(&error) => true,
            Err(error) => return Err(backend(error)),
        };
        match self.schema_of(tenant).await? {
            Some(schema) if schema == wanted => {
                Ok(self.keep(tenant, self.store_in(tenant, &schema)?))
            }
            // Registered at the same time by a process that named another schema: that one is
            // the tenant's (migrated by whoever registered it; migrating again costs a query).
            Some(schema) => self.migrated(tenant, &schema).await,
            None if refused => Err(taken()),
            None => Err(StoreError::UnknownTenant(tenant.clone())),
        }
    }

    /// The store of `tenant` in `schema`, migrated, kept for later uses.
    async fn migrated(
        &self,
        tenant: &TenantId,
        schema: &str,
    ) -> Result<PostgresEventStore, StoreError> {
        let store = self.store_in(tenant, schema)?;
        store.migrate().await?;
        Ok(self.keep(tenant, store))
    }

    /// The registered tenants and their schemas, by tenant id.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] naming a registry row whose tenant id is not valid (written
    /// around this API), [`StoreError::Backend`].
    pub async fn tenants(&self) -> Result<Vec<(TenantId, String)>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT tenant_id, schema_name FROM {} ORDER BY tenant_id",
            self.registry
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0).map_err(backend)?;
                let schema: String = row.try_get(1).map_err(backend)?;
                let tenant = TenantId::new(id).map_err(|e| {
                    StoreError::InvalidInput(format!("tenant registry {}: {e}", self.registry))
                })?;
                Ok((tenant, schema))
            })
            .collect()
    }

    /// Migrates the schema of every registered tenant, one after the other; returns them in the
    /// order migrated.
    ///
    /// # Errors
    /// The first failure, naming its tenant ([`StoreError::InvalidInput`] for an invalid
    /// schema name, otherwise [`StoreError::Backend`]); the tenants before it are migrated.
    pub async fn migrate_all(&self) -> Result<Vec<(TenantId, String)>, StoreError> {
        let tenants = self.tenants().await?;
        for (tenant, schema) in &tenants {
            let store = self.store_in(tenant, schema)?;
            store.migrate().await.map_err(|error| {
                StoreError::Backend(
                    format!("migrating tenant `{tenant}` (schema `{schema}`): {error}").into(),
                )
            })?;
        }
        Ok(tenants)
    }

    /// The store of every registered tenant, by tenant id: to run a worker per tenant (a
    /// per-tenant projection, or one declared `tenants = "all"` feeding a shared read model), a
    /// relay per tenant, an orchestrator per tenant.
    ///
    /// # Errors
    /// As [`tenants`](Self::tenants).
    pub async fn stores(&self) -> Result<Vec<(TenantId, PostgresEventStore)>, StoreError> {
        self.tenants()
            .await?
            .into_iter()
            .map(|(tenant, schema)| {
                let store = self.store_in(&tenant, &schema)?;
                Ok((tenant.clone(), self.keep(&tenant, store)))
            })
            .collect()
    }

    /// The pool the stores share.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn schema_of(&self, tenant: &TenantId) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT schema_name FROM {} WHERE tenant_id = $1",
            self.registry
        )))
        .bind(tenant.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)
    }

    fn store_in(&self, tenant: &TenantId, schema: &str) -> Result<PostgresEventStore, StoreError> {
        let store = PostgresEventStore::new(self.pool.clone(), schema)?;
        Ok((self.configure)(store).with_tenant(tenant.clone()))
    }

    /// Keeps the first store made for `tenant` (two first uses may race) and returns it.
    fn keep(&self, tenant: &TenantId, store: PostgresEventStore) -> PostgresEventStore {
        self.lock().entry(tenant.clone()).or_insert(store).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, PostgresEventStore>> {
        self.stores.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Tenancy for SchemaPerTenant {
    type Store = PostgresEventStore;

    async fn tenant_store(&self, tenant: &TenantId) -> Result<PostgresEventStore, StoreError> {
        if let Some(store) = self.lock().get(tenant) {
            return Ok(store.clone());
        }
        let schema = self
            .schema_of(tenant)
            .await?
            .ok_or_else(|| StoreError::UnknownTenant(tenant.clone()))?;
        let store = self.store_in(tenant, &schema)?;
        Ok(self.keep(tenant, store))
    }
}
