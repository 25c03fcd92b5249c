//! Connecting: the pool, its sizing, and connection errors that name the server without its password.

use std::sync::Arc;
use std::time::Duration;

use evently_core::StoreError;
use sqlx::PgConnection;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::notify;
use crate::sql::Sql;
use crate::store::PostgresEventStore;
use crate::store::ServerGuard;

impl PostgresEventStore {
    /// A store on `pool` using the tables in `schema`.
    ///
    /// The schema name is validated as a PostgreSQL identifier (1 to 63 bytes, no NUL) and always
    /// quoted, so any such name is safe, quotes and semicolons included.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for an invalid schema name.
    pub fn new(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        tls_provider();
        let sql = Sql::new(schema)?;
        Ok(Self {
            pool,
            schema: schema.into(),
            channel: sql.channel.as_str().into(),
            moves: Arc::new(notify::Moves::new(&sql.checkpoint_channel)),
            sql: Arc::new(sql),
            inline: Arc::new([]),
            notifier: Arc::default(),
            listener: Arc::default(),
            server: Arc::default(),
            appends: Arc::default(),
            group: None,
            personal: Arc::default(),
            scope: evently_core::store::StoreScope::Untenanted,
            tenant_pools: Arc::default(),
        })
    }

    /// Connects to `url` (a pool of up to 16 connections, see [`PoolOptions`]) and uses the tables
    /// in `schema`.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for an invalid schema name, [`StoreError::Backend`] when the
    /// server cannot be reached.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, schema, PoolOptions::default()).await
    }

    /// As [`PostgresEventStore::connect`], giving up on a connection after `timeout` (a command
    /// line wants to fail fast; a service may wait for its database to come up).
    ///
    /// # Errors
    /// As [`PostgresEventStore::connect`].
    pub async fn connect_within(
        url: &str,
        schema: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::connect_with(
            url,
            schema,
            PoolOptions {
                acquire_timeout: timeout,
                ..PoolOptions::default()
            },
        )
        .await
    }

    /// As [`PostgresEventStore::connect`], with the pool sized by `options`.
    ///
    /// # Errors
    /// As [`PostgresEventStore::connect`]; [`StoreError::InvalidInput`] for a pool of 0.
    pub async fn connect_with(
        url: &str,
        schema: &str,
        options: PoolOptions,
    ) -> Result<Self, StoreError> {
        tls_provider();
        if options.max_connections == 0 {
            return Err(StoreError::InvalidInput(
                "a pool of 0 connections can run nothing: max_connections must be at least 1"
                    .into(),
            ));
        }
        // Every new connection may be to another server (a switchover): check it again.
        let server = Arc::new(ServerGuard::default());
        let connected = Arc::clone(&server);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout.min(evently_core::backoff::MAX_WAIT))
            .after_connect(move |_, _| {
                connected.connected();
                Box::pin(async { Ok(()) })
            })
            .connect(url)
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(sqlx::Error::PoolTimedOut) => {
                // The pool retried until its timeout and says only that: one more try on its
                // own gives the cause (refused, unknown host, authentication, no database).
                let cause = tokio::time::timeout(
                    Duration::from_secs(5),
                    <PgConnection as sqlx::Connection>::connect(url),
                )
                .await;
                let error = match cause {
                    Ok(Err(cause)) => cause,
                    _ => sqlx::Error::PoolTimedOut,
                };
                return Err(connect_error(url, error));
            }
            Err(error) => return Err(connect_error(url, error)),
        };
        let mut store = Self::new(pool, schema)?;
        store.server = server;
        Ok(store)
    }
}

/// How the store's connection pool is sized ([`PostgresEventStore::connect_with`]).
///
/// What takes a connection, and for how long: each append or load one, for its statement (or its
/// transaction); a running `ProjectionWorker` one for each batch's transaction and one for the
/// next window it reads meanwhile; an `OutboxRelay` one or two for its reads and one for its
/// checkpoint; a saga orchestrator one per store call. Commit wake-ups take none: a store has one
/// listening connection of its own, outside the pool, whatever listens on it. So size the pool as
/// the concurrent appends you want to run at once, plus two per worker and three per relay of the
/// process, and keep the sum over all processes below the server's `max_connections`. Appends
/// that find the pool busy wait up to `acquire_timeout`, then fail with a backend error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// The most connections the pool opens (at least 1). Default 16.
    pub max_connections: u32,
    /// How long a caller waits for a free connection (or for the server to come up) before an
    /// error. Default 60 s; clamped to a day.
    pub acquire_timeout: Duration,
}
impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(60),
        }
    }
}
/// A connection failure, naming the server (without its password).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {0}: {1}{hint}", hint = tls_hint(.1))]
struct ConnectError(String, #[source] sqlx::Error);
/// A failure to connect to `url`, named without its password.
fn connect_error(url: &str, error: sqlx::Error) -> StoreError {
    StoreError::backend(ConnectError(url_without_password(url), error))
}
/// Makes sure rustls has a process-wide crypto provider before a TLS connection needs one.
/// rustls picks one by its crate features, and finds none when a build enables two (ring here,
/// aws-lc-rs through an AWS SDK, say): sqlx's TLS handshake then panics. ring is installed
/// unless the application installed one first.
fn tls_provider() {
    #[cfg(feature = "tls")]
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: there is a provider either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
/// What to do about a TLS failure that is this build's, not the server's.
fn tls_hint(error: &sqlx::Error) -> &'static str {
    if cfg!(feature = "tls") || !matches!(error, sqlx::Error::Tls(_)) {
        ""
    } else {
        " (cqrs-postgres was built without TLS: enable its `tls` feature)"
    }
}
/// `url` with every password replaced, for error messages: the one in the user info
/// (`postgres://app:secret@host`), a `password=` parameter of a URL's query
/// (`?password=secret`) and a `password=` pair of a key/value connection string
/// (`host=db password=secret`, quoted or not).
fn url_without_password(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    let mut out = String::with_capacity(url.len());
    let mut rest = url.as_str();
    while let Some(at) = rest.to_ascii_lowercase().find("password=") {
        let value = at + "password=".len();
        out.push_str(&rest[..value]);
        out.push_str("***");
        let tail = &rest[value..];
        let end = if let Some(quoted) = tail.strip_prefix('\'') {
            // A quoted value runs to the next unescaped quote.
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(tail.len(), |(i, _)| i + 2)
        } else {
            tail.find(['&', ' ', '\t', '\n']).unwrap_or(tail.len())
        };
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_error_messages() {
        assert_eq!(
            url_without_password("postgres://app:s3cr3t@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            url_without_password("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        assert_eq!(url_without_password("not a url"), "not a url");
        assert_eq!(
            url_without_password("postgres://db/x?user=app&password=s3cr3t&sslmode=require"),
            "postgres://db/x?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            url_without_password("host=db user=app PASSWORD=s3cr3t dbname=x"),
            "host=db user=app PASSWORD=*** dbname=x"
        );
        assert_eq!(
            url_without_password("host=db password='s3 cr\\'3t' dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(
            url_without_password("postgres://a:b@db/x?password=c"),
            "postgres://a:***@db/x?password=***"
        );
    }
}
