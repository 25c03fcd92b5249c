//! Commands: requests to change one aggregate, dispatched to its handler methods.

use std::collections::BTreeMap;

use crate::aggregate::Aggregate;
use crate::envelope::{CommandId, CorrelationId};

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

/// Who sent a command and why: becomes the metadata of every event it records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandMetadata {
    /// The command's id: the causation id of its events, and its idempotency handle.
    pub command_id: CommandId,
    /// The request this command belongs to; the command id when not given.
    pub correlation_id: Option<CorrelationId>,
    /// The user on whose behalf it runs.
    pub user_id: Option<String>,
    /// Extra headers copied to every event.
    pub headers: BTreeMap<String, String>,
    /// The trace the command continues (e.g. the HTTP request's `traceparent`): its span and its
    /// events' [`TRACEPARENT`](crate::trace::TRACEPARENT) join it. Without one, the events carry
    /// the trace the command runs in, if any ([`trace::current`](crate::trace::current)).
    pub trace: Option<crate::trace::TraceContext>,
}

impl CommandMetadata {
    /// Metadata with a new command id and nothing else.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// With this correlation id.
    #[must_use]
    pub fn correlated(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// With this user.
    #[must_use]
    pub fn by_user(mut self, user: impl Into<String>) -> Self {
        self.user_id = Some(user.into());
        self
    }

    /// With one more header.
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Continuing this trace (see [`trace`](Self::trace)).
    #[must_use]
    pub fn with_trace(mut self, trace: crate::trace::TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The correlation id the events get: the given one, or the command id.
    #[must_use]
    pub fn effective_correlation_id(&self) -> CorrelationId {
        self.correlation_id
            .unwrap_or(CorrelationId(self.command_id.0))
    }

    /// The event metadata this command's events carry (with its [`trace`](Self::trace) under
    /// [`TRACEPARENT`](crate::trace::TRACEPARENT)).
    #[must_use]
    pub fn event_metadata(&self) -> crate::envelope::Metadata {
        let mut headers = self.headers.clone();
        if let Some(trace) = &self.trace {
            headers.insert(crate::trace::TRACEPARENT.to_owned(), trace.to_string());
        }
        crate::envelope::Metadata {
            correlation_id: Some(self.effective_correlation_id()),
            causation_id: Some(self.command_id.into()),
            user_id: self.user_id.clone(),
            headers,
        }
    }
}
