//! Snapshots sealed whole for the subjects of their stream.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, Generate, Payload};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use super::{KeyStore, PersonalError};

/// The key of a sealed snapshot's envelope.
pub const STATE_ENVELOPE: &str = "$personal_state";

/// Seals a whole aggregate state (a snapshot) under the keys of every subject whose personal
/// data its events held, one layer per subject: forgetting any of them makes the snapshot
/// unreadable, and [`open_state`] then answers `None` (the aggregate is rebuilt from its events,
/// which read as placeholders). A state without subjects is returned as it is.
///
/// # Errors
/// The key store's, or a failing random source.
pub async fn seal_state(
    state: Value,
    subjects: &[String],
    keys: &dyn KeyStore,
) -> Result<Value, PersonalError> {
    if subjects.is_empty() {
        return Ok(state);
    }
    let mut data = serde_json::to_vec(&state).map_err(|e| PersonalError::KeyStore(Box::new(e)))?;
    let mut nonces = Vec::with_capacity(subjects.len());
    for subject in subjects {
        let key = keys.key_for(subject).await?;
        let nonce = aes_gcm::aead::Nonce::<Aes256Gcm>::try_generate()
            .map_err(|e| PersonalError::Random(e.to_string()))?;
        data = key
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: &data,
                    aad: subject.as_bytes(),
                },
            )
            .map_err(|e| PersonalError::Random(format!("encryption failed: {e}")))?;
        nonces.push(Value::String(B64.encode(nonce)));
    }
    Ok(serde_json::json!({ STATE_ENVELOPE: {
        "subjects": subjects,
        "nonces": nonces,
        "data": B64.encode(data),
    }}))
}

/// Opens a state sealed by [`seal_state`]: `Some` with the state, `None` when a subject's key is
/// gone or it does not decrypt; a state that is not sealed is returned as it is.
///
/// # Errors
/// The key store's.
pub async fn open_state(state: Value, keys: &dyn KeyStore) -> Result<Option<Value>, PersonalError> {
    let Some(envelope) = state.get(STATE_ENVELOPE) else {
        return Ok(Some(state));
    };
    let text_list = |name: &str| -> Vec<String> {
        envelope
            .get(name)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (subjects, nonces) = (text_list("subjects"), text_list("nonces"));
    let Some(mut data) = envelope
        .get("data")
        .and_then(Value::as_str)
        .and_then(|d| B64.decode(d).ok())
    else {
        return Ok(None);
    };
    if subjects.len() != nonces.len() {
        return Ok(None);
    }
    let found = keys.keys(&subjects).await?;
    for (subject, nonce) in subjects.iter().zip(&nonces).rev() {
        let Some(key) = found.get(subject) else {
            return Ok(None);
        };
        let Some(nonce) = B64
            .decode(nonce)
            .ok()
            .and_then(|n| aes_gcm::aead::Nonce::<Aes256Gcm>::try_from(n.as_slice()).ok())
        else {
            return Ok(None);
        };
        let Ok(plain) = key.cipher().decrypt(
            &nonce,
            Payload {
                msg: &data,
                aad: subject.as_bytes(),
            },
        ) else {
            return Ok(None);
        };
        data = plain;
    }
    Ok(serde_json::from_slice(&data).ok())
}
