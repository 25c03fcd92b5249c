//! What every store checks before it appends, and how it tells a replay of the same events from a
//! reuse of their ids.

use crate::envelope::{EventData, EventId, StoredEvent, StreamId, TenantId};

use super::*;

/// Whether a stored event is the same event as one being appended again: same stream, type, schema
/// version, payload and metadata.
#[must_use]
pub fn same_event(stored: &StoredEvent, stream: &StreamId, new: &EventData) -> bool {
    stored.stream == *stream
        && stored.event_type == new.event_type
        && stored.schema_version == new.schema_version
        && stored.payload == new.payload
        && stored.metadata == new.metadata
}
/// Classifies a batch whose ids are (partly) stored already, given a lookup of the stored events by
/// id: [`StoreError::AlreadyAppended`] when the batch is exactly a run of stored events of this
/// stream with the same content, [`StoreError::EventIdReused`] otherwise, `None` when no id is
/// stored. Every store decides idempotency with this one function.
pub fn classify_stored_ids<'a>(
    stream: &StreamId,
    events: &[EventData],
    stored: impl Fn(&EventId) -> Option<&'a StoredEvent>,
) -> Option<StoreError> {
    let first = events.iter().find_map(|e| stored(&e.event_id))?;
    let mut appended = Vec::with_capacity(events.len());
    for (i, new) in events.iter().enumerate() {
        let reused = |existing: &StoredEvent| StoreError::EventIdReused {
            event_id: new.event_id,
            existing_stream: existing.stream.clone(),
        };
        let Some(found) = stored(&new.event_id) else {
            return Some(reused(first));
        };
        if !same_event(found, stream, new) || found.version != first.version + i as u64 {
            return Some(reused(found));
        }
        appended.push(AppendedEvent {
            event_id: found.event_id,
            version: found.version,
            checkpoint: found.checkpoint,
            recorded_at: found.recorded_at,
        });
    }
    let version = appended.last().map_or(0, |e| e.version);
    Some(StoreError::AlreadyAppended(Box::new(AppendResult {
        stream: stream.clone(),
        version,
        events: appended,
    })))
}
/// Stamps the tenant of a store's scope on the events of an append: an event without a tenant
/// gets `tenant` (nothing when the store is not scoped to one); an event that names another
/// tenant, or any tenant in a store that is not scoped to one, is refused. Every store calls it
/// before it appends, so no event of one tenant is ever written into another tenant's streams.
///
/// # Errors
/// [`StoreError::InvalidInput`] naming the event, the tenant it names and the store's scope.
pub fn stamp_tenant(tenant: Option<&TenantId>, events: &mut [EventData]) -> Result<(), StoreError> {
    for event in events {
        match (&event.metadata.tenant, tenant) {
            (None, None) => {}
            (None, Some(tenant)) => event.metadata.tenant = Some(tenant.clone()),
            (Some(named), Some(tenant)) if named == tenant => {}
            (Some(named), Some(tenant)) => {
                return Err(StoreError::InvalidInput(format!(
                    "event {} names tenant `{named}` but the store is scoped to tenant \
                     `{tenant}`: append it through the store of tenant `{named}`",
                    event.event_id
                )));
            }
            (Some(named), None) => {
                return Err(StoreError::InvalidInput(format!(
                    "event {} names tenant `{named}` but the store is not scoped to a tenant: \
                     append it through the store of tenant `{named}`",
                    event.event_id
                )));
            }
        }
    }
    Ok(())
}
/// How deeply arrays and objects may nest in a payload. `serde_json` reads at most 127 levels
/// back (its recursion limit); this leaves room for the envelopes a payload travels in (a broker
/// message wraps it in an object or two). Appends refuse deeper payloads with
/// [`StoreError::InvalidInput`], so whatever an append accepts, every reader can read; a deeper
/// one written from outside the store is a [`StoreError::Corrupt`] row that readers park and pass.
pub const MAX_JSON_DEPTH: usize = 100;
/// How deeply arrays and objects nest in `value` (a scalar: 0), without recursion.
#[must_use]
pub fn json_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    fn containers(value: &Value) -> Option<Box<dyn Iterator<Item = &Value> + '_>> {
        match value {
            Value::Array(items) => Some(Box::new(items.iter())),
            Value::Object(fields) => Some(Box::new(fields.values())),
            _ => None,
        }
    }
    // The common payload, an object of scalars, without allocating.
    let Some(children) = containers(value) else {
        return 0;
    };
    let mut deepest = 1;
    let mut stack: Vec<(&Value, usize)> = Vec::new();
    for child in children {
        if matches!(child, Value::Array(_) | Value::Object(_)) {
            stack.push((child, 2));
        }
    }
    while let Some((value, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        if let Some(children) = containers(value) {
            stack.extend(
                children
                    .filter(|c| matches!(c, Value::Array(_) | Value::Object(_)))
                    .map(|c| (c, depth + 1)),
            );
        }
    }
    deepest
}
/// Rejects what no store can hold (empty names, an id twice in one batch, a payload nested deeper
/// than [`MAX_JSON_DEPTH`], a field shaped like a sealed personal field that is not one: readers
/// would replace it with a placeholder, see [`crate::personal::forged_envelope`]),
/// so every store fails alike before it writes anything.
///
/// # Errors
/// [`StoreError::InvalidInput`] or [`StoreError::EventIdReused`].
pub fn validate_append(stream: &StreamId, events: &[EventData]) -> Result<(), StoreError> {
    if stream.aggregate_type.is_empty() {
        return Err(StoreError::InvalidInput(
            "the aggregate type is empty".into(),
        ));
    }
    if stream.aggregate_id.as_str().is_empty() {
        return Err(StoreError::InvalidInput(format!(
            "the aggregate id of a `{}` stream is empty",
            stream.aggregate_type
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        if event.event_type.is_empty() {
            return Err(StoreError::InvalidInput(format!(
                "event {i} of the batch for {stream} has an empty type"
            )));
        }
        let depth = json_depth(&event.payload);
        if depth > MAX_JSON_DEPTH {
            return Err(StoreError::InvalidInput(format!(
                "the payload of event {i} (`{}`) of the batch for {stream} is nested {depth} levels deep; \
                 at most {MAX_JSON_DEPTH} can be read back, so it is refused",
                event.event_type
            )));
        }
        if let Some(field) = crate::personal::forged_envelope(&event.payload) {
            return Err(StoreError::InvalidInput(format!(
                "field `{field}` of event {i} (`{}`) of the batch for {stream} is an object keyed \
                 `{}` that is not a sealed personal field; readers would replace it with a \
                 placeholder: rename that key (the store seals `#[pii]` fields itself)",
                event.event_type,
                crate::personal::ENVELOPE
            )));
        }
        if !seen.insert(event.event_id) {
            return Err(StoreError::EventIdReused {
                event_id: event.event_id,
                existing_stream: stream.clone(),
            });
        }
    }
    Ok(())
}
