#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

// Lets the derives' absolute `::evently_core::...` paths resolve inside this crate's own tests too.
#[allow(unused_extern_crates)] // used by the doctests and unit tests, not by the library
extern crate self as evently_core;

pub mod aggregate;
pub mod backoff;
pub mod command;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod envelope;
pub mod event;
pub mod gateway;
mod panic;
pub mod personal;
pub mod projection;
#[cfg(feature = "conformance")]
pub mod projection_conformance;
pub mod query;
pub mod saga;
pub mod store;
pub mod telemetry;
pub mod tenant;
pub mod testing;
pub mod trace;

pub use aggregate::{Aggregate, SnapshotPolicy};
pub use backoff::Backoff;
pub use command::{Command, CommandMetadata, StreamExpectation};
pub use envelope::{
    AggregateId, CausationId, Checkpoint, CommandId, CorrelationId, EventData, EventId,
    InvalidTenant, Metadata, Payload, RawStoredEvent, RecordedEvent, StoredEvent, StreamId,
    TenantId,
};
pub use event::{ApplyTo, DecodeError, DomainEvent, EncodedEvent, UpcastError};
pub use gateway::{CommandError, CommandGateway, Executed};
pub use panic::panic_message;
pub use query::{Query, QueryBus, QueryError, QueryHandler};
pub use store::{
    EventStore, EventStoreExt, ExpectedVersion, InMemoryEventStore, KeyRecord, MoveEvidence,
    Snapshot, SnapshotStore, StoreError, StoreMoved,
};

/// `#[derive(Aggregate)]`: implements [`Aggregate`](trait@Aggregate); see the crate docs.
#[cfg(feature = "derive")]
pub use evently_macros::Aggregate;
/// `#[derive(Command)]`: implements [`Command`](trait@Command); see the crate docs.
#[cfg(feature = "derive")]
pub use evently_macros::Command;
/// `#[derive(DomainEvent)]`: implements [`DomainEvent`](trait@DomainEvent); see the crate docs.
#[cfg(feature = "derive")]
pub use evently_macros::DomainEvent;
/// `#[derive(Projection)]`: implements [`Projection`](trait@projection::Projection); see
/// [`projection`].
#[cfg(feature = "derive")]
pub use evently_macros::Projection;
/// `#[derive(Saga)]`: implements [`Saga`](trait@saga::Saga) for an enum of steps; see [`saga`].
#[cfg(feature = "derive")]
pub use evently_macros::Saga;

/// The names almost every user of the framework needs.
pub mod prelude {
    pub use crate::aggregate::Aggregate;
    pub use crate::command::{Command, CommandMetadata};
    pub use crate::envelope::{AggregateId, Metadata, RecordedEvent, StreamId};
    pub use crate::event::DomainEvent;
    pub use crate::gateway::{CommandError, CommandGateway};
    pub use crate::projection::{Handles, Projection};
    pub use crate::saga::{Saga, StepKey};
    pub use crate::store::{EventStore, ExpectedVersion, InMemoryEventStore};
    #[cfg(feature = "derive")]
    pub use evently_macros::{Aggregate, Command, DomainEvent, Projection, Saga};
}

/// What the derives' generated code refers to. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    /// What a forgotten personal field reads as: its type's default, as JSON.
    #[must_use]
    pub fn forgotten<T: PersonalPlaceholder>() -> serde_json::Value {
        serde_json::to_value(T::default()).unwrap_or(serde_json::Value::Null)
    }

    /// A type a personal field may have: one with a default to read once it is forgotten.
    #[diagnostic::on_unimplemented(
        message = "personal field type `{Self}` has no `Default`: a forgotten personal field reads as its type's default",
        note = "implement (or derive) `Default` for `{Self}`, or wrap it in `Option<{Self}>` (read as `None` once forgotten)"
    )]
    pub trait PersonalPlaceholder: Default + serde::Serialize {}

    impl<T: Default + serde::Serialize> PersonalPlaceholder for T {}

    /// The error of a step index outside a saga's table (only reachable through a hand-written
    /// call of the generated dispatch).
    #[must_use]
    pub fn no_such_step(
        saga: &'static str,
        step: usize,
        compensate: bool,
    ) -> crate::saga::StepError {
        let what = if compensate { "compensation" } else { "step" };
        format!("saga `{saga}` has no {what} at index {step}").into()
    }

    pub use async_trait::async_trait;
    pub use futures::future::BoxFuture;
    pub use serde;
    pub use serde_json;

    /// Routes a decoded event to its handler, mapping the handler's error.
    pub async fn handle<P, E, T>(
        projection: &mut P,
        event: &crate::StoredEvent<T>,
        context: &mut P::Context,
    ) -> Result<bool, crate::projection::ProjectionError>
    where
        P: crate::projection::Projection + crate::projection::Handles<E, P::Context>,
        E: crate::DomainEvent,
        T: crate::Payload,
    {
        let recorded = event.to_recorded::<E>()?;
        projection
            .handle(&recorded, context)
            .await
            .map_err(|source| crate::projection::ProjectionError::Handler {
                projection: P::NAME,
                stream: event.stream.clone(),
                version: event.version,
                source,
            })?;
        Ok(true)
    }

    /// What a saga step's method returns: a future of `Result<(), E>`. A method that is not
    /// `async` (or whose output is not a `Result<(), E>`) is reported with this message at the
    /// step's method name, instead of "`Result<..>` is not a future" and a suggestion to remove an
    /// `.await` from the derive's code.
    #[diagnostic::on_unimplemented(
        message = "saga step methods are `async fn(&self, data: &mut Data, key: &StepKey) -> Result<(), E>`: this one returns `{Self}`",
        label = "make this method `async fn`, returning `Result<(), E>`",
        note = "`E` is any error that converts into `evently_core::saga::StepError` (a boxed error)"
    )]
    pub trait StepFuture<E>: Future<Output = Result<(), E>> {}

    #[diagnostic::do_not_recommend]
    impl<E, F: Future<Output = Result<(), E>>> StepFuture<E> for F {}

    /// Runs a saga step's future, its error boxed.
    pub fn step<'a, E, F>(future: F) -> BoxFuture<'a, Result<(), crate::saga::StepError>>
    where
        E: Into<crate::saga::StepError>,
        F: StepFuture<E> + Send + 'a,
    {
        Box::pin(async move { future.await.map_err(Into::into) })
    }

    /// A state with `snapshot(...)` is stored as JSON.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` has `snapshot(...)` but cannot be stored as a snapshot",
        note = "derive `serde::Serialize` and `serde::Deserialize` for `{Self}` (a snapshot is the state as JSON), or remove `snapshot(...)`"
    )]
    pub trait SnapshotState: serde::Serialize + serde::de::DeserializeOwned {}

    impl<T: serde::Serialize + serde::de::DeserializeOwned> SnapshotState for T {}

    /// Checks at compile time that `T` can be snapshotted.
    pub const fn snapshot_state<T: SnapshotState>() {}

    /// Decodes a payload into a variant's fields, mapping serde's error.
    pub fn decode_payload<T: serde::de::DeserializeOwned>(
        event_type: &'static str,
        schema_version: u32,
        payload: &serde_json::Value,
    ) -> Result<T, crate::event::DecodeError> {
        T::deserialize(payload).map_err(|error| crate::event::DecodeError::Payload {
            event_type,
            schema_version,
            message: error.to_string(),
        })
    }

    /// Decodes a payload's JSON text into a variant's fields, mapping serde's error.
    pub fn decode_payload_str<T: serde::de::DeserializeOwned>(
        event_type: &'static str,
        schema_version: u32,
        json: &str,
    ) -> Result<T, crate::event::DecodeError> {
        serde_json::from_str(json).map_err(|error| crate::event::DecodeError::Payload {
            event_type,
            schema_version,
            message: error.to_string(),
        })
    }

    /// Parses a payload's JSON text, for the paths that need a value (upcasting).
    pub fn parse_json(
        event_type: &str,
        schema_version: u32,
        json: &str,
    ) -> Result<serde_json::Value, crate::event::DecodeError> {
        crate::event::parse_json(event_type, schema_version, json)
    }

    /// Encodes a variant's fields, mapping serde's error.
    pub fn encode_payload<T: serde::Serialize + ?Sized>(
        event_type: &'static str,
        fields: &T,
    ) -> Result<serde_json::Value, crate::event::EncodeError> {
        serde_json::to_value(fields)
            .map_err(|source| crate::event::EncodeError { event_type, source })
    }

    /// Runs one upcaster, mapping its error.
    pub fn upcast(
        event_type: &'static str,
        from: u32,
        upcaster: fn(serde_json::Value) -> Result<serde_json::Value, crate::event::UpcastError>,
        payload: serde_json::Value,
    ) -> Result<serde_json::Value, crate::event::DecodeError> {
        upcaster(payload).map_err(|error| crate::event::DecodeError::Upcast {
            event_type,
            from,
            message: error.0,
        })
    }

    /// Makes the error for a schema version with no decoder.
    #[must_use]
    pub const fn unsupported_version(
        event_type: &'static str,
        found: u32,
        oldest: u32,
        current: u32,
    ) -> crate::event::DecodeError {
        crate::event::DecodeError::UnsupportedVersion {
            event_type,
            found,
            oldest,
            current,
        }
    }

    /// Makes the error for an unknown type name.
    #[must_use]
    pub fn unknown_type(
        event_type: &str,
        known: &'static [&'static str],
    ) -> crate::event::DecodeError {
        crate::event::DecodeError::UnknownType {
            event_type: event_type.to_owned(),
            known,
        }
    }
}
