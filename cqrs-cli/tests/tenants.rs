//! `cqrs tenants add|list`, `cqrs migrate --all-tenants` and `--tenant` against the real
//! PostgreSQL: a tenant registered from the command line is the store the library hands out, and
//! `--tenant` reads that tenant's events only.

use evently_core::tenant::Tenancy as _;
use evently_core::{EventStore, ExpectedVersion, StreamId, TenantId};
use evently_postgres::tenants::SchemaPerTenant;

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

mod common;

const REGISTRY: &str = "cli_tenants";

/// (exit code, stdout, stderr).
fn cqrs(args: &[&str]) -> (i32, String, String) {
    common::run(&["--tenant-registry", REGISTRY], args)
}

#[tokio::test]
async fn tenants_from_the_command_line() {
    let pool = pg::pool(4).await;
    for schema in [REGISTRY, "tenant_cli-acme", "tenant_cli-globex"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    for tenant in ["cli-acme", "cli-globex"] {
        let (code, out, err) = cqrs(&["tenants", "add", tenant]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("schema `tenant_{tenant}`")), "{out}");
    }
    let (code, out, err) = cqrs(&["tenants", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains(r#""schema":"tenant_cli-acme""#), "{out}");

    // The same stream id in both tenants, written through the library.
    let layout = SchemaPerTenant::open(pool, REGISTRY)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stream = StreamId::new("account", "a-1");
    for (tenant, amount) in [("cli-acme", 111), ("cli-globex", 222)] {
        let id = TenantId::new(tenant).unwrap_or_else(|e| panic!("{e}"));
        let store = layout
            .tenant_store(&id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .append(
                &stream,
                ExpectedVersion::NoStream,
                vec![pg::deposit(amount)],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (code, out, err) = cqrs(&[
        "--tenant",
        "cli-acme",
        "events",
        "show",
        "account/a-1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    // The amounts by their field: a timestamp or a transaction id may hold the digits too.
    assert!(
        out.contains(r#""amount_cents":111"#) && !out.contains(r#""amount_cents":222"#),
        "{out}"
    );
    assert!(out.contains(r#""tenant":"cli-acme""#), "{out}");

    let (code, _, err) = cqrs(&["--tenant", "cli-initech", "events", "show", "account/a-1"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown tenant `cli-initech`"), "{err}");
    let (code, _, err) = cqrs(&["--tenant", "no tenant!", "events", "show", "account/a-1"]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a tenant id"), "{err}");

    let (code, out, err) = cqrs(&["migrate", "--all-tenants"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 tenant schemas migrated"), "{out}");
}

#[tokio::test]
async fn migrate_turns_row_level_security_on() {
    let pool = pg::pool(2).await;
    sqlx::query("DROP SCHEMA IF EXISTS t_cli_rls CASCADE")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, out, err) = cqrs(&["--schema", "t_cli_rls", "migrate", "--row-level-security"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("row-level security separates the tenants"),
        "{out}"
    );
    let on: Vec<(String, bool)> = sqlx::query_as(
        "SELECT relname::text, relrowsecurity FROM pg_class \
         WHERE relnamespace = 't_cli_rls'::regnamespace AND relname IN ('events', 'snapshots', 'inbox') \
         ORDER BY relname",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        on,
        [
            ("events".to_owned(), true),
            ("inbox".to_owned(), true),
            ("snapshots".to_owned(), true)
        ]
    );
}
