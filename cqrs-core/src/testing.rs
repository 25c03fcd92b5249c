//! A given/when/then fixture for aggregates: test domain logic without a store.
//!
//! ```
//! # use evently_core::testing::AggregateFixture;
//! # fn doc<A: evently_core::Aggregate>(given: Vec<A::Event>, command: A::Command, expected: Vec<A::Event>)
//! # where A::Event: PartialEq + std::fmt::Debug, A::Error: std::fmt::Debug {
//! AggregateFixture::<A>::given(given)
//!     .when(command)
//!     .then_expect_events(expected);
//! # }
//! ```

use std::fmt::Debug;

use crate::aggregate::Aggregate;
use crate::command::{Command, StreamExpectation};
use crate::event::DomainEvent;

/// The *given* half: an aggregate rebuilt from past events.
#[derive(Debug)]
pub struct AggregateFixture<A> {
    state: A,
    /// How many events it recorded (the stream's version).
    version: u64,
}

impl<A: Aggregate> AggregateFixture<A> {
    /// An aggregate with no history.
    #[must_use]
    pub fn given_no_previous_events() -> Self {
        Self {
            state: A::initial(),
            version: 0,
        }
    }

    /// An aggregate that recorded `events`.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::initial();
        let mut version = 0;
        for event in events {
            state.apply(&event);
            version += 1;
        }
        Self { state, version }
    }

    /// The *when*: decides `command` against the state, as the command gateway would: a command
    /// that needs an existing aggregate, given no events, is not decided (the gateway answers
    /// `NotFound`; assert it with [`FixtureResult::then_expect_not_found`]), nor is a creating
    /// command given events (`AlreadyExists`).
    pub fn when(mut self, command: A::Command) -> FixtureResult<A> {
        let decision = match (command.expectation(), self.version) {
            (StreamExpectation::MustExist, 0) => Decision::NotFound,
            (StreamExpectation::MustNotExist, version) if version > 0 => Decision::AlreadyExists,
            _ => match self.state.handle(command) {
                Ok(events) => {
                    for event in &events {
                        self.state.apply(event);
                    }
                    Decision::Recorded(events)
                }
                Err(error) => Decision::Rejected(error),
            },
        };
        FixtureResult {
            state: self.state,
            result: decision,
        }
    }
}

/// What the *when* came to.
enum Decision<A: Aggregate> {
    Recorded(Vec<A::Event>),
    Rejected(A::Error),
    /// The command needs an existing aggregate and there was none.
    NotFound,
    /// The command creates the aggregate and there was one.
    AlreadyExists,
}

impl<A: Aggregate> Debug for Decision<A>
where
    A::Event: Debug,
    A::Error: Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Recorded(events) => f.debug_tuple("Recorded").field(events).finish(),
            Self::Rejected(error) => f.debug_tuple("Rejected").field(error).finish(),
            Self::NotFound => f.write_str("NotFound"),
            Self::AlreadyExists => f.write_str("AlreadyExists"),
        }
    }
}

impl<A: Aggregate> Decision<A> {
    /// The recorded events, or a panic message saying what happened instead.
    fn recorded(&self) -> Result<&Vec<A::Event>, String>
    where
        A::Error: Debug,
    {
        match self {
            Self::Recorded(events) => Ok(events),
            Self::Rejected(error) => Err(format!("the command was rejected: {error:?}")),
            Self::NotFound => Err(
                "the command needs an existing aggregate and `given` recorded no event: the gateway answers NotFound (use then_expect_not_found, or give the creating events)".to_owned(),
            ),
            Self::AlreadyExists => Err(
                "the command creates the aggregate and `given` recorded events: the gateway answers AlreadyExists (use then_expect_already_exists)".to_owned(),
            ),
        }
    }
}

/// The *then*: what the command decided and the state after it, with assertions.
pub struct FixtureResult<A: Aggregate> {
    state: A,
    result: Decision<A>,
}

impl<A: Aggregate + Debug> Debug for FixtureResult<A>
where
    A::Event: Debug,
    A::Error: Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixtureResult")
            .field("state", &self.state)
            .field("result", &self.result)
            .finish()
    }
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
        match self.result.recorded() {
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
            Err(what) => panic!("expected events {expected:?}; {what}"),
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
            Decision::Rejected(error) => assert_eq!(
                error, &expected,
                "the command was rejected with another error"
            ),
            Decision::Recorded(events) => {
                panic!("expected error {expected:?}, the command recorded {events:?}")
            }
            other => panic!("expected error {expected:?}, got {other:?}"),
        }
        self
    }

    /// Asserts that the gateway would answer `NotFound`: the command needs an existing aggregate
    /// and `given` recorded no event.
    ///
    /// # Panics
    /// When the command was decided.
    #[track_caller]
    pub fn then_expect_not_found(self) -> Self
    where
        A::Event: Debug,
        A::Error: Debug,
    {
        assert!(
            matches!(self.result, Decision::NotFound),
            "expected NotFound, got {:?}",
            self.result
        );
        self
    }

    /// Asserts that the gateway would answer `AlreadyExists`: the command creates the aggregate
    /// and `given` recorded events.
    ///
    /// # Panics
    /// When the command was decided.
    #[track_caller]
    pub fn then_expect_already_exists(self) -> Self
    where
        A::Event: Debug,
        A::Error: Debug,
    {
        assert!(
            matches!(self.result, Decision::AlreadyExists),
            "expected AlreadyExists, got {:?}",
            self.result
        );
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
            Decision::Rejected(error) => assert_eq!(
                error.to_string(),
                message,
                "the command was rejected with another error"
            ),
            Decision::Recorded(events) => {
                panic!("expected error `{message}`, the command recorded {events:?}")
            }
            Decision::NotFound => {
                panic!("expected error `{message}`, the aggregate does not exist (NotFound)")
            }
            Decision::AlreadyExists => {
                panic!("expected error `{message}`, the aggregate exists already (AlreadyExists)")
            }
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
        match self.result.recorded() {
            Ok(_) => check(&self.state),
            Err(what) => panic!("expected a new state; {what}"),
        }
        self
    }

    /// The decision itself, for assertions of your own.
    ///
    /// # Panics
    /// When the gateway would not have decided the command (`NotFound`, `AlreadyExists`): assert
    /// those with [`then_expect_not_found`](Self::then_expect_not_found) and
    /// [`then_expect_already_exists`](Self::then_expect_already_exists).
    #[track_caller]
    pub fn into_result(self) -> Result<Vec<A::Event>, A::Error>
    where
        A::Error: Debug,
    {
        match self.result {
            Decision::Recorded(events) => Ok(events),
            Decision::Rejected(error) => Err(error),
            other => panic!("{}", other.recorded().err().unwrap_or_default()),
        }
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
