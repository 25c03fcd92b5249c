//! A given/when/then fixture for aggregates: test domain logic without a store.
//!
//! ```
//! # use cqrs_core::testing::AggregateFixture;
//! # fn doc<A: cqrs_core::Aggregate>(given: Vec<A::Event>, command: A::Command, expected: Vec<A::Event>)
//! # where A::Event: PartialEq + std::fmt::Debug, A::Error: std::fmt::Debug {
//! AggregateFixture::<A>::given(given)
//!     .when(command)
//!     .then_expect_events(expected);
//! # }
//! ```

use std::fmt::Debug;

use crate::aggregate::Aggregate;
use crate::event::DomainEvent;

/// The *given* half: an aggregate rebuilt from past events.
#[derive(Debug)]
pub struct AggregateFixture<A> {
    state: A,
}

impl<A: Aggregate> AggregateFixture<A> {
    /// An aggregate with no history.
    #[must_use]
    pub fn given_no_previous_events() -> Self {
        Self {
            state: A::initial(),
        }
    }

    /// An aggregate that recorded `events`.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::initial();
        for event in events {
            state.apply(&event);
        }
        Self { state }
    }

    /// The *when*: decides `command` against the state.
    pub fn when(mut self, command: A::Command) -> FixtureResult<A> {
        let result = self.state.handle(command);
        if let Ok(events) = &result {
            for event in events {
                self.state.apply(event);
            }
        }
        FixtureResult {
            state: self.state,
            result,
        }
    }
}

/// The *then*: what the command decided and the state after it, with assertions.
#[derive(Debug)]
pub struct FixtureResult<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> FixtureResult<A> {
    /// Asserts that the command recorded exactly `expected`, and that each event survives an
    /// encode/decode round trip (so a serde attribute that breaks the stored form fails here, not in
    /// production).
    ///
    /// # Panics
    /// When the command was rejected, recorded other events, or an event does not round-trip.
    #[track_caller]
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> Self
    where
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match &self.result {
            Ok(events) => {
                assert_eq!(
                    events, &expected,
                    "the command recorded other events than expected"
                );
                for event in events {
                    let encoded = match event.encode() {
                        Ok(encoded) => encoded,
                        Err(error) => panic!("event {event:?} does not encode: {error}"),
                    };
                    match A::Event::decode(
                        encoded.event_type,
                        encoded.schema_version,
                        &encoded.payload,
                    ) {
                        Ok(decoded) => assert_eq!(
                            &decoded, event,
                            "event does not survive encode/decode (payload {})",
                            encoded.payload
                        ),
                        Err(error) => panic!(
                            "event {event:?} does not decode from its own payload {}: {error}",
                            encoded.payload
                        ),
                    }
                }
            }
            Err(error) => {
                panic!("expected events {expected:?}, the command was rejected: {error:?}")
            }
        }
        self
    }

    /// Asserts that the command recorded no event.
    ///
    /// # Panics
    /// When it was rejected or recorded events.
    #[track_caller]
    pub fn then_expect_no_events(self) -> Self
    where
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        self.then_expect_events(Vec::new())
    }

    /// Asserts that the command was rejected with `expected`.
    ///
    /// # Panics
    /// When it was accepted, or rejected with another error.
    #[track_caller]
    pub fn then_expect_error(self, expected: A::Error) -> Self
    where
        A::Event: Debug,
        A::Error: PartialEq + Debug,
    {
        match &self.result {
            Ok(events) => panic!("expected error {expected:?}, the command recorded {events:?}"),
            Err(error) => assert_eq!(
                error, &expected,
                "the command was rejected with another error"
            ),
        }
        self
    }

    /// Asserts that the command was rejected with an error whose message is `message`.
    ///
    /// # Panics
    /// When it was accepted, or rejected with another message.
    #[track_caller]
    pub fn then_expect_error_message(self, message: &str) -> Self
    where
        A::Event: Debug,
    {
        match &self.result {
            Ok(events) => panic!("expected error `{message}`, the command recorded {events:?}"),
            Err(error) => assert_eq!(
                error.to_string(),
                message,
                "the command was rejected with another error"
            ),
        }
        self
    }

    /// Asserts that applying the recorded events leaves the state `check` accepts.
    ///
    /// # Panics
    /// When the command was rejected, or `check` panics.
    #[track_caller]
    pub fn then_state(self, check: impl FnOnce(&A)) -> Self
    where
        A::Error: Debug,
    {
        match &self.result {
            Ok(_) => check(&self.state),
            Err(error) => panic!("expected a new state, the command was rejected: {error:?}"),
        }
        self
    }

    /// The decision itself, for assertions of your own.
    pub fn into_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}

/// Polls `future` at most `polls` times, then drops it: a process dying at that point (between two
/// of its awaits), for crash tests of sagas and runners. `None` when it was cut.
pub async fn cut_after<F: Future>(polls: usize, future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut polled = 0;
    std::future::poll_fn(|cx| {
        polled += 1;
        if polled > polls {
            return std::task::Poll::Ready(None);
        }
        future.as_mut().poll(cx).map(Some)
    })
    .await
}
