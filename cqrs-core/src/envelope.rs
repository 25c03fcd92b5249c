//! Identifiers, metadata and the envelopes events travel in.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered id (UUID v7).
            #[must_use]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id as a UUID.
            #[must_use]
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

uuid_id! {
    /// The unique id of one event. Appends are idempotent by this id: appending the same ids again
    /// after an unknown outcome is recognised, never duplicated.
    EventId
}
uuid_id! {
    /// The id of one command; it becomes the causation id of the events the command records.
    CommandId
}
uuid_id! {
    /// Ties together every message caused, directly or not, by one original request.
    CorrelationId
}
uuid_id! {
    /// The id of the message (command or event) that directly caused an event.
    CausationId
}

impl From<CommandId> for CausationId {
    fn from(id: CommandId) -> Self {
        Self(id.0)
    }
}

impl From<EventId> for CausationId {
    fn from(id: EventId) -> Self {
        Self(id.0)
    }
}

/// The id of one aggregate instance, unique within its aggregate type.
///
/// Any string works; UUIDs convert with `From`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AggregateId(String);

impl AggregateId {
    /// Wraps an id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// A new random, time-ordered id (UUID v7).
    #[must_use]
    pub fn generate() -> Self {
        Self(Uuid::now_v7().to_string())
    }

    /// The id as a string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl From<String> for AggregateId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl From<&str> for AggregateId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

impl From<&String> for AggregateId {
    fn from(id: &String) -> Self {
        Self(id.clone())
    }
}

impl From<Uuid> for AggregateId {
    fn from(id: Uuid) -> Self {
        Self(id.to_string())
    }
}

impl From<&AggregateId> for AggregateId {
    fn from(id: &AggregateId) -> Self {
        id.clone()
    }
}

/// A stream: the events of one aggregate instance, identified by its type and id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamId {
    /// The aggregate type, e.g. `"order"` (from `#[aggregate(name = "order")]`).
    pub aggregate_type: String,
    /// The aggregate instance.
    pub aggregate_id: AggregateId,
}

impl StreamId {
    /// The stream of `aggregate_id` of type `aggregate_type`.
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: impl Into<AggregateId>) -> Self {
        Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({self})")
    }
}

/// A tenant: whose data an event, a stream, a checkpoint or a message is.
///
/// 1 to 63 bytes of ASCII letters, digits, `_` and `-` (a UUID fits), so that it can name a
/// PostgreSQL schema, a broker header and a key prefix without escaping. Streams of different
/// tenants never collide: a store scoped to a tenant (see [`crate::tenant`]) sees only its
/// tenant's streams, keys, snapshots and events, and stamps its tenant on every event it appends.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

/// A text that is not a [`TenantId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a tenant id: expected 1 to 63 ASCII letters, digits, `_` or `-`")]
pub struct InvalidTenant(pub String);

impl TenantId {
    /// The longest tenant id, in bytes (a PostgreSQL identifier's limit).
    pub const MAX_LEN: usize = 63;

    /// Checks and wraps `id`.
    ///
    /// # Errors
    /// [`InvalidTenant`] (with the first 64 characters of `id`) when it is empty, longer than
    /// [`MAX_LEN`](Self::MAX_LEN) or holds anything but ASCII letters, digits, `_` and `-`.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidTenant> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(id))
        } else {
            Err(InvalidTenant(id.chars().take(64).collect()))
        }
    }

    /// The id as a string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        Self::new(id).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for TenantId {
    type Err = InvalidTenant;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        Self::new(id)
    }
}

impl TryFrom<&str> for TenantId {
    type Error = InvalidTenant;

    fn try_from(id: &str) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl TryFrom<String> for TenantId {
    type Error = InvalidTenant;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

/// What is known about why an event was recorded, stored beside its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metadata {
    /// The correlation id of the request that led here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<CorrelationId>,
    /// The message that directly caused this event (for the command gateway: the command id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<CausationId>,
    /// The user on whose behalf the command ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The tenant whose data the event is: stamped by a store scoped to a tenant on every event
    /// it appends (an event that names another tenant is refused), absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Extra headers, for what the fields above do not cover (trace context, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// Metadata with a correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Metadata with a causation id.
    #[must_use]
    pub fn with_causation_id(mut self, id: impl Into<CausationId>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Metadata with a user id.
    #[must_use]
    pub fn with_user_id(mut self, user: impl Into<String>) -> Self {
        self.user_id = Some(user.into());
        self
    }

    /// Metadata with a tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Metadata with one more header.
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }
}

/// A position in the store's global order.
///
/// Events are ordered by `(transaction, position)`: `transaction` orders commits (the PostgreSQL store
/// uses the writing transaction's id, the in-memory store a commit counter) and `position` orders events
/// inside one commit. A reader keeps the checkpoint of the last event it handled and asks for what comes
/// after it; [`Checkpoint::START`] is before everything.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Checkpoint {
    /// The committing transaction (or commit number).
    pub transaction: u64,
    /// The global position, unique per event.
    pub position: u64,
}

impl Checkpoint {
    /// Before the first event.
    pub const START: Self = Self {
        transaction: 0,
        position: 0,
    };

    /// A checkpoint at `(transaction, position)`.
    #[must_use]
    pub const fn new(transaction: u64, position: u64) -> Self {
        Self {
            transaction,
            position,
        }
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transaction, self.position)
    }
}

/// A text that is not a checkpoint (`<transaction>:<position>`, as [`Checkpoint`] displays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a checkpoint: expected `<transaction>:<position>`, two unsigned integers")]
pub struct ParseCheckpointError(pub String);

impl std::str::FromStr for Checkpoint {
    type Err = ParseCheckpointError;

    /// Parses what [`Display`](fmt::Display) writes, so a checkpoint can travel in a URL or a
    /// header (read-your-writes across a service boundary).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseCheckpointError(text.chars().take(64).collect());
        let (transaction, position) = text.split_once(':').ok_or_else(invalid)?;
        let number = |s: &str| {
            // `u64::from_str` takes a leading `+`: the display never writes one.
            s.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| s.parse::<u64>().ok())
                .flatten()
        };
        match (number(transaction), number(position)) {
            (Some(transaction), Some(position)) => Ok(Self::new(transaction, position)),
            _ => Err(invalid()),
        }
    }
}

/// An event ready to append: encoded, with its id and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct EventData {
    /// The event's id; appends are idempotent by it.
    pub event_id: EventId,
    /// The stable type name, e.g. `"OrderCreated"`.
    pub event_type: String,
    /// The schema version of `payload`.
    pub schema_version: u32,
    /// The event's fields as JSON.
    pub payload: serde_json::Value,
    /// Correlation, causation, user and headers.
    pub metadata: Metadata,
}

impl EventData {
    /// Encodes a domain event with a new event id.
    ///
    /// # Errors
    /// When the event's fields fail to serialize (a map with non-string keys, a failing `Serialize`).
    pub fn from_event<E: crate::DomainEvent>(
        event: &E,
        metadata: Metadata,
    ) -> Result<Self, crate::event::EncodeError> {
        let encoded = event.encode()?;
        Ok(Self {
            event_id: EventId::new(),
            event_type: encoded.event_type.to_owned(),
            schema_version: encoded.schema_version,
            payload: encoded.payload,
            metadata,
        })
    }

    /// The same event with another id.
    #[must_use]
    pub fn with_event_id(mut self, id: EventId) -> Self {
        self.event_id = id;
        self
    }
}

/// An event as the store holds it: still encoded, with where and when it was recorded.
///
/// The payload is parsed JSON by default; a publisher that forwards events without looking into
/// them reads [`RawStoredEvent`]s, whose payload is the stored JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent<P = serde_json::Value> {
    /// The event's id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its version in the stream: 1 for the first event.
    pub version: u64,
    /// Its place in the global order.
    pub checkpoint: Checkpoint,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// The stable type name.
    pub event_type: String,
    /// The schema version of `payload`.
    pub schema_version: u32,
    /// The event's fields as JSON.
    pub payload: P,
    /// Correlation, causation, user and headers.
    pub metadata: Metadata,
}

/// A stored event whose payload is the JSON text the store holds, not parsed: what a publisher
/// forwarding events reads (`PostgresEventStore::read_all_raw`), since parsing a payload only to
/// write it out again is most of the cost of forwarding it.
pub type RawStoredEvent = StoredEvent<Box<serde_json::value::RawValue>>;

/// How a stored event's payload is held: parsed ([`serde_json::Value`], what
/// [`StoredEvent`] holds by default) or as the JSON text the store holds
/// (`Box<RawValue>`, in a [`RawStoredEvent`]). Either decodes into a domain event; from the text
/// the derive deserializes a current-version payload directly, with no `Value` built on the way.
pub trait Payload: Clone + fmt::Debug + Send + Sync + 'static + sealed::Sealed {
    /// Decodes the payload into `E` ([`DomainEvent::decode`](crate::DomainEvent::decode) or
    /// [`DomainEvent::decode_json`](crate::DomainEvent::decode_json)).
    ///
    /// # Errors
    /// As [`DomainEvent::decode`](crate::DomainEvent::decode).
    fn decode_into<E: crate::DomainEvent>(
        &self,
        event_type: &str,
        schema_version: u32,
    ) -> Result<E, crate::DecodeError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for serde_json::Value {}
    impl Sealed for Box<serde_json::value::RawValue> {}
}

impl Payload for serde_json::Value {
    fn decode_into<E: crate::DomainEvent>(
        &self,
        event_type: &str,
        schema_version: u32,
    ) -> Result<E, crate::DecodeError> {
        E::decode(event_type, schema_version, self)
    }
}

impl Payload for Box<serde_json::value::RawValue> {
    fn decode_into<E: crate::DomainEvent>(
        &self,
        event_type: &str,
        schema_version: u32,
    ) -> Result<E, crate::DecodeError> {
        E::decode_json(event_type, schema_version, self.get())
    }
}

impl<P> StoredEvent<P> {
    /// The same event with its payload turned into another form by `f`, the envelope moved.
    pub fn map_payload<Q>(self, f: impl FnOnce(P) -> Q) -> StoredEvent<Q> {
        StoredEvent {
            event_id: self.event_id,
            stream: self.stream,
            version: self.version,
            checkpoint: self.checkpoint,
            recorded_at: self.recorded_at,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload: f(self.payload),
            metadata: self.metadata,
        }
    }
}

/// A recorded event, decoded: the domain event with its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent<E> {
    /// The event's id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its version in the stream: 1 for the first event.
    pub version: u64,
    /// Its place in the global order.
    pub checkpoint: Checkpoint,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Correlation, causation, user and headers.
    pub metadata: Metadata,
    /// The domain event.
    pub event: E,
}
