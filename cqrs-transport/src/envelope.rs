//! What a message carries on every broker: the event envelope (JSON by default) and its headers.

use chrono::{DateTime, Utc};
use evently_core::{
    AggregateId, Checkpoint, EventId, Metadata, RawStoredEvent, StoredEvent, StreamId,
};
use serde::Deserialize;

/// The header names the relay sets on every message.
pub mod header {
    /// The event id (a UUID).
    pub const EVENT_ID: &str = "cqrs-event-id";
    /// The event type name.
    pub const EVENT_TYPE: &str = "cqrs-event-type";
    /// The schema version of the payload.
    pub const SCHEMA_VERSION: &str = "cqrs-schema-version";
    /// The aggregate type.
    pub const AGGREGATE_TYPE: &str = "cqrs-aggregate-type";
    /// The correlation id, when the event has one.
    pub const CORRELATION_ID: &str = "cqrs-correlation-id";
    /// The causation id, when the event has one.
    pub const CAUSATION_ID: &str = "cqrs-causation-id";
    /// The tenant whose event it is, when the event has one (see `evently_core::tenant`).
    pub const TENANT: &str = "cqrs-tenant";
    /// The W3C trace context of the command that recorded the event, when it ran in a trace.
    pub const TRACEPARENT: &str = evently_core::trace::TRACEPARENT;
    /// The serializer's content type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// On a dead letter: why the consumer gave up.
    pub const DLQ_ERROR: &str = "cqrs-dlq-error";
    /// On a dead letter: how many times the handler was tried (0 for a malformed message).
    pub const DLQ_ATTEMPTS: &str = "cqrs-dlq-attempts";
    /// On a dead letter: the consumer (group) that gave up.
    pub const DLQ_CONSUMER: &str = "cqrs-dlq-consumer";
    /// On a dead letter: where the message was consumed from (topic, queue or subject).
    pub const DLQ_TOPIC: &str = "cqrs-dlq-topic";
    /// On a dead letter: the original partition.
    pub const DLQ_PARTITION: &str = "cqrs-dlq-partition";
    /// On a dead letter: the original offset.
    pub const DLQ_OFFSET: &str = "cqrs-dlq-offset";
}

/// A message that is not an event this framework can read: never retried, sent to the
/// dead-letter place (topic, queue, stream) with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedMessage {
    /// The message has no value.
    #[error("the message has no value")]
    Empty,
    /// The value is not the envelope (bad JSON, missing fields, wrong types).
    #[error("the value is not an event envelope: {0}")]
    NotAnEnvelope(String),
    /// The envelope decodes but its event does not (unknown type, newer schema, bad payload).
    #[error("the event does not decode: {0}")]
    Undecodable(String),
}

/// Why an event could not be serialized for a broker.
#[derive(Debug, thiserror::Error)]
#[error("event {event_id} ({event_type}) of {stream} does not serialize: {reason}")]
pub struct SerializeError {
    /// The event.
    pub event_id: EventId,
    /// Its stream.
    pub stream: StreamId,
    /// Its type.
    pub event_type: String,
    /// What the serializer said.
    pub reason: String,
}

/// How events become message values and back: [`JsonEnvelope`] by default; implement it for
/// Avro, Protobuf or a house format.
pub trait EventSerializer: Send + Sync + 'static {
    /// The `content-type` header of the messages.
    fn content_type(&self) -> &'static str;

    /// The message value of `event`.
    ///
    /// # Errors
    /// [`SerializeError`] naming the event when it cannot be encoded.
    fn serialize(&self, event: &StoredEvent) -> Result<Vec<u8>, SerializeError>;

    /// Appends the message value of `event`, read with its payload as the stored JSON text, to
    /// `out` (the relay writes a page's values into one buffer). By default the payload is
    /// parsed and [`serialize`](Self::serialize) called; [`JsonEnvelope`] copies the text into the
    /// envelope instead. Override it when the format can use the JSON text as it is.
    ///
    /// # Errors
    /// [`SerializeError`] naming the event; `out` may then hold part of the value.
    fn serialize_raw_into(
        &self,
        event: &RawStoredEvent,
        out: &mut Vec<u8>,
    ) -> Result<(), SerializeError> {
        let parsed = event.parse().map_err(|e| SerializeError {
            event_id: event.event_id,
            stream: event.stream.clone(),
            event_type: event.event_type.clone(),
            reason: e.to_string(),
        })?;
        out.extend_from_slice(&self.serialize(&parsed)?);
        Ok(())
    }

    /// The event in a message value.
    ///
    /// # Errors
    /// [`MalformedMessage`] saying what is wrong with the value.
    fn deserialize(&self, value: &[u8]) -> Result<StoredEvent, MalformedMessage>;
}

/// The event envelope as JSON: every field of the stored event, payload and metadata as JSON
/// objects, so any consumer (in any language) reads it without this crate.
///
/// ```json
/// {"event_id":"0193…","aggregate_type":"order","aggregate_id":"o-1","version":1,
///  "event_type":"OrderCreated","schema_version":1,"payload":{…},"metadata":{…},
///  "recorded_at":"2026-11-30T…Z","checkpoint":{"transaction":812,"position":17}}
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonEnvelope;

#[derive(Deserialize)]
struct Envelope {
    event_id: EventId,
    aggregate_type: String,
    aggregate_id: AggregateId,
    version: u64,
    event_type: String,
    schema_version: u32,
    payload: serde_json::Value,
    #[serde(default)]
    metadata: Metadata,
    recorded_at: DateTime<Utc>,
    #[serde(default)]
    checkpoint: Checkpoint,
}

impl EventSerializer for JsonEnvelope {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn serialize(&self, event: &StoredEvent) -> Result<Vec<u8>, SerializeError> {
        let mut out = Vec::with_capacity(256);
        write_envelope(event, &mut out)?;
        Ok(out)
    }

    fn serialize_raw_into(
        &self,
        event: &RawStoredEvent,
        out: &mut Vec<u8>,
    ) -> Result<(), SerializeError> {
        write_envelope(event, out)
    }

    fn deserialize(&self, value: &[u8]) -> Result<StoredEvent, MalformedMessage> {
        let e: Envelope = serde_json::from_slice(value)
            .map_err(|e| MalformedMessage::NotAnEnvelope(e.to_string()))?;
        if e.aggregate_type.is_empty() || e.event_type.is_empty() || e.version == 0 {
            return Err(MalformedMessage::NotAnEnvelope(
                "empty aggregate type or event type, or version 0".to_owned(),
            ));
        }
        Ok(StoredEvent {
            event_id: e.event_id,
            stream: StreamId::new(e.aggregate_type, e.aggregate_id),
            version: e.version,
            checkpoint: e.checkpoint,
            recorded_at: e.recorded_at,
            event_type: e.event_type,
            schema_version: e.schema_version,
            payload: e.payload,
            metadata: e.metadata,
        })
    }
}

/// A payload the envelope writer can put in place: the stored JSON text as it is, or a parsed
/// value serialized.
trait PayloadJson {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
}

impl PayloadJson for serde_json::Value {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(out, self)
    }
}

impl PayloadJson for Box<serde_json::value::RawValue> {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(self.get().as_bytes());
        Ok(())
    }
}

/// Writes the envelope of `event` (its payload parsed or raw) as JSON to `out`, field by field:
/// the bytes `serde_json` writes for the envelope struct (a test holds them equal), without
/// going through `fmt` for the ids, numbers and the time, which the relay's profile showed.
fn write_envelope<P: PayloadJson>(
    event: &StoredEvent<P>,
    out: &mut Vec<u8>,
) -> Result<(), SerializeError> {
    let mut numbers = itoa::Buffer::new();
    out.extend_from_slice(b"{\"event_id\":");
    push_uuid(out, &event.event_id.0);
    out.extend_from_slice(b",\"aggregate_type\":");
    push_str(out, &event.stream.aggregate_type);
    out.extend_from_slice(b",\"aggregate_id\":");
    push_str(out, event.stream.aggregate_id.as_str());
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(numbers.format(event.version).as_bytes());
    out.extend_from_slice(b",\"event_type\":");
    push_str(out, &event.event_type);
    out.extend_from_slice(b",\"schema_version\":");
    out.extend_from_slice(numbers.format(event.schema_version).as_bytes());
    out.extend_from_slice(b",\"payload\":");
    let written = event
        .payload
        .write_json(out)
        .and_then(|()| {
            out.extend_from_slice(b",\"metadata\":");
            serde_json::to_writer(&mut *out, &event.metadata)
        })
        .map_err(|e| SerializeError {
            event_id: event.event_id,
            stream: event.stream.clone(),
            event_type: event.event_type.clone(),
            reason: e.to_string(),
        });
    written?;
    out.extend_from_slice(b",\"recorded_at\":");
    push_time(out, &event.recorded_at);
    out.extend_from_slice(b",\"checkpoint\":{\"transaction\":");
    out.extend_from_slice(numbers.format(event.checkpoint.transaction).as_bytes());
    out.extend_from_slice(b",\"position\":");
    out.extend_from_slice(numbers.format(event.checkpoint.position).as_bytes());
    out.extend_from_slice(b"}}");
    Ok(())
}

/// A JSON string: copied between quotes when nothing in it needs escaping (the usual case for
/// type names and ids), else escaped by `serde_json`.
fn push_str(out: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

/// A UUID as a quoted, lower-case, hyphenated string.
fn push_uuid(out: &mut Vec<u8>, id: &uuid::Uuid) {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut text).as_bytes());
    out.push(b'"');
}

/// `value` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut Vec<u8>, value: u32, width: usize) {
    let mut numbers = itoa::Buffer::new();
    let digits = numbers.format(value).as_bytes();
    out.extend(std::iter::repeat_n(
        b'0',
        width.saturating_sub(digits.len()),
    ));
    out.extend_from_slice(digits);
}

/// A time as chrono serializes it (RFC 3339, `Z`, fractional seconds in 0, 3, 6 or 9 digits as
/// needed), quoted.
fn push_time(out: &mut Vec<u8>, at: &DateTime<Utc>) {
    use chrono::{Datelike, Timelike};
    let year = at.year();
    if !(0..=9999).contains(&year) {
        // Outside RFC 3339's years: chrono's own (signed) form.
        let _ = serde_json::to_writer(&mut *out, at);
        return;
    }
    let (mut second, mut nano) = (at.second(), at.nanosecond());
    if nano >= 1_000_000_000 {
        // A leap second.
        second += 1;
        nano -= 1_000_000_000;
    }
    out.push(b'"');
    push_padded(out, year.unsigned_abs(), 4);
    out.push(b'-');
    push_padded(out, at.month(), 2);
    out.push(b'-');
    push_padded(out, at.day(), 2);
    out.push(b'T');
    push_padded(out, at.hour(), 2);
    out.push(b':');
    push_padded(out, at.minute(), 2);
    out.push(b':');
    push_padded(out, second, 2);
    if nano != 0 {
        out.push(b'.');
        if nano % 1_000_000 == 0 {
            push_padded(out, nano / 1_000_000, 3);
        } else if nano % 1_000 == 0 {
            push_padded(out, nano / 1_000, 6);
        } else {
            push_padded(out, nano, 9);
        }
    }
    out.extend_from_slice(b"Z\"");
}

/// The headers of `event`'s message, each given to `header` as a name and a text value (every
/// broker builds its own header type from them, without an intermediate list).
pub fn headers_of<P>(
    event: &StoredEvent<P>,
    content_type: &str,
    mut header: impl FnMut(&'static str, &str),
) {
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let mut numbers = itoa::Buffer::new();
    header(
        header::EVENT_ID,
        event.event_id.0.hyphenated().encode_lower(&mut id),
    );
    header(header::EVENT_TYPE, &event.event_type);
    header(header::SCHEMA_VERSION, numbers.format(event.schema_version));
    header(header::AGGREGATE_TYPE, &event.stream.aggregate_type);
    header(header::CONTENT_TYPE, content_type);
    if let Some(correlation) = &event.metadata.correlation_id {
        header(
            header::CORRELATION_ID,
            correlation.0.hyphenated().encode_lower(&mut id),
        );
    }
    if let Some(causation) = &event.metadata.causation_id {
        header(
            header::CAUSATION_ID,
            causation.0.hyphenated().encode_lower(&mut id),
        );
    }
    if let Some(tenant) = &event.metadata.tenant {
        header(header::TENANT, tenant.as_str());
    }
    if let Some(trace) = event.metadata.headers.get(evently_core::trace::TRACEPARENT) {
        header(header::TRACEPARENT, trace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelope as `serde_json` writes it from a struct: what [`write_envelope`] must write.
    #[derive(serde::Serialize)]
    struct EnvelopeRef<'a, P> {
        event_id: EventId,
        aggregate_type: &'a str,
        aggregate_id: &'a AggregateId,
        version: u64,
        event_type: &'a str,
        schema_version: u32,
        payload: &'a P,
        metadata: &'a Metadata,
        recorded_at: DateTime<Utc>,
        checkpoint: Checkpoint,
    }

    fn by_serde<P: serde::Serialize>(event: &StoredEvent<P>) -> Vec<u8> {
        serde_json::to_vec(&EnvelopeRef {
            event_id: event.event_id,
            aggregate_type: &event.stream.aggregate_type,
            aggregate_id: &event.stream.aggregate_id,
            version: event.version,
            event_type: &event.event_type,
            schema_version: event.schema_version,
            payload: &event.payload,
            metadata: &event.metadata,
            recorded_at: event.recorded_at,
            checkpoint: event.checkpoint,
        })
        .unwrap()
    }

    #[test]
    fn the_envelope_writer_writes_what_serde_writes() {
        use chrono::TimeZone;
        let times = [
            Utc.with_ymd_and_hms(2026, 11, 30, 8, 5, 9).unwrap(),
            Utc.timestamp_opt(1_764_489_909, 123_000_000).unwrap(),
            Utc.timestamp_opt(1_764_489_909, 123_456_000).unwrap(),
            Utc.timestamp_opt(1_764_489_909, 123_456_789).unwrap(),
            Utc.timestamp_opt(1_764_489_909, 7_000).unwrap(),
            // A leap second, and years outside 0..=9999.
            Utc.timestamp_opt(1_483_228_799, 1_500_000_000).unwrap(),
            Utc.with_ymd_and_hms(12_345, 1, 2, 3, 4, 5).unwrap(),
            Utc.with_ymd_and_hms(-44, 3, 15, 12, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(7, 3, 15, 12, 0, 0).unwrap(),
        ];
        let full = Metadata::default()
            .with_correlation_id(evently_core::CorrelationId::new())
            .with_causation_id(EventId::new())
            .with_user_id("u \"1\"")
            .with_tenant(evently_core::TenantId::new("acme-1").unwrap())
            .with_header("tenant", "t\u{1}");
        for (i, recorded_at) in times.into_iter().enumerate() {
            let mut e = event();
            e.recorded_at = recorded_at;
            if i % 2 == 1 {
                e.metadata = full.clone();
                e.stream = StreamId::new("or\"der\\", "o-\n1 ü");
                e.event_type = "Created\t".to_owned();
                e.checkpoint = Checkpoint::new(u64::MAX, 0);
                e.version = u64::MAX;
                e.schema_version = u32::MAX;
            }
            let mut ours = Vec::new();
            write_envelope(&e, &mut ours).unwrap();
            assert_eq!(
                String::from_utf8(ours.clone()).unwrap(),
                String::from_utf8(by_serde(&e)).unwrap()
            );
            // The raw payload path writes the same bytes.
            let raw = StoredEvent {
                payload: serde_json::value::to_raw_value(&e.payload).unwrap(),
                event_id: e.event_id,
                stream: e.stream.clone(),
                version: e.version,
                checkpoint: e.checkpoint,
                recorded_at: e.recorded_at,
                event_type: e.event_type.clone(),
                schema_version: e.schema_version,
                metadata: e.metadata.clone(),
            };
            let mut from_raw = Vec::new();
            write_envelope(&raw, &mut from_raw).unwrap();
            assert_eq!(from_raw, ours);
            assert_eq!(JsonEnvelope.deserialize(&ours).unwrap(), e);
        }
    }

    fn event() -> StoredEvent {
        StoredEvent {
            event_id: EventId::new(),
            stream: StreamId::new("order", "o-1"),
            version: 3,
            checkpoint: Checkpoint::new(7, 12),
            recorded_at: Utc::now(),
            event_type: "OrderCreated".to_owned(),
            schema_version: 2,
            payload: serde_json::json!({"total": 5}),
            metadata: Metadata::default().with_correlation_id(evently_core::CorrelationId::new()),
        }
    }

    #[test]
    fn the_json_envelope_round_trips() {
        let event = event();
        let bytes = JsonEnvelope.serialize(&event).unwrap();
        assert_eq!(JsonEnvelope.deserialize(&bytes).unwrap(), event);
    }

    /// The event with its payload as text, as the relay reads it.
    fn raw(event: &StoredEvent) -> RawStoredEvent {
        StoredEvent {
            payload: serde_json::value::to_raw_value(&event.payload).unwrap(),
            event_id: event.event_id,
            stream: event.stream.clone(),
            version: event.version,
            checkpoint: event.checkpoint,
            recorded_at: event.recorded_at,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            metadata: event.metadata.clone(),
        }
    }

    #[test]
    fn a_raw_payload_is_copied_into_the_same_envelope() {
        let event = event();
        let mut out = b"before".to_vec();
        JsonEnvelope
            .serialize_raw_into(&raw(&event), &mut out)
            .unwrap();
        assert_eq!(&out[..6], b"before");
        assert_eq!(out[6..], JsonEnvelope.serialize(&event).unwrap());
    }

    /// A serializer that only knows parsed events.
    struct Upper;

    impl EventSerializer for Upper {
        fn content_type(&self) -> &'static str {
            "text/plain"
        }

        fn serialize(&self, event: &StoredEvent) -> Result<Vec<u8>, SerializeError> {
            Ok(event.payload.to_string().to_uppercase().into_bytes())
        }

        fn deserialize(&self, _: &[u8]) -> Result<StoredEvent, MalformedMessage> {
            Err(MalformedMessage::Empty)
        }
    }

    #[test]
    fn a_serializer_without_a_raw_path_gets_the_payload_parsed() {
        let event = event();
        let mut out = Vec::new();
        Upper.serialize_raw_into(&raw(&event), &mut out).unwrap();
        assert_eq!(out, br#"{"TOTAL":5}"#);
    }

    #[test]
    fn malformed_values_say_what_is_wrong() {
        for bad in [&b"not json"[..], b"{}", b"[1,2]", b"{\"event_id\":\"x\"}"] {
            assert!(matches!(
                JsonEnvelope.deserialize(bad),
                Err(MalformedMessage::NotAnEnvelope(_))
            ));
        }
        let mut event = serde_json::to_value(
            serde_json::from_slice::<serde_json::Value>(&JsonEnvelope.serialize(&event()).unwrap())
                .unwrap(),
        )
        .unwrap();
        event["version"] = 0.into();
        let err = JsonEnvelope
            .deserialize(&serde_json::to_vec(&event).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("version 0"), "{err}");
    }

    #[test]
    fn headers_carry_ids_and_types() {
        let event = event();
        let mut headers = Vec::new();
        headers_of(&event, "application/json", |k, v| {
            headers.push((k, v.to_owned()));
        });
        let get = |key: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get(header::EVENT_ID),
            Some(event.event_id.to_string().as_str())
        );
        assert_eq!(get(header::SCHEMA_VERSION), Some("2"));
        assert_eq!(get(header::AGGREGATE_TYPE), Some("order"));
        assert!(get(header::CORRELATION_ID).is_some());
        assert!(get(header::CAUSATION_ID).is_none());
        assert!(get(header::TENANT).is_none(), "no tenant, no header");

        let mut tenanted = event;
        tenanted.metadata.tenant = Some(evently_core::TenantId::new("acme").unwrap());
        let mut found = None;
        headers_of(&tenanted, "application/json", |k, v| {
            if k == header::TENANT {
                found = Some(v.to_owned());
            }
        });
        assert_eq!(found.as_deref(), Some("acme"));
    }
}
