//! A given/then fixture for projections: events in, read model out, through the same engine
//! (decoding, routing, retries, dead letters) the runners use, on the in-memory store.
//!
//! ```
//! # use evently_core::projection::{Projection, ProjectionFixture};
//! # async fn doc<P: Projection<Context = ()>, E: evently_core::DomainEvent>(
//! #     summary: P,
//! #     placed: E,
//! #     paid: E,
//! #     count: fn(&P) -> usize,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! ProjectionFixture::new(summary)
//!     .given("order-1", [placed, paid])
//!     .caught_up()
//!     .await?
//!     .then(|summary| assert_eq!(count(summary), 1))
//!     .then_no_dead_letters();
//! # Ok(()) }
//! ```
//!
//! Read models kept in PostgreSQL tables (`Context = PgConnection`) have the same fixture in
//! `cqrs-postgres` (`caught_up_in(&store)`), run by the PostgreSQL worker.

use std::collections::HashMap;

use super::Projection;
use super::failure::DeadLetter;
use super::memory::InMemoryDeadLetters;
use super::runner::ProjectionRunner;
use crate::envelope::{AggregateId, Checkpoint, EventData, Metadata, StreamId};
use crate::event::{DomainEvent, EncodeError};
use crate::store::{EventStore, ExpectedVersion, InMemoryEventStore, StoreError};

/// Why a fixture's events could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A given event does not encode.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A given event's enum belongs to no aggregate, so its stream is unknown.
    #[error(
        "`{event_type}` belongs to no aggregate (no `#[event(aggregate = ...)]`): give its events \
         with `given_in(StreamId::new(\"<aggregate type>\", id), events)`"
    )]
    NoAggregateType {
        /// The event's type name.
        event_type: &'static str,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The *given* half: a projection and the events it is to be fed, in the order they are given
/// (which becomes their order in the store's global order).
pub struct ProjectionFixture<P: Projection> {
    projection: P,
    given: Vec<(StreamId, EventData)>,
    /// The first given event that could not be stored, reported when the events are stored.
    invalid: Option<FixtureError>,
}

impl<P: Projection> std::fmt::Debug for ProjectionFixture<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionFixture")
            .field("projection", &P::NAME)
            .field("given", &self.given.len())
            .finish_non_exhaustive()
    }
}

impl<P: Projection> ProjectionFixture<P> {
    /// A fixture of `projection` (in its initial state) with no events yet.
    pub fn new(projection: P) -> Self {
        Self {
            projection,
            given: Vec::new(),
            invalid: None,
        }
    }

    /// Adds `events` of the aggregate `id` (of the aggregate type `E` belongs to), after the
    /// events given before.
    #[must_use]
    pub fn given<E: DomainEvent>(
        self,
        id: impl Into<AggregateId>,
        events: impl IntoIterator<Item = E>,
    ) -> Self {
        self.given_with(id, events, Metadata::default())
    }

    /// [`given`](Self::given) with `metadata` on each event (a user id, headers: what handlers
    /// read from the envelope).
    #[must_use]
    pub fn given_with<E: DomainEvent>(
        mut self,
        id: impl Into<AggregateId>,
        events: impl IntoIterator<Item = E>,
        metadata: Metadata,
    ) -> Self {
        match E::AGGREGATE_TYPE {
            Some(aggregate_type) => {
                self.push(StreamId::new(aggregate_type, id), events, &metadata);
            }
            None => {
                let first = events.into_iter().next();
                if let (None, Some(event)) = (&self.invalid, first) {
                    self.invalid = Some(FixtureError::NoAggregateType {
                        event_type: event.event_type(),
                    });
                }
            }
        }
        self
    }

    /// Adds `events` to `stream` (for event enums that belong to no aggregate).
    #[must_use]
    pub fn given_in<E: DomainEvent>(
        mut self,
        stream: StreamId,
        events: impl IntoIterator<Item = E>,
    ) -> Self {
        self.push(stream, events, &Metadata::default());
        self
    }

    fn push<E: DomainEvent>(
        &mut self,
        stream: StreamId,
        events: impl IntoIterator<Item = E>,
        metadata: &Metadata,
    ) {
        for event in events {
            match EventData::from_event(&event, metadata.clone()) {
                Ok(data) => self.given.push((stream.clone(), data)),
                Err(error) => {
                    self.invalid.get_or_insert(FixtureError::Encode(error));
                }
            }
        }
    }

    /// How many events are given.
    #[must_use]
    pub fn len(&self) -> usize {
        self.given.len()
    }

    /// Whether no event is given.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.given.is_empty()
    }

    /// Appends the given events to `store` in the order given (each stream continuing from its
    /// current version) and returns the checkpoint of the last one: the adapter for stores other
    /// than the in-memory one, which then run the projection their own way.
    ///
    /// # Errors
    /// The first given event that could not be encoded or placed in a stream, or the store's.
    pub async fn append_to<S: EventStore + ?Sized>(
        &mut self,
        store: &S,
    ) -> Result<Option<Checkpoint>, FixtureError> {
        if let Some(invalid) = self.invalid.take() {
            return Err(invalid);
        }
        let mut last = None;
        // Consecutive events of one stream go in one append (one commit), as a command's would.
        let mut given = std::mem::take(&mut self.given).into_iter().peekable();
        let mut versions: HashMap<StreamId, u64> = HashMap::new();
        while let Some((stream, first)) = given.next() {
            let mut batch = vec![first];
            while let Some((_, next)) = given.next_if(|(next, _)| *next == stream) {
                batch.push(next);
            }
            let version = match versions.get(&stream) {
                Some(version) => *version,
                None => store.stream_version(&stream).await?,
            };
            let appended = store
                .append(&stream, ExpectedVersion::Exact(version), batch)
                .await?;
            versions.insert(stream, appended.version);
            last = appended.events.last().map(|e| e.checkpoint).or(last);
        }
        Ok(last)
    }

    /// The projection, in the state it was given in.
    pub fn into_projection(self) -> P {
        self.projection
    }

    /// Feeds the given events to the projection through a [`ProjectionRunner`] on an
    /// [`InMemoryEventStore`], handlers writing through `P::Context::default()`, and returns what
    /// came of it.
    ///
    /// # Errors
    /// As [`append_to`](Self::append_to). A handler's failure is no error: the event is retried
    /// and parked as a dead letter, as in production; assert with
    /// [`CaughtUp::then_no_dead_letters`] or [`CaughtUp::then_dead_letters`].
    pub async fn caught_up(self) -> Result<CaughtUp<P>, FixtureError>
    where
        P::Context: Default + Sized,
    {
        self.caught_up_with(P::Context::default()).await
    }

    /// [`caught_up`](Self::caught_up) with handlers writing through `context`.
    ///
    /// # Errors
    /// As [`caught_up`](Self::caught_up).
    pub async fn caught_up_with(mut self, context: P::Context) -> Result<CaughtUp<P>, FixtureError>
    where
        P::Context: Sized,
    {
        let store = InMemoryEventStore::new();
        self.append_to(&store).await?;
        let dead_letters = InMemoryDeadLetters::new();
        let mut runner = ProjectionRunner::new(store, self.projection, context)
            .with_dead_letters(dead_letters.clone());
        let applied = runner.catch_up().await?;
        let checkpoint = runner.checkpoint().await?;
        let (projection, context) = runner.into_parts();
        Ok(CaughtUp {
            projection,
            context,
            dead_letters: dead_letters.list(P::NAME),
            applied,
            checkpoint,
        })
    }
}

/// The *then* half: the projection after it caught up with the given events.
pub struct CaughtUp<P: Projection>
where
    P::Context: Sized,
{
    projection: P,
    context: P::Context,
    dead_letters: Vec<DeadLetter>,
    applied: usize,
    checkpoint: Checkpoint,
}

impl<P: Projection> std::fmt::Debug for CaughtUp<P>
where
    P::Context: Sized,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaughtUp")
            .field("projection", &P::NAME)
            .field("applied", &self.applied)
            .field("dead_letters", &self.dead_letters)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl<P: Projection> CaughtUp<P>
where
    P::Context: Sized,
{
    /// Checks the read model (the projection's own state).
    pub fn then(self, check: impl FnOnce(&P)) -> Self {
        check(&self.projection);
        self
    }

    /// Checks what the handlers wrote through their context.
    pub fn then_context(self, check: impl FnOnce(&P::Context)) -> Self {
        check(&self.context);
        self
    }

    /// Asserts that every given event was applied (none parked as a dead letter).
    ///
    /// # Panics
    /// When an event was parked, naming each with its error.
    #[track_caller]
    pub fn then_no_dead_letters(self) -> Self {
        assert_no_dead_letters(P::NAME, &self.dead_letters);
        self
    }

    /// Checks the dead letters (in the order they were parked).
    pub fn then_dead_letters(self, check: impl FnOnce(&[DeadLetter])) -> Self {
        check(&self.dead_letters);
        self
    }

    /// How many events the projection applied (the given events it subscribes to, less those
    /// parked).
    #[must_use]
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// The checkpoint the projection reached.
    #[must_use]
    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint
    }

    /// The projection and its context.
    pub fn into_parts(self) -> (P, P::Context) {
        (self.projection, self.context)
    }
}

/// The assertion of `then_no_dead_letters`, shared by the fixtures of every store.
///
/// # Panics
/// When `dead_letters` is not empty, naming each parked event (stream, version) and its error.
#[track_caller]
pub fn assert_no_dead_letters(projection: &str, dead_letters: &[DeadLetter]) {
    if dead_letters.is_empty() {
        return;
    }
    let lines = dead_letters
        .iter()
        .map(|l| format!("  event {} of {}: {}", l.version, l.stream, l.error))
        .collect::<Vec<_>>()
        .join("\n");
    panic!(
        "projection `{projection}` parked {} event(s) as dead letters:\n{lines}",
        dead_letters.len()
    );
}
