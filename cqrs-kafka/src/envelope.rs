//! What a Kafka message carries: the event envelope of every broker
//! ([`evently_transport::envelope`]) and its headers as Kafka headers.

pub use evently_transport::envelope::{
    EventSerializer, JsonEnvelope, MalformedMessage, SerializeError, header, headers_of,
};
use rdkafka::message::{Header, Headers};

/// A header with a text value.
pub(crate) fn text<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// The text value of header `key`, if present and UTF-8.
pub fn header_value<'a>(headers: &'a impl Headers, key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use evently_core::{Metadata, StoredEvent};
    use rdkafka::message::OwnedHeaders;

    use super::*;
    use crate::sink::KafkaLayout;

    #[test]
    fn kafka_headers_carry_ids_and_types() {
        let metadata = Metadata::default().with_correlation_id(evently_core::CorrelationId::new());
        let event = StoredEvent {
            event_id: evently_core::EventId::new(),
            stream: evently_core::StreamId::new("order", "o-1"),
            version: 1,
            checkpoint: evently_core::Checkpoint::default(),
            recorded_at: chrono::Utc::now(),
            event_type: "OrderPlaced".into(),
            schema_version: 2,
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            metadata,
        };
        let headers: OwnedHeaders =
            evently_transport::Layout::headers(&KafkaLayout, &event, "application/json");
        assert_eq!(
            header_value(&headers, header::EVENT_ID),
            Some(event.event_id.to_string().as_str())
        );
        assert_eq!(header_value(&headers, header::SCHEMA_VERSION), Some("2"));
        assert_eq!(
            header_value(&headers, header::AGGREGATE_TYPE),
            Some("order")
        );
        assert!(header_value(&headers, header::CORRELATION_ID).is_some());
        assert!(header_value(&headers, header::CAUSATION_ID).is_none());
    }
}
