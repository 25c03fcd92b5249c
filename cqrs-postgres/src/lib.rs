#![doc = include_str!("../README.md")]

mod append;
mod connect;
pub mod control;
mod copy;
mod errors;
mod event_store;
pub mod freshness;
mod group;
mod inbox;
mod inline;
mod insert;
mod keys;
pub mod lease;
mod migrate;
mod notify;
mod personal;
pub mod projection;
mod read;
mod rls;
mod rows;
pub mod saga;
pub mod segments;
mod server;
mod snapshot;
mod sql;
mod store;
pub mod tenants;
mod tx;
pub mod versions;

pub use connect::PoolOptions;
pub use errors::is_outage;
pub use freshness::{CaughtUpIn, PostgresFixture};
pub use group::{GroupCommit, GroupCommitStats};
pub use inbox::Inbox;
pub use keys::PostgresKeyStore;
pub use lease::{Advance, CheckpointLease, LeaseLoss};
pub use notify::Wakeups;
pub use server::Rebased;
pub use sqlx;
pub use store::PostgresEventStore;
pub use tx::Transaction;

/// The PostgreSQL schema used when none is given.
pub const DEFAULT_SCHEMA: &str = "cqrs";

/// `DATABASE_URL`, or the local default `postgres://postgres@127.0.0.1:5432/test`.
#[must_use]
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}
