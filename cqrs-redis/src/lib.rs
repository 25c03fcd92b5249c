#![doc = include_str!("../README.md")]

mod idempotency;
mod inbox;

pub use idempotency::{IdempotencyError, Outcome, RedisIdempotency, connect};
pub use inbox::{Claim, Deduplicated, RedisInbox};
