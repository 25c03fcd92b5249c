//! Transactions that stay safe when the future using them is dropped.
//!
//! sqlx 0.9.0's `Pool::begin` is not cancel-safe on PostgreSQL (transact-rs/sqlx#4393, fixed after
//! 0.9.0): a future dropped while `BEGIN` is in flight returns the connection to the pool inside a
//! transaction nothing ends, and the next borrower's statements run in it, holding its locks and
//! never committing. A `COPY` cut midway leaves the connection's protocol state behind too. The
//! store's projections are cancelled by design (a shutdown drops the batch in flight), and any
//! caller may wrap an append in a timeout, so the store opens its transactions here instead:
//! `BEGIN`, `COMMIT` and `ROLLBACK` are plain statements, a transaction that ends normally (commit,
//! or rollback after an error) gives its connection back, and one dropped before it ended closes
//! its connection, which makes the server roll it back.

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// An open transaction on a pooled connection that is safe to drop at any point: dropped before
/// [`commit`](Self::commit) or [`rollback`](Self::rollback), it closes its connection and the
/// server rolls back. Dereferences to the connection, to run statements in it.
pub struct Transaction {
    /// Closed when dropped: released to the pool only once the transaction ended.
    conn: Detached,
}

impl Transaction {
    /// Takes a connection and opens a transaction on it.
    pub async fn begin(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Self::begin_with(pool, "BEGIN").await
    }

    /// Takes a connection and opens a transaction on it with `begin`: `BEGIN` followed by
    /// statements without parameters (`SET LOCAL ...`), sent as one simple query, so the
    /// settings cost no round trip of their own.
    pub(crate) async fn begin_with(
        pool: &PgPool,
        begin: &'static str,
    ) -> Result<Self, sqlx::Error> {
        Self::begin_on(pool.acquire().await?, begin).await
    }

    /// Opens a transaction on `conn`, a connection this process took from the pool and ended
    /// its last transaction on (no liveness ping: a connection that broke since fails here, and
    /// is closed).
    pub(crate) async fn begin_on(
        conn: PoolConnection<Postgres>,
        begin: &'static str,
    ) -> Result<Self, sqlx::Error> {
        let mut tx = Self {
            conn: Detached(Some(conn)),
        };
        // Dropped from here on, the connection is closed and the server ends whatever reached it.
        sqlx::raw_sql(begin).execute(&mut *tx).await?;
        Ok(tx)
    }

    /// Commits and hands the connection back to the caller for its next transaction
    /// ([`Transaction::begin_on`]). A commit that fails closes the connection.
    pub(crate) async fn commit_keeping(mut self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self).await?;
        Ok(self.conn.keep())
    }

    /// Commits. Whatever the outcome, the server ended the transaction (a `COMMIT` that fails
    /// rolls back), unless the connection broke, and then the pool drops it.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let committed = sqlx::query("COMMIT").execute(&mut *self).await;
        self.conn.release();
        committed.map(drop)
    }
}

impl Transaction {
    /// Rolls back (the statements so far completed: the connection goes back to the pool).
    pub async fn rollback(mut self) {
        if sqlx::query("ROLLBACK").execute(&mut *self).await.is_ok() {
            self.conn.release();
        }
        // If even that failed, the connection is closed as `self` drops.
    }

    /// Ends the transaction by `outcome`: commits an `Ok` (a failing commit is `commit_failed`),
    /// rolls back an `Err` and returns it.
    pub async fn end<T, E>(
        self,
        outcome: Result<T, E>,
        commit_failed: impl FnOnce(sqlx::Error) -> E,
    ) -> Result<T, E> {
        match outcome {
            Ok(value) => self.commit().await.map(|()| value).map_err(commit_failed),
            Err(error) => {
                self.rollback().await;
                Err(error)
            }
        }
    }
}

impl Deref for Transaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Transaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// A pooled connection for work that leaves session state behind while it runs (an open
/// transaction, a session advisory lock, a `search_path`, a `DO` block mid-way): closed when
/// dropped, so a future cut at any point never hands that state to the pool's next borrower;
/// given back to the pool only by [`release`](Self::release) or [`keep`](Self::keep), once the
/// work finished and undid its state.
pub(crate) struct Detached(Option<PoolConnection<Postgres>>);

impl Detached {
    /// Takes a connection from `pool`.
    pub(crate) async fn acquire(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self(Some(pool.acquire().await?)))
    }

    /// Gives the connection back to the pool: its session is as it was taken.
    pub(crate) fn release(self) {
        drop(self.keep());
    }

    /// Hands the connection back to the caller, its session as it was taken.
    pub(crate) fn keep(mut self) -> PoolConnection<Postgres> {
        self.0
            .take()
            .unwrap_or_else(|| unreachable!("a detached connection is taken only once"))
    }
}

impl Deref for Detached {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.0.as_deref().unwrap_or_else(|| {
            unreachable!("a detached connection is taken only on release or drop")
        })
    }
}

impl DerefMut for Detached {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0.as_deref_mut().unwrap_or_else(|| {
            unreachable!("a detached connection is taken only on release or drop")
        })
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Cut midway (a dropped future, a panic) or failed: the session's state is unknown,
            // so the connection is closed rather than reused.
            drop(conn.detach());
        }
    }
}
