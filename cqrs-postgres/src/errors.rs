//! What a database error means to the store: a backend error carrying it, and whether it is an
//! outage that heals (the server out of reach) rather than a fault of what was asked.

use evently_core::StoreError;

/// A database error as the store's backend error.
pub(crate) fn backend(error: sqlx::Error) -> StoreError {
    StoreError::backend(error)
}

/// Whether `error` (or an error it wraps) says the database is out of reach rather than that
/// this event cannot be applied: a broken or refused connection, an exhausted or closed pool, a
/// server shutting down or terminating connections, too many connections.
#[must_use]
pub fn is_outage(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
            return match sqlx {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // connection_exception (08xxx), admin/crash shutdown, cannot connect now,
                // too many connections.
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
                }),
                _ => false,
            };
        }
        if error.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        next = error.source();
    }
    false
}

/// Whether `error` (or an error it wraps) is the server rolling the transaction back for a
/// reason that passes by itself: a deadlock it broke (`40P01`), a serialization failure
/// (`40001`), a lock not available (`55P03`). Trying the same transaction again is the answer.
pub(crate) fn is_rolled_back(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(sqlx::Error::Database(db)) = error.downcast_ref::<sqlx::Error>() {
            return db
                .code()
                .is_some_and(|code| matches!(&*code, "40P01" | "40001" | "55P03"));
        }
        next = error.source();
    }
    false
}
