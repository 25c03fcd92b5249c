//! Personal data in events, and forgetting it: crypto-shredding.
//!
//! An append-only log cannot delete a person's data, but it can make it unreadable: fields marked
//! `#[pii(subject = member_id)]` in a `#[derive(DomainEvent)]` enum are encrypted (AES-256-GCM)
//! with a data key of their *subject* (the value of the field `member_id`) before the payload is
//! stored, and decrypted when it is read. [`KeyStore::forget`] deletes the subject's key: from
//! then on every read of those fields yields the field's *placeholder* (its type's `Default`:
//! an empty string, 0, `None`), never an error that stops a reader.
//!
//! In a stored payload a sealed field is an envelope in place of the value:
//!
//! ```json
//! {"member_id": "m-1", "email": {"$personal": {"subject": "m-1", "nonce": "…", "data": "…", "forgotten": ""}}}
//! ```
//!
//! `data` is the field's JSON encrypted under the subject's key with the subject and the field's
//! name as associated data (an envelope moved to another field or subject does not open);
//! `forgotten` is the placeholder, stored in the clear because it is not personal. Opening needs
//! no knowledge of the event types: any envelope is opened, or replaced by its placeholder when
//! its key is gone (or it does not decrypt: tampered data is not trusted, and is logged).

use std::collections::HashMap;
use std::sync::Mutex;

use aes_gcm::aead::{Aead, Generate, Key, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value};

mod openable;
mod state;
mod tenants;

pub use openable::{Openable, open_all};
pub use state::{STATE_ENVELOPE, open_state, seal_state};
pub use tenants::{TenantKeys, open_all_by_tenant};

/// The key of an envelope in a stored payload.
pub const ENVELOPE: &str = "$personal";

/// A field of an event variant that holds personal data, as the derive declares it.
#[derive(Debug, Clone, Copy)]
pub struct PersonalField {
    /// The stored event type (the variant's name).
    pub event_type: &'static str,
    /// The field's name in the payload.
    pub field: &'static str,
    /// The field whose value names the data's subject.
    pub subject: &'static str,
    /// The value read in place of the field once its subject is forgotten.
    pub forgotten: fn() -> Value,
}

/// What went wrong with personal data.
#[derive(Debug, thiserror::Error)]
pub enum PersonalError {
    /// The key store failed.
    #[error("the key store failed: {0}")]
    KeyStore(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A marked field's subject is missing or not a string or number.
    #[error(
        "event `{event_type}`: the subject field `{subject}` of personal field `{field}` is missing or not a string or number"
    )]
    NoSubject {
        /// The event type.
        event_type: String,
        /// The personal field.
        field: String,
        /// The subject field.
        subject: String,
    },
    /// The system's random source failed.
    #[error("no randomness for a key or nonce: {0}")]
    Random(String),
}

/// A subject's data key (AES-256).
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A new random key.
    ///
    /// # Errors
    /// [`PersonalError::Random`] when the system's random source fails.
    pub fn generate() -> Result<Self, PersonalError> {
        let key =
            Key::<Aes256Gcm>::try_generate().map_err(|e| PersonalError::Random(e.to_string()))?;
        Ok(Self(key.into()))
    }

    /// A key from its 32 stored bytes; `None` for any other length.
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// The key's bytes, to store it.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(self.0))
    }
}

/// Where the subjects' data keys live: a PostgreSQL table by default
/// (`evently_postgres::PostgresKeyStore`), [`InMemoryKeyStore`] in process, or a KMS behind this
/// trait.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync {
    /// The subject's key, made and kept if it has none yet. A forgotten subject gets a new key
    /// (data written after `forget` is readable again; what was written before stays gone).
    ///
    /// # Errors
    /// [`PersonalError::KeyStore`] when the store fails.
    async fn key_for(&self, subject: &str) -> Result<DataKey, PersonalError>;

    /// The keys the store has among `subjects` (forgotten ones are absent).
    ///
    /// # Errors
    /// [`PersonalError::KeyStore`] when the store fails.
    async fn keys(&self, subjects: &[String]) -> Result<HashMap<String, DataKey>, PersonalError>;

    /// Deletes the subject's key: its data is unreadable from now on. `false` when it had none.
    ///
    /// # Errors
    /// [`PersonalError::KeyStore`] when the store fails.
    async fn forget(&self, subject: &str) -> Result<bool, PersonalError>;
}

/// Keys in this process's memory (tests, the in-memory store).
#[derive(Debug, Default)]
pub struct InMemoryKeyStore {
    keys: Mutex<HashMap<String, DataKey>>,
}

impl InMemoryKeyStore {
    /// An empty key store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, DataKey>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl KeyStore for InMemoryKeyStore {
    async fn key_for(&self, subject: &str) -> Result<DataKey, PersonalError> {
        if let Some(key) = self.locked().get(subject) {
            return Ok(key.clone());
        }
        let key = DataKey::generate()?;
        Ok(self
            .locked()
            .entry(subject.to_owned())
            .or_insert(key)
            .clone())
    }

    async fn keys(&self, subjects: &[String]) -> Result<HashMap<String, DataKey>, PersonalError> {
        let keys = self.locked();
        Ok(subjects
            .iter()
            .filter_map(|s| keys.get(s).map(|k| (s.clone(), k.clone())))
            .collect())
    }

    async fn forget(&self, subject: &str) -> Result<bool, PersonalError> {
        Ok(self.locked().remove(subject).is_some())
    }
}

/// The subject a payload names in `field`: a string as it is, a number as written.
fn subject_of(payload: &Map<String, Value>, field: &str) -> Option<String> {
    match payload.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn aad(subject: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(subject.len() + field.len() + 1);
    aad.extend_from_slice(subject.as_bytes());
    aad.push(0);
    aad.extend_from_slice(field.as_bytes());
    aad
}

/// Seals the personal fields of a payload of `event_type` (those of `fields` declared for it) in
/// place, with their subjects' keys from `keys`. A field already sealed, or absent (`null` in
/// an `Option`), is left as it is.
///
/// `seed` is the event's id: each field's nonce is derived from it, the field's name and its
/// content (SHA-256), so sealing the same event again gives the same bytes (a retried append stays
/// idempotent) while no two different contents under one key share a nonce.
///
/// # Errors
/// [`PersonalError::NoSubject`] when a marked field's subject is missing, the key store's.
pub async fn seal(
    payload: &mut Value,
    event_type: &str,
    fields: &[PersonalField],
    keys: &dyn KeyStore,
    seed: &[u8],
) -> Result<usize, PersonalError> {
    let Value::Object(map) = payload else {
        return Ok(0);
    };
    let mut sealed = 0;
    for marked in fields.iter().filter(|f| f.event_type == event_type) {
        let Some(value) = map.get(marked.field) else {
            continue;
        };
        if value.is_null() || is_envelope(value) {
            continue;
        }
        let subject = subject_of(map, marked.subject).ok_or_else(|| PersonalError::NoSubject {
            event_type: event_type.to_owned(),
            field: marked.field.to_owned(),
            subject: marked.subject.to_owned(),
        })?;
        let key = keys.key_for(&subject).await?;
        let plain = serde_json::to_vec(value).map_err(|e| PersonalError::KeyStore(Box::new(e)))?;
        let nonce = nonce_for(seed, marked.field, &plain);
        let data = key
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: &plain,
                    aad: &aad(&subject, marked.field),
                },
            )
            .map_err(|e| PersonalError::Random(format!("encryption failed: {e}")))?;
        let mut envelope = Map::new();
        envelope.insert("subject".to_owned(), Value::String(subject));
        envelope.insert("nonce".to_owned(), Value::String(B64.encode(nonce)));
        envelope.insert("data".to_owned(), Value::String(B64.encode(data)));
        envelope.insert("forgotten".to_owned(), (marked.forgotten)());
        let mut wrapper = Map::new();
        wrapper.insert(ENVELOPE.to_owned(), Value::Object(envelope));
        map.insert(marked.field.to_owned(), Value::Object(wrapper));
        sealed += 1;
    }
    Ok(sealed)
}

/// The nonce of a field: the first 12 bytes of SHA-256 over the seed, the field's name and its
/// content, each length-prefixed.
fn nonce_for(seed: &[u8], field: &str, plain: &[u8]) -> aes_gcm::aead::Nonce<Aes256Gcm> {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for part in [seed, field.as_bytes(), plain] {
        hash.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_le_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&digest[..12]);
    aes_gcm::aead::Nonce::<Aes256Gcm>::from(nonce)
}

fn is_envelope(value: &Value) -> bool {
    matches!(value, Value::Object(m) if m.len() == 1 && m.contains_key(ENVELOPE))
}

/// The first field of `payload` that readers would take for a sealed personal field (an object
/// whose one key is [`ENVELOPE`]) but is not a well-formed one (a string subject, a 12-byte
/// base64 nonce, base64 data and a placeholder): appends refuse such a payload, so data a user
/// wrote is never read as a placeholder. Envelopes sealed elsewhere with [`seal`] pass.
#[must_use]
pub fn forged_envelope(payload: &Value) -> Option<&str> {
    let Value::Object(map) = payload else {
        return None;
    };
    map.iter().find_map(|(field, value)| {
        let Value::Object(wrapper) = value else {
            return None;
        };
        if !is_envelope(value) {
            return None;
        }
        let well_formed = wrapper
            .get(ENVELOPE)
            .and_then(Value::as_object)
            .is_some_and(|e| {
                let text = |key: &str| e.get(key).and_then(Value::as_str);
                let nonce = text("nonce").and_then(|n| B64.decode(n).ok());
                text("subject").is_some()
                    && nonce.is_some_and(|n| n.len() == 12)
                    && text("data").is_some_and(|d| B64.decode(d).is_ok())
                    && e.contains_key("forgotten")
            });
        (!well_formed).then_some(field.as_str())
    })
}

/// Whether a stored payload's text may hold sealed fields (a cheap test before parsing it).
#[must_use]
pub fn may_hold_envelopes(payload: &str) -> bool {
    payload.contains(ENVELOPE)
}

/// The subjects of the sealed fields of `payload`.
#[must_use]
pub fn subjects(payload: &Value) -> Vec<String> {
    let Value::Object(map) = payload else {
        return Vec::new();
    };
    map.values()
        .filter_map(|v| match v {
            Value::Object(m) if m.len() == 1 => m.get(ENVELOPE),
            _ => None,
        })
        .filter_map(|e| e.get("subject").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// What [`open`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Opened {
    /// Fields decrypted.
    pub opened: usize,
    /// Fields whose subject was forgotten: their placeholder is in place.
    pub forgotten: usize,
    /// Fields that did not decrypt with their subject's key (tampered or corrupt): placeholder.
    pub unreadable: usize,
}

/// Opens the sealed fields of `payload` in place with `keys` (the subjects' keys that exist):
/// each envelope becomes the field's value, or its placeholder when the key is gone or the data
/// does not decrypt. Never fails: a reader always gets a payload it can decode.
pub fn open(payload: &mut Value, keys: &HashMap<String, DataKey>) -> Opened {
    let mut outcome = Opened::default();
    let Value::Object(map) = payload else {
        return outcome;
    };
    for (field, value) in map.iter_mut() {
        let Some(Value::Object(envelope)) = (match value {
            Value::Object(m) if m.len() == 1 => m.get(ENVELOPE).cloned(),
            _ => None,
        }) else {
            continue;
        };
        let placeholder = envelope.get("forgotten").cloned().unwrap_or(Value::Null);
        let subject = envelope
            .get("subject")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some(key) = keys.get(subject) else {
            *value = placeholder;
            outcome.forgotten += 1;
            continue;
        };
        let decrypted = (|| {
            let nonce = B64.decode(envelope.get("nonce")?.as_str()?).ok()?;
            let data = B64.decode(envelope.get("data")?.as_str()?).ok()?;
            let nonce = Nonce::try_from(nonce.as_slice()).ok()?;
            let plain = key
                .cipher()
                .decrypt(
                    &nonce,
                    Payload {
                        msg: &data,
                        aad: &aad(subject, field),
                    },
                )
                .ok()?;
            serde_json::from_slice::<Value>(&plain).ok()
        })();
        match decrypted {
            Some(plain) => {
                *value = plain;
                outcome.opened += 1;
            }
            None => {
                tracing::warn!(
                    field,
                    subject,
                    "a sealed personal field does not decrypt with its subject's key: its placeholder is read"
                );
                *value = placeholder;
                outcome.unreadable += 1;
            }
        }
    }
    outcome
}

/// Opens the sealed fields of a stored payload's text, fetching the keys it needs from `keys`;
/// a payload without envelopes is returned as it is (not parsed).
///
/// # Errors
/// The key store's (the payload is then not readable yet: retry).
pub async fn open_text(
    payload: &str,
    keys: &dyn KeyStore,
) -> Result<Option<String>, PersonalError> {
    if !may_hold_envelopes(payload) {
        return Ok(None);
    }
    let Ok(mut value) = serde_json::from_str::<Value>(payload) else {
        return Ok(None);
    };
    let subjects = subjects(&value);
    if subjects.is_empty() {
        return Ok(None);
    }
    let found = keys.keys(&subjects).await?;
    open(&mut value, &found);
    Ok(Some(value.to_string()))
}

/// Which fields of which event types a store seals (what `with_personal_data::<E>()` of the
/// stores records).
#[derive(Debug, Clone, Default)]
pub struct Sealing {
    fields: HashMap<&'static str, Vec<PersonalField>>,
}

impl Sealing {
    /// Adds the personal fields `E` declares.
    pub fn add<E: crate::DomainEvent>(&mut self) {
        for field in E::PERSONAL_FIELDS {
            let list = self.fields.entry(field.event_type).or_default();
            if !list.iter().any(|f| f.field == field.field) {
                list.push(*field);
            }
        }
    }

    /// Whether nothing is sealed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Seals the personal fields of `events` in place (see [`seal`]; each event's id seeds its
    /// nonces).
    ///
    /// # Errors
    /// As [`seal`].
    pub async fn seal(
        &self,
        events: &mut [crate::EventData],
        keys: &dyn KeyStore,
    ) -> Result<(), PersonalError> {
        for event in events {
            if let Some(fields) = self.fields.get(event.event_type.as_str()) {
                let seed = *event.event_id.0.as_bytes();
                seal(&mut event.payload, &event.event_type, fields, keys, &seed).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Value {
        Value::String(String::new())
    }

    const FIELDS: &[PersonalField] = &[
        PersonalField {
            event_type: "MemberJoined",
            field: "email",
            subject: "member_id",
            forgotten: empty,
        },
        PersonalField {
            event_type: "MemberJoined",
            field: "name",
            subject: "member_id",
            forgotten: empty,
        },
    ];

    fn joined(member: &str) -> Value {
        serde_json::json!({"member_id": member, "email": "ada@example.com", "name": "Ada", "plan": "gold"})
    }

    async fn sealed(keys: &InMemoryKeyStore, member: &str) -> Value {
        let mut payload = joined(member);
        let n = seal(
            &mut payload,
            "MemberJoined",
            FIELDS,
            keys,
            member.as_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 2);
        payload
    }

    #[tokio::test]
    async fn sealed_fields_hide_their_text_and_open_to_what_was_written() {
        let keys = InMemoryKeyStore::new();
        let mut payload = sealed(&keys, "m-1").await;
        let text = payload.to_string();
        assert!(
            !text.contains("ada@example.com") && !text.contains("\"name\":\"Ada\""),
            "{text}"
        );
        assert!(
            text.contains("gold") && text.contains("m-1"),
            "other fields stay: {text}"
        );
        // Sealing twice does nothing more.
        let again = seal(&mut payload, "MemberJoined", FIELDS, &keys, b"m-1").await;
        assert_eq!(again.unwrap_or_else(|e| panic!("{e}")), 0);
        let opened = open_text(&text, &keys)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("nothing opened"));
        assert_eq!(
            serde_json::from_str::<Value>(&opened).ok(),
            Some(joined("m-1"))
        );
        // Another event type's fields are not touched.
        let mut other = joined("m-1");
        assert_eq!(
            seal(&mut other, "MemberLeft", FIELDS, &keys, b"x")
                .await
                .ok(),
            Some(0)
        );
    }

    #[tokio::test]
    async fn a_forgotten_subject_reads_as_its_placeholders_and_others_stay() {
        let keys = InMemoryKeyStore::new();
        let (one, two) = (sealed(&keys, "m-1").await, sealed(&keys, "m-2").await);
        assert!(keys.forget("m-1").await.unwrap_or(false));
        assert!(!keys.forget("m-1").await.unwrap_or(true), "forgotten twice");
        let mut one = one;
        let found = keys.keys(&subjects(&one)).await.unwrap_or_default();
        let outcome = open(&mut one, &found);
        assert_eq!(
            outcome,
            Opened {
                opened: 0,
                forgotten: 2,
                unreadable: 0
            }
        );
        assert_eq!(
            one,
            serde_json::json!({"member_id": "m-1", "email": "", "name": "", "plan": "gold"})
        );
        let opened = open_text(&two.to_string(), &keys).await.ok().flatten();
        assert_eq!(
            opened.and_then(|t| serde_json::from_str::<Value>(&t).ok()),
            Some(joined("m-2"))
        );
        // A new key after forgetting: new data is readable, the old stays gone.
        let three = sealed(&keys, "m-1").await;
        let opened = open_text(&three.to_string(), &keys).await.ok().flatten();
        assert_eq!(
            opened.and_then(|t| serde_json::from_str::<Value>(&t).ok()),
            Some(joined("m-1"))
        );
    }

    #[tokio::test]
    async fn an_envelope_moved_or_tampered_with_reads_as_its_placeholder() {
        let keys = InMemoryKeyStore::new();
        let mut payload = sealed(&keys, "m-1").await;
        // The e-mail's envelope put in the name's place: the associated data no longer matches.
        if let Value::Object(map) = &mut payload {
            let email = map.get("email").cloned().unwrap_or(Value::Null);
            map.insert("name".to_owned(), email);
        }
        let found = keys.keys(&subjects(&payload)).await.unwrap_or_default();
        let outcome = open(&mut payload, &found);
        assert_eq!(
            outcome,
            Opened {
                opened: 1,
                forgotten: 0,
                unreadable: 1
            }
        );
        assert_eq!(payload["name"], Value::String(String::new()));
        assert_eq!(
            payload["email"],
            Value::String("ada@example.com".to_owned())
        );
    }

    #[tokio::test]
    async fn a_missing_subject_is_a_typed_error_and_numbers_name_subjects() {
        let keys = InMemoryKeyStore::new();
        let mut payload = serde_json::json!({"email": "x@example.com"});
        let error = seal(&mut payload, "MemberJoined", FIELDS, &keys, b"x").await;
        assert!(
            matches!(error, Err(PersonalError::NoSubject { .. })),
            "{error:?}"
        );
        let mut payload = serde_json::json!({"member_id": 42, "email": "x@example.com"});
        assert_eq!(
            seal(&mut payload, "MemberJoined", FIELDS, &keys, b"x")
                .await
                .ok(),
            Some(1)
        );
        assert_eq!(subjects(&payload), vec!["42".to_owned()]);
    }
}
