//! What a reader of the global order asks for and how far behind it is: the store's side of a
//! projection's subscription.

use crate::envelope::StoredEvent;
use crate::event::DomainEvent;

/// The event types of one event enum a projection listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// The aggregate type of the enum's events, if it belongs to one (`#[event(aggregate = A)]`).
    pub aggregate_type: Option<&'static str>,
    /// The event type names.
    pub event_types: &'static [&'static str],
}

impl Subscription {
    /// The subscription to every event of `E`.
    #[must_use]
    pub const fn to<E: DomainEvent>() -> Self {
        Self {
            aggregate_type: E::AGGREGATE_TYPE,
            event_types: E::EVENT_TYPES,
        }
    }

    /// Whether a stored event is one of these.
    #[must_use]
    pub fn matches<T>(&self, event: &StoredEvent<T>) -> bool {
        self.matches_type(&event.stream.aggregate_type, &event.event_type)
    }

    /// Whether events of `event_type` in streams of `aggregate_type` are among these (for a row
    /// that cannot be read as a whole event).
    #[must_use]
    pub fn matches_type(&self, aggregate_type: &str, event_type: &str) -> bool {
        self.aggregate_type.is_none_or(|t| t == aggregate_type)
            && self.event_types.contains(&event_type)
    }
}

/// How far a reader of the global order is behind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lag {
    /// Committed events after the reader's checkpoint (an exact count, not a difference of
    /// positions: positions interleave across transactions).
    pub events: u64,
    /// How long ago the oldest of them was recorded (0 when there are none).
    pub seconds: f64,
}
