//! `cqrs tenants`: the schema-per-tenant registry (`evently_postgres::tenants`), and the store of
//! one tenant for `--tenant`.

use clap::Subcommand;
use evently_core::TenantId;
use evently_core::tenant::Tenancy as _;
use evently_postgres::PostgresEventStore;
use evently_postgres::tenants::SchemaPerTenant;

use crate::Failure;

/// The schema-per-tenant layout's tenants.
#[derive(Subcommand)]
pub(crate) enum Tenants {
    /// Register a tenant: create and migrate its schema (`tenant_<id>`); harmless when it is
    /// registered already.
    Add {
        /// The tenant id (1 to 63 ASCII letters, digits, `_` or `-`).
        #[arg(value_name = "TENANT")]
        id: String,
    },
    /// The registered tenants and their schemas.
    List,
}

/// The layout whose registry is in schema `registry`.
pub(crate) async fn layout(
    store: &PostgresEventStore,
    registry: &str,
) -> Result<SchemaPerTenant, Failure> {
    Ok(SchemaPerTenant::open(store.pool().clone(), registry).await?)
}

/// The store of `tenant`, as `--tenant` picks it.
pub(crate) async fn store_of(
    store: &PostgresEventStore,
    registry: &str,
    tenant: &str,
) -> Result<PostgresEventStore, Failure> {
    let tenant = TenantId::new(tenant)?;
    Ok(layout(store, registry).await?.tenant_store(&tenant).await?)
}

pub(crate) async fn run(
    store: &PostgresEventStore,
    registry: &str,
    command: Tenants,
    json: bool,
) -> Result<(), Failure> {
    let layout = layout(store, registry).await?;
    match command {
        Tenants::Add { id } => {
            let tenant = TenantId::new(id)?;
            let store = layout.register(&tenant).await?;
            if json {
                out!(
                    "{}",
                    serde_json::json!({"tenant": tenant, "schema": store.schema()})
                );
            } else {
                out!(
                    "tenant `{tenant}` is registered in schema `{}`, migrated",
                    store.schema()
                );
            }
        }
        Tenants::List => {
            let tenants = layout.tenants().await?;
            if json {
                for (tenant, schema) in &tenants {
                    out!(
                        "{}",
                        serde_json::json!({"tenant": tenant, "schema": schema})
                    );
                }
            } else if tenants.is_empty() {
                out!("no tenant is registered (in schema `{registry}`)");
            } else {
                let mut table = crate::table(["TENANT", "SCHEMA"]);
                for (tenant, schema) in &tenants {
                    table.add_row([tenant.as_str(), schema.as_str()]);
                }
                out!("{table}");
            }
        }
    }
    Ok(())
}

/// `cqrs migrate --all-tenants`: every registered tenant's schema, after the store's own.
pub(crate) async fn migrate_all(store: &PostgresEventStore, registry: &str) -> Result<(), Failure> {
    let migrated = layout(store, registry).await?.migrate_all().await?;
    for (tenant, schema) in &migrated {
        out!("tenant `{tenant}`: schema `{schema}` is up to date");
    }
    out!("{} tenant schemas migrated", migrated.len());
    Ok(())
}
