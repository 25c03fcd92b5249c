//! Aggregates: the consistency boundary that decides commands and applies events.

use std::num::NonZeroU64;

use crate::event::DomainEvent;

/// The state of one aggregate type, rebuilt from its events.
///
/// Derive it: `#[derive(Aggregate)]` with
/// `#[aggregate(name = "order", command = OrderCommand, event = OrderEvent, error = OrderError)]`.
/// Deciding is pure (`Command::handle` takes `&self` and returns events), applying mutates state
/// (`apply`), and all I/O stays in stores and gateways.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an aggregate",
    label = "not an aggregate",
    note = "add `#[derive(evently_core::Aggregate)]` with `#[aggregate(name = \"...\", command = ..., event = ..., error = ...)]` to `{Self}`"
)]
pub trait Aggregate: Sized + Send + Sync + 'static {
    /// The aggregate type's stable name, the first half of every stream id, e.g. `"order"`.
    const NAME: &'static str;

    /// When to take snapshots of this aggregate's state.
    const SNAPSHOT: SnapshotPolicy = SnapshotPolicy::NEVER;

    /// The commands this aggregate decides.
    type Command: Command<Aggregate = Self>;

    /// The events this aggregate records.
    type Event: DomainEvent;

    /// Why a command is rejected; it reaches the caller unchanged.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The state before the first event. The derive uses `Default::default()`.
    fn initial() -> Self;

    /// Mutates the state to reflect one event. Must not fail: an event is a fact.
    fn apply(&mut self, event: &Self::Event);

    /// Decides a command against the current state: the events to record, or the rejection.
    ///
    /// # Errors
    /// The aggregate's error, when the command is not allowed in this state.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error> {
        Command::handle(command, self)
    }
}

/// When an aggregate's state is snapshotted, declared with `#[aggregate(snapshot(every = N))]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotPolicy {
    /// Take a snapshot every this many events; `None`: never.
    pub every: Option<NonZeroU64>,
    /// The schema version of the snapshot's state; a stored snapshot of another version is ignored
    /// (the aggregate is replayed from its events) rather than misread.
    pub schema_version: u32,
}

impl SnapshotPolicy {
    /// No snapshots.
    pub const NEVER: Self = Self {
        every: None,
        schema_version: 1,
    };

    /// A snapshot every `every` events (never when `every` is 0), of schema version `schema_version`.
    #[must_use]
    pub const fn every(every: u64, schema_version: u32) -> Self {
        Self {
            every: NonZeroU64::new(every),
            schema_version,
        }
    }

    /// Whether moving from `before` to `after` events crosses a snapshot point.
    #[must_use]
    pub const fn is_due(&self, before: u64, after: u64) -> bool {
        match self.every {
            Some(every) => before / every.get() != after / every.get(),
            None => false,
        }
    }
}

/// An enum of the commands of one aggregate, each variant dispatched to a handler method.
///
/// Derive it: `#[derive(Command)]` with `#[command(aggregate = Order)]`; the variant `ConfirmOrder`
/// calls `Order::confirm_order(&self, ..fields)`, override with `#[command(handler = name)]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a command",
    label = "not a command",
    note = "add `#[derive(evently_core::Command)]` with `#[command(aggregate = ...)]` to `{Self}`"
)]
pub trait Command: Send + 'static {
    /// The aggregate that decides this command.
    type Aggregate: Aggregate;

    /// The variant's name, for logs and errors.
    fn command_name(&self) -> &'static str;

    /// Whether the target aggregate must exist already, must not, or either.
    fn expectation(&self) -> StreamExpectation;

    /// Runs the handler for this command against the aggregate's state.
    ///
    /// # Errors
    /// The aggregate's error, when the command is rejected.
    #[allow(clippy::type_complexity)] // the two associated types are the clearest spelling
    fn handle(
        self,
        aggregate: &Self::Aggregate,
    ) -> Result<Vec<<Self::Aggregate as Aggregate>::Event>, <Self::Aggregate as Aggregate>::Error>;
}

/// What a command expects of its target stream, declared per variant: `#[command(create)]` for a
/// command that starts a new aggregate, `#[command(create_or_update)]` for one that works either way,
/// nothing for the default (the aggregate must exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StreamExpectation {
    /// The aggregate must have been created already.
    #[default]
    MustExist,
    /// The aggregate must not exist yet.
    MustNotExist,
    /// Either.
    Any,
}
