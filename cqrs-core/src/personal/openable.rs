//! The payload forms a store opens, and opening many with one key look-up.

use std::collections::HashMap;

use serde_json::Value;

use super::{DataKey, KeyStore, Opened, PersonalError, may_hold_envelopes, open, subjects};

/// A payload that may hold sealed fields: a parsed one, a stored text, or either in a replay.
pub trait Openable {
    /// The subjects of its sealed fields (none without envelopes: a cheap test first).
    fn sealed_subjects(&self) -> Vec<String>;

    /// Opens its sealed fields with `keys` (see [`open`]).
    fn open_with(&mut self, keys: &HashMap<String, DataKey>) -> Opened;

    /// Parses a text holding envelopes once, where the form allows it, so that finding the
    /// subjects and opening do not parse it twice.
    fn prepare(&mut self) {}
}

impl Openable for Value {
    fn sealed_subjects(&self) -> Vec<String> {
        subjects(self)
    }

    fn open_with(&mut self, keys: &HashMap<String, DataKey>) -> Opened {
        open(self, keys)
    }
}

impl Openable for Box<serde_json::value::RawValue> {
    fn sealed_subjects(&self) -> Vec<String> {
        if !may_hold_envelopes(self.get()) {
            return Vec::new();
        }
        serde_json::from_str::<Value>(self.get())
            .map(|v| subjects(&v))
            .unwrap_or_default()
    }

    fn open_with(&mut self, keys: &HashMap<String, DataKey>) -> Opened {
        if !may_hold_envelopes(self.get()) {
            return Opened::default();
        }
        let Ok(mut value) = serde_json::from_str::<Value>(self.get()) else {
            return Opened::default();
        };
        let outcome = open(&mut value, keys);
        if let Ok(text) = serde_json::value::to_raw_value(&value) {
            *self = text;
        }
        outcome
    }
}

/// Opens every payload of `payloads` with one look-up of the keys they need.
///
/// # Errors
/// The key store's (nothing is opened then).
pub async fn open_all<'p, P: Openable + 'p>(
    payloads: impl IntoIterator<Item = &'p mut P>,
    keys: &dyn KeyStore,
) -> Result<Opened, PersonalError> {
    let mut sealed: Vec<&mut P> = Vec::new();
    let mut subjects: Vec<String> = Vec::new();
    for payload in payloads {
        let found = payload.sealed_subjects();
        if !found.is_empty() {
            subjects.extend(found);
            sealed.push(payload);
        }
    }
    if sealed.is_empty() {
        return Ok(Opened::default());
    }
    subjects.sort_unstable();
    subjects.dedup();
    let found = keys.keys(&subjects).await?;
    let mut total = Opened::default();
    for payload in sealed {
        let one = payload.open_with(&found);
        total.opened += one.opened;
        total.forgotten += one.forgotten;
        total.unreadable += one.unreadable;
    }
    Ok(total)
}
