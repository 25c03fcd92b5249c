//! Why an owner lost its lease on a checkpoint: the same reasons for every follower of the global
//! order that holds one (a projection worker, a segment's worker, an outbox relay), decided by the
//! backend from the checkpoint row it finds.

/// Why a lease is not its owner's any more: what an operator needs to tell a stalled owner
/// (whose lease ran out) from a second process under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseLoss {
    /// This owner holds no epoch: it never took the lease, or lost it before.
    NotHeld,
    /// Another owner holds a live lease (found when taking it).
    HeldElsewhere,
    /// The lease ran out before this owner renewed it: the owner stalled for longer than the
    /// lease (a slow step, a paused process, a database it could not reach). Taking it again
    /// works while no one else has.
    Expired,
    /// The lease was taken with a new epoch since this owner's: another owner took it, or a
    /// second process runs under this owner's name.
    TakenOver {
        /// The epoch the lease has now.
        epoch: i64,
    },
    /// The checkpoint's row is gone (deleted by an operator, or the checkpoint was reset).
    Gone,
}

impl std::fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotHeld => f.write_str("this owner does not hold it"),
            Self::HeldElsewhere => f.write_str("another owner holds a live lease"),
            Self::Expired => f.write_str(
                "it expired before this owner renewed it (the owner stalled for longer than its \
                 lease: a slow step, a paused process or an unreachable database)",
            ),
            Self::TakenOver { epoch } => write!(
                f,
                "it was taken over (now epoch {epoch}): by another owner, or by a second process \
                 under this owner's name"
            ),
            Self::Gone => f.write_str("its checkpoint row is gone"),
        }
    }
}
