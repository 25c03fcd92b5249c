//! What every framework under test does for the workloads, over the same bank account (opened,
//! deposited, withdrawn; ~50-byte JSON payloads) on the same PostgreSQL.

/// Why a command did not land.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Another writer changed the aggregate first: try again.
    #[error("conflict")]
    Conflict,
    /// Anything else: the benchmark stops.
    #[error("{0}")]
    Other(String),
}

impl Failure {
    /// Any error as [`Failure::Other`].
    pub fn other(error: impl std::fmt::Display) -> Self {
        Self::Other(error.to_string())
    }
}

/// The deposit of command `n`: the same amount and reference everywhere.
#[must_use]
pub fn amount(n: u64) -> u64 {
    n % 1000 + 1
}

/// The reference every deposit carries (with the amount, a ~50-byte payload).
pub const REFERENCE: &str = "salary 2026-11";

/// A framework driven by the workloads. Aggregates are numbered; each framework names them its
/// own way (a string id, or a UUID for esrs).
#[async_trait::async_trait]
pub trait Framework: Send + Sync + 'static {
    /// The column title.
    fn name(&self) -> &'static str;

    /// Opens account `id`.
    async fn open(&self, id: u64) -> Result<(), Failure>;

    /// Deposits `amount(n)` into account `id`.
    async fn deposit(&self, id: u64, n: u64) -> Result<(), Failure>;

    /// Rebuilds account `id` from the store, bypassing any cache: its balance.
    async fn balance(&self, id: u64) -> Result<u64, Failure>;

    /// How many events account `id` has.
    async fn events(&self, id: u64) -> Result<u64, Failure>;

    /// Records `count` deposits in a new account `id` as this framework writes many events at
    /// once (an append of a batch, or one command deciding them all).
    async fn bulk(&self, id: u64, count: u64) -> Result<(), Failure>;
}
