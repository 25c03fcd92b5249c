//! Data keys per tenant. One subject id used by two tenants is two subjects: each tenant's data
//! is sealed under a key of its own, opened with it, and forgotten alone.

use std::collections::HashMap;
use std::sync::Arc;

use super::{DataKey, KeyStore, Openable, Opened, PersonalError, open_all};
use crate::envelope::TenantId;

/// A key store as one tenant sees it: every subject it is asked about is `{tenant}/{subject}` in
/// the store it wraps (a tenant id has no `/`, so the names of two tenants never meet).
///
/// The stores wrap a key store given to `with_key_store` (a KMS, an [`InMemoryKeyStore`]
/// shared by tenant views) in this for each tenant's view or store: without it two tenants
/// using one subject id would share its key, and forgetting the subject in one tenant would
/// make the other's data unreadable. (The PostgreSQL store's own `personal_keys` table keeps a
/// tenant column instead.)
///
/// [`InMemoryKeyStore`]: super::InMemoryKeyStore
#[derive(Clone)]
pub struct TenantKeys {
    inner: Arc<dyn KeyStore>,
    prefix: String,
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKeys")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl TenantKeys {
    /// `inner` as `tenant` sees it.
    #[must_use]
    pub fn new(inner: Arc<dyn KeyStore>, tenant: &TenantId) -> Self {
        Self {
            inner,
            prefix: format!("{tenant}/"),
        }
    }

    /// `keys` as the data of `tenant` sees it: the store itself for data of no tenant.
    #[must_use]
    pub fn of(keys: &Arc<dyn KeyStore>, tenant: Option<&TenantId>) -> Arc<dyn KeyStore> {
        match tenant {
            Some(tenant) => Arc::new(Self::new(keys.clone(), tenant)),
            None => keys.clone(),
        }
    }

    /// The name of `subject` in the wrapped store.
    fn name(&self, subject: &str) -> String {
        format!("{}{subject}", self.prefix)
    }
}

#[async_trait::async_trait]
impl KeyStore for TenantKeys {
    async fn key_for(&self, subject: &str) -> Result<DataKey, PersonalError> {
        self.inner.key_for(&self.name(subject)).await
    }

    async fn keys(&self, subjects: &[String]) -> Result<HashMap<String, DataKey>, PersonalError> {
        let names: Vec<String> = subjects.iter().map(|s| self.name(s)).collect();
        let found = self.inner.keys(&names).await?;
        Ok(found
            .into_iter()
            .filter_map(|(name, key)| {
                name.strip_prefix(&self.prefix)
                    .map(|subject| (subject.to_owned(), key))
            })
            .collect())
    }

    async fn forget(&self, subject: &str) -> Result<bool, PersonalError> {
        self.inner.forget(&self.name(subject)).await
    }
}

/// Opens `payloads`, each with the keys of the tenant its event names (`keys_of`): one look-up
/// of keys per tenant among them. What a view of every tenant's events reads with.
///
/// # Errors
/// [`PersonalError::KeyStore`] when a key store fails.
pub async fn open_all_by_tenant<'p, P: Openable + 'p>(
    payloads: impl IntoIterator<Item = (Option<&'p TenantId>, &'p mut P)>,
    keys_of: impl Fn(Option<&TenantId>) -> Arc<dyn KeyStore>,
) -> Result<Opened, PersonalError> {
    let mut groups: HashMap<Option<&TenantId>, Vec<&mut P>> = HashMap::new();
    for (tenant, payload) in payloads {
        groups.entry(tenant).or_default().push(payload);
    }
    let mut total = Opened::default();
    for (tenant, group) in groups {
        let one = open_all(group, &*keys_of(tenant)).await?;
        total.opened += one.opened;
        total.forgotten += one.forgotten;
        total.unreadable += one.unreadable;
    }
    Ok(total)
}
