//! Reading a stored event: its payload decoded into a domain event, or parsed and written back,
//! with errors that name the event.

use crate::envelope::{Payload, RawStoredEvent, RecordedEvent, StoredEvent};
use crate::event::DomainEvent;
use crate::store::{CorruptEvent, StoreError};

impl RawStoredEvent {
    /// The event with its payload parsed.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the event when the payload is not JSON (a raw value
    /// is checked when it is made, so only a hand-made one can fail).
    pub fn parse(&self) -> Result<StoredEvent, StoreError> {
        let payload =
            serde_json::from_str(self.payload.get()).map_err(|e| self.corrupt_payload(&e))?;
        Ok(StoredEvent {
            event_id: self.event_id,
            stream: self.stream.clone(),
            version: self.version,
            checkpoint: self.checkpoint,
            recorded_at: self.recorded_at,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            payload,
            metadata: self.metadata.clone(),
        })
    }
}

impl<P: Payload> StoredEvent<P> {
    /// Decodes the payload into `E`, upcasting older schema versions.
    ///
    /// # Errors
    /// [`StoreError::Decode`] naming the stream, version and type when the type is unknown to
    /// `E`, the version is newer than `E` knows, an upcaster fails or the payload does not fit.
    pub fn decode<E: DomainEvent>(&self) -> Result<E, StoreError> {
        self.payload
            .decode_into(&self.event_type, self.schema_version)
            .map_err(|error| StoreError::Decode {
                stream: self.stream.clone(),
                version: self.version,
                event_type: self.event_type.clone(),
                error: Box::new(error),
            })
    }

    /// Decodes into a typed [`RecordedEvent`], copying the envelope (the payload is decoded, not
    /// copied).
    ///
    /// # Errors
    /// As [`StoredEvent::decode`].
    pub fn to_recorded<E: DomainEvent>(&self) -> Result<RecordedEvent<E>, StoreError> {
        Ok(RecordedEvent {
            event: self.decode()?,
            event_id: self.event_id,
            stream: self.stream.clone(),
            version: self.version,
            checkpoint: self.checkpoint,
            recorded_at: self.recorded_at,
            metadata: self.metadata.clone(),
        })
    }

    /// Decodes into a typed [`RecordedEvent`], keeping the envelope.
    ///
    /// # Errors
    /// As [`StoredEvent::decode`].
    pub fn into_recorded<E: DomainEvent>(self) -> Result<RecordedEvent<E>, StoreError> {
        let event = self.decode()?;
        Ok(RecordedEvent {
            event_id: self.event_id,
            stream: self.stream,
            version: self.version,
            checkpoint: self.checkpoint,
            recorded_at: self.recorded_at,
            metadata: self.metadata,
            event,
        })
    }
}

impl<P> StoredEvent<P> {
    /// [`StoreError::Corrupt`] naming this event, for a payload that `error` says cannot
    /// be read or written.
    fn corrupt_payload(&self, error: &serde_json::Error) -> StoreError {
        StoreError::Corrupt(Box::new(CorruptEvent {
            stream: self.stream.clone(),
            version: self.version,
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            checkpoint: self.checkpoint,
            message: format!("payload: {error}"),
        }))
    }
}

impl StoredEvent {
    /// The event with its payload written back to JSON text, the envelope moved.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the event if the payload cannot be written (a map
    /// with keys that are not strings cannot be held in a `Value`, so this does not happen).
    pub fn into_raw(self) -> Result<RawStoredEvent, StoreError> {
        let payload =
            serde_json::value::to_raw_value(&self.payload).map_err(|e| self.corrupt_payload(&e))?;
        Ok(self.map_payload(|_| payload))
    }
}
