//! The event-store conformance suite against PostgreSQL, each check in a schema of its own.

mod common;

evently_core::event_store_conformance_tests!(|name: &'static str| common::fresh_store(name));

/// Tenant isolation in the schema-per-tenant layout: each check's registry in schema `tc_<name>`,
/// its tenants `t0`..`t7` in schemas `tc_<name>_<tenant>`.
mod schema_per_tenant {
    use evently_postgres::tenants::SchemaPerTenant;

    use super::common;

    async fn tenancy(name: &'static str) -> SchemaPerTenant {
        let pool = common::pool(40).await;
        let control = format!("tc_{name}");
        let schemas: Vec<String> = std::iter::once(control.clone())
            .chain((0..8).map(|n| format!("{control}_t{n}")))
            .collect();
        for schema in &schemas {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
            )))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("drop schema {schema}: {e}"));
        }
        let prefix = control.clone();
        let tenancy = SchemaPerTenant::open(pool, &control)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .with_schema_names(move |tenant| format!("{prefix}_{tenant}"));
        for n in 0..8 {
            tenancy
                .register(&evently_core::conformance::tenant(n))
                .await
                .unwrap_or_else(|e| panic!("register t{n}: {e}"));
        }
        tenancy
    }

    evently_core::tenant_conformance_tests!(tenancy);
}
