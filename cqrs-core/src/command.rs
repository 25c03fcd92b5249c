//! Commands: requests to change one aggregate, dispatched to its handler methods, and the
//! metadata they carry. The [`Command`] trait and [`StreamExpectation`] live with
//! [`Aggregate`](crate::Aggregate) (the two traits name each other) and are re-exported here.

use std::collections::BTreeMap;

pub use crate::aggregate::{Command, StreamExpectation};
use crate::envelope::{CommandId, CorrelationId};

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
            tenant: None,
            headers,
        }
    }
}
