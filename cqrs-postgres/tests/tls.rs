//! TLS to PostgreSQL, against the local server (`scripts/postgres-up.sh` makes sure it offers
//! TLS, with a self-signed certificate when it had none).
//!
//! With the `tls` feature (on in the workspace's test run: the CLI and the example turn it on):
//! `sslmode=require` encrypts, `verify-ca` with the server's own certificate as the root
//! connects, with roots that did not sign it is refused, naming the certificate. Without the
//! feature: a TLS URL is refused with a message that says which feature to enable.

mod common;

use evently_postgres::{PostgresEventStore, database_url};

/// `DATABASE_URL` with `params` added to its query.
fn with(params: &str) -> String {
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn a_store_over_tls_encrypts_and_checks_the_servers_certificate() {
    use evently_core::{EventData, EventStore as _, ExpectedVersion, Metadata, StreamId};

    let plain = common::pool(1).await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&plain)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ssl, "on",
        "the server at DATABASE_URL does not offer TLS: run scripts/postgres-up.sh, which turns it on"
    );
    let certificate: String = sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(&plain)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let certificate = if certificate.starts_with('/') {
        certificate
    } else {
        // Relative to the data directory.
        let data: String = sqlx::query_scalar("SHOW data_directory")
            .fetch_one(&plain)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        format!("{data}/{certificate}")
    };
    assert!(
        std::path::Path::new(&certificate).exists(),
        "the server's certificate {certificate} is not readable here"
    );

    // Required: every connection of the store's pool is encrypted, and the store works.
    let _ = common::fresh_store("tls").await;
    let store = PostgresEventStore::connect(&with("sslmode=require"), "t_tls")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stream = StreamId::new("account", "tls");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![EventData {
                event_id: evently_core::EventId::new(),
                event_type: "Opened".into(),
                schema_version: 1,
                payload: serde_json::json!({ "owner": "tls" }),
                metadata: Metadata::default(),
            }],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store
            .stream_version(&stream)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
    for _ in 0..3 {
        let encrypted: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(encrypted, "a connection of the pool is not encrypted");
    }

    // verify-ca with the server's (self-signed) certificate as the root: accepted.
    let verified = PostgresEventStore::connect(
        &with(&format!("sslmode=verify-ca&sslrootcert={certificate}")),
        "t_tls",
    )
    .await
    .unwrap_or_else(|e| panic!("verify-ca with the server's certificate: {e}"));
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(verified.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(encrypted);

    // verify-ca with roots that did not sign it (the public CAs): refused, saying why.
    let public_roots = "/etc/ssl/certs/ca-certificates.crt";
    assert!(
        std::path::Path::new(public_roots).exists(),
        "{public_roots} is missing: install ca-certificates"
    );
    let refused = PostgresEventStore::connect_within(
        &with(&format!("sslmode=verify-ca&sslrootcert={public_roots}")),
        "t_tls",
        std::time::Duration::from_secs(5),
    )
    .await
    .map(|_| ())
    .expect_err("a certificate no root signed was accepted");
    let message = refused.to_string();
    eprintln!("{message}");
    assert!(
        message.contains("cannot connect to PostgreSQL") && message.contains("certificate"),
        "{message}"
    );
}

#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn a_tls_url_without_the_feature_says_which_feature_to_enable() {
    let refused = PostgresEventStore::connect_within(
        &with("sslmode=require"),
        "t_tls",
        std::time::Duration::from_secs(5),
    )
    .await
    .map(|_| ())
    .expect_err("sslmode=require connected without TLS support");
    let message = refused.to_string();
    assert!(message.contains("`tls` feature"), "{message}");
}
