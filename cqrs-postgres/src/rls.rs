//! Tenants in one schema: row-level security.
//!
//! Every table of tenant data has a `tenant_id` column (migration 16) whose default is the
//! connection's `evently.tenant` setting. [`PostgresEventStore::for_tenant`] hands out a view of
//! the store whose connections carry the tenant from their start (a pool per tenant, the
//! setting sent as a startup option), and [`PostgresEventStore::enable_row_level_security`]
//! adds the policies that make PostgreSQL itself show and accept only the rows of the
//! connection's tenant. No statement of the store names the tenant: a query that forgot it cannot
//! exist, a connection never serves two tenants, and what isolates the tenants is the server.
//!
//! Row-level security binds roles that neither own the tables nor are superusers nor have
//! `BYPASSRLS`. Run the migrations as the owner and the application as another role with the
//! privileges it needs; [`for_tenant`](PostgresEventStore::for_tenant) checks this at its first use
//! and refuses a role the policies would not bind (its views would see every tenant).

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use evently_core::store::StoreScope;
use evently_core::tenant::Tenancy;
use evently_core::{StoreError, TenantId};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

use crate::errors::backend;
use crate::store::{Personal, PostgresEventStore, TenantPools};

/// The tables whose rows belong to a tenant.
const TENANT_TABLES: [&str; 8] = [
    "events",
    "snapshots",
    "command_keys",
    "projection_checkpoints",
    "projection_dead_letters",
    "saga_instances",
    "inbox",
    "personal_keys",
];

/// The tenant tables the all-tenants view reads every tenant's rows of.
const ALL_TENANTS_READ: [&str; 2] = ["events", "personal_keys"];

/// The setting the policies read; `*` is the all-tenants view, which reads every tenant's events.
const SETTING: &str = "evently.tenant";
const ALL: &str = "*";

impl PostgresEventStore {
    /// The view of `tenant`'s data in this schema (the row-level-security layout): its own
    /// streams (an id another tenant uses too is another stream), idempotency keys, snapshots,
    /// events in the global order, projection checkpoints and dead letters, saga instances, inbox
    /// rows and data keys. It appends with `tenant` in every event's metadata, refusing events
    /// that name another tenant. Its connections come from a pool of the tenant's
    /// ([`with_tenant_pools`](Self::with_tenant_pools)), each with `evently.tenant` set from its
    /// start.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] when row-level security is not enabled on the schema
    /// ([`enable_row_level_security`](Self::enable_row_level_security), `cqrs migrate
    /// --row-level-security`) or does not bind the store's role (a superuser, a role with
    /// `BYPASSRLS` or the tables' owner), [`StoreError::Backend`].
    pub async fn for_tenant(&self, tenant: &TenantId) -> Result<Self, StoreError> {
        self.check_row_level_security().await?;
        let mut view = self.view(tenant.as_str());
        view.scope = StoreScope::TenantView(tenant.clone());
        Ok(view)
    }

    /// Sizes the pools of the tenant views made from now on: at most `max_connections` each (at
    /// least 1), idle connections closed after `idle_timeout`. By default a tenant's pool is as
    /// large as this store's and keeps idle connections 30 s; the connections of all active
    /// tenants together must stay below the server's `max_connections`.
    #[must_use]
    pub fn with_tenant_pools(mut self, max_connections: u32, idle_timeout: Duration) -> Self {
        self.tenant_pools = Arc::new(TenantPools {
            max_connections: Some(max_connections.max(1)),
            idle_timeout,
            ..TenantPools::default()
        });
        self
    }

    /// A read-only view of every tenant's events in the one global order, for a projection or a
    /// relay that runs across all tenants (each event names its tenant in its metadata). Its own
    /// checkpoint, dead letters and inbox rows are those of the pseudo-tenant `*`. Appends through
    /// it are refused.
    ///
    /// # Errors
    /// As [`for_tenant`](Self::for_tenant).
    pub async fn all_tenants(&self) -> Result<Self, StoreError> {
        self.check_row_level_security().await?;
        let mut view = self.view(ALL);
        view.scope = StoreScope::AllTenants;
        Ok(view)
    }

    /// Enables the tenant policies on this schema's tenant tables (idempotent; run it as the
    /// tables' owner after [`migrate`](Self::migrate)). From then on roles bound by row-level
    /// security see and write only the rows of their connection's `evently.tenant`: use the
    /// store through [`for_tenant`](Self::for_tenant) and [`all_tenants`](Self::all_tenants).
    ///
    /// # Errors
    /// [`StoreError::Backend`] (for example when the role does not own the tables).
    pub async fn enable_row_level_security(&self) -> Result<(), StoreError> {
        let s = &self.sql.quoted_schema;
        let mut tx = self.pool.begin().await.map_err(backend)?;
        for table in TENANT_TABLES {
            let mut statements = vec![
                format!("ALTER TABLE {s}.{table} ENABLE ROW LEVEL SECURITY"),
                format!("DROP POLICY IF EXISTS evently_tenant ON {s}.{table}"),
                format!("DROP POLICY IF EXISTS evently_all_tenants ON {s}.{table}"),
                format!(
                    "CREATE POLICY evently_tenant ON {s}.{table} \
                     USING (tenant_id = current_setting('{SETTING}', true)) \
                     WITH CHECK (tenant_id = current_setting('{SETTING}', true))"
                ),
            ];
            // The all-tenants view reads every tenant's events, and the data keys that open
            // them (each event with its tenant's), and changes none; its own rows elsewhere (a
            // checkpoint, letters) are those of tenant `*`.
            if ALL_TENANTS_READ.contains(&table) {
                statements.push(format!(
                    "CREATE POLICY evently_all_tenants ON {s}.{table} FOR SELECT \
                     USING (current_setting('{SETTING}', true) = '{ALL}')"
                ));
            }
            for statement in statements {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
            }
        }
        tx.commit().await.map_err(backend)
    }

    /// Whether the policies are enabled on this schema and bind the store's role.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub async fn row_level_security_applies(&self) -> Result<bool, StoreError> {
        let table = format!("{}.events", self.sql.quoted_schema);
        let applies: Option<bool> = sqlx::query_scalar(
            "SELECT c.relrowsecurity AND NOT r.rolsuper AND NOT r.rolbypassrls \
                    AND (c.relforcerowsecurity OR NOT pg_has_role(current_user, c.relowner, 'MEMBER')) \
             FROM pg_class c, pg_roles r \
             WHERE c.oid = to_regclass($1) AND r.rolname = current_user",
        )
        .bind(&table)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        Ok(applies == Some(true))
    }

    async fn check_row_level_security(&self) -> Result<(), StoreError> {
        self.tenant_pools
            .checked
            .get_or_try_init(|| async {
                if self.row_level_security_applies().await? {
                    Ok(())
                } else {
                    Err(StoreError::InvalidInput(format!(
                        "row-level security does not separate tenants in schema `{}` for this \
                         role: enable it (`cqrs migrate --row-level-security`, as the tables' \
                         owner) and connect as a role that is neither the owner nor a superuser \
                         nor has BYPASSRLS, or use a schema per tenant",
                        self.schema
                    )))
                }
            })
            .await
            .map(drop)
    }

    /// This store on the pool whose connections carry `setting`, with what must not be shared
    /// between tenants made anew (the group-commit leader, the schema's key store).
    fn view(&self, setting: &str) -> Self {
        let pool = {
            let mut pools = self
                .tenant_pools
                .pools
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            pools
                .entry(setting.to_owned())
                .or_insert_with(|| {
                    let options = (*self.pool.connect_options())
                        .clone()
                        .options([(SETTING, setting)]);
                    let max = self.tenant_pools.max_connections;
                    PgPoolOptions::new()
                        .max_connections(
                            max.unwrap_or_else(|| self.pool.options().get_max_connections()),
                        )
                        .min_connections(0)
                        .idle_timeout(self.tenant_pools.idle_timeout)
                        .acquire_timeout(self.pool.options().get_acquire_timeout())
                        .connect_lazy_with(options)
                })
                .clone()
        };
        let mut view = self.clone();
        view.pool = pool;
        view.group = self
            .group
            .as_ref()
            .map(|group| Arc::new(crate::group::Grouper::new(group.config())));
        view.personal = Arc::new(Personal {
            sealing: self.personal.sealing.clone(),
            keys: self.personal.keys.clone(),
            schema_keys: std::sync::OnceLock::new(),
        });
        view
    }

    /// Refuses writes through the all-tenants view.
    pub(crate) fn refuse_all_tenants(&self) -> Result<(), StoreError> {
        self.scope.writable().map(drop)
    }
}

/// Refuses a segmented or versioned projection on one tenant's row-level view: the registries of
/// segments and versions (and the views a promotion switches) are the schema's, shared by its
/// tenants, so one tenant's rescale or promotion would act for all.
pub(crate) fn refuse_shared_registry<P: evently_core::projection::Projection>(
    store: &PostgresEventStore,
    what: &str,
) -> Result<(), StoreError> {
    if matches!(store.scope, StoreScope::TenantView(_)) {
        return Err(StoreError::InvalidInput(format!(
            "projection `{}` is {what}, and segments and versions are kept per schema, shared by \
             the tenants of a row-level layout: run it on `all_tenants()` (tenants = \"all\") or \
             in a schema per tenant",
            P::NAME
        )));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Tenancy for PostgresEventStore {
    type Store = Self;

    async fn tenant_store(&self, tenant: &TenantId) -> Result<Self, StoreError> {
        self.for_tenant(tenant).await
    }
}
