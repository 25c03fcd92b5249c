//! Crypto-shredding in the store: personal fields sealed on append, opened on every read.

use std::sync::Arc;

use evently_core::personal::{self, KeyStore, Openable};
use evently_core::{DomainEvent, EventData, StoreError};

use crate::{PostgresEventStore, PostgresKeyStore};

impl PostgresEventStore {
    /// Seals the fields `E` marks `#[pii(subject = ...)]` in every event of its types appended
    /// from now on (crypto-shredding, see `evently_core::personal`). Reads open sealed fields
    /// whether or not this is called, so readers and tools need no list of event types.
    #[must_use]
    pub fn with_personal_data<E: DomainEvent>(mut self) -> Self {
        let mut personal = (*self.personal).clone();
        personal.sealing.add::<E>();
        self.personal = Arc::new(personal);
        self
    }

    /// Keeps the subjects' data keys in `keys` (a KMS, say) instead of this schema's
    /// `personal_keys` table.
    #[must_use]
    pub fn with_key_store(mut self, keys: Arc<dyn KeyStore>) -> Self {
        let mut personal = (*self.personal).clone();
        personal.keys = Some(keys);
        self.personal = Arc::new(personal);
        self
    }

    /// Where the subjects' data keys are, as this store's tenant sees them: the schema's
    /// `personal_keys` (its rows carry their tenant), or the key store given to
    /// [`with_key_store`](Self::with_key_store) with each tenant's subjects named
    /// `{tenant}/{subject}` in it ([`TenantKeys`](personal::TenantKeys)), so that tenants sharing
    /// one KMS never share a key.
    #[must_use]
    pub fn key_store(&self) -> Arc<dyn KeyStore> {
        self.keys_of(self.scope.tenant())
    }

    /// The keys of `tenant`'s data.
    fn keys_of(&self, tenant: Option<&evently_core::TenantId>) -> Arc<dyn KeyStore> {
        match (&self.personal.keys, &self.scope) {
            (Some(keys), _) => personal::TenantKeys::of(keys, tenant),
            // The all-tenants view sees every tenant's rows: it asks for one tenant's.
            (None, evently_core::store::StoreScope::AllTenants) => {
                Arc::new(PostgresKeyStore::of_tenant(self, tenant))
            }
            (None, _) => self
                .personal
                .schema_keys
                .get_or_init(|| Arc::new(PostgresKeyStore::new(self)))
                .clone(),
        }
    }

    /// Forgets `subject`: deletes its data key, so every read of its sealed fields (loads,
    /// replays, projections, rebuilds) yields their placeholders from now on. `false` when it had
    /// no key.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the key store fails.
    ///
    /// A tenant's store forgets the subject of that tenant only; the all-tenants view refuses.
    pub async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        self.refuse_all_tenants()?;
        self.key_store()
            .forget(subject)
            .await
            .map_err(StoreError::from)
    }

    /// Seals the personal fields of `events` (those of the types given to
    /// [`with_personal_data`](Self::with_personal_data)).
    pub(crate) async fn seal(&self, events: &mut [EventData]) -> Result<(), StoreError> {
        if self.personal.sealing.is_empty() {
            return Ok(());
        }
        let keys = self.key_store();
        self.personal
            .sealing
            .seal(events, &*keys)
            .await
            .map_err(StoreError::from)
    }

    /// The subjects of the sealed fields in `stream`'s events up to `version`, sorted; `None`
    /// unless the store seals personal data.
    ///
    /// The stream's last snapshot keeps what its save found (`personal_subjects`), so only the
    /// events after it are read: a snapshot every N events costs O(N), not O(stream). A snapshot
    /// without that list (saved by a store that seals nothing, or before the column) or past
    /// `version` (a newer one saved meanwhile) is not trusted: the whole stream is read.
    pub(crate) async fn personal_subjects(
        &self,
        stream: &evently_core::StreamId,
        version: u64,
    ) -> Result<Option<Vec<String>>, StoreError> {
        if self.personal.sealing.is_empty() {
            return Ok(None);
        }
        let version = crate::rows::to_i64(version)?;
        let known: Option<(i64, Option<Vec<String>>)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT version, personal_subjects FROM {}.snapshots \
                 WHERE aggregate_type = $1 AND aggregate_id = $2",
                self.sql.quoted_schema
            )))
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(crate::errors::backend)?;
        let (after, mut subjects) = match known {
            Some((through, Some(subjects))) if through <= version => (through, subjects),
            _ => (0, Vec::new()),
        };
        let payloads: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT payload::text FROM {}.events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 AND version <= $4 \
               AND strpos(payload::text, '\"{}\"') > 0",
            self.sql.quoted_schema,
            personal::ENVELOPE
        )))
        .bind(&stream.aggregate_type)
        .bind(stream.aggregate_id.as_str())
        .bind(after)
        .bind(version)
        .fetch_all(self.pool())
        .await
        .map_err(crate::errors::backend)?;
        subjects.extend(
            payloads
                .iter()
                .filter_map(|p| serde_json::from_str::<serde_json::Value>(p).ok())
                .flat_map(|p| personal::subjects(&p)),
        );
        subjects.sort_unstable();
        subjects.dedup();
        Ok(Some(subjects))
    }

    /// Opens the sealed fields of each item of a stream read (`load`, `replay`), looking each
    /// subject's key up once for the whole stream (a stream's events mostly name one subject).
    pub(crate) fn open_each<'a, T: Send + 'a, P: Openable + 'a>(
        &'a self,
        items: futures::stream::BoxStream<'a, Result<T, StoreError>>,
        payload: fn(&mut T) -> &mut P,
    ) -> futures::stream::BoxStream<'a, Result<T, StoreError>> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let looked_up = Arc::new(tokio::sync::Mutex::new((
            std::collections::HashMap::new(),
            std::collections::HashSet::<String>::new(),
        )));
        items
            .and_then(move |mut item| {
                let looked_up = looked_up.clone();
                async move {
                    payload(&mut item).prepare();
                    let subjects = payload(&mut item).sealed_subjects();
                    if subjects.is_empty() {
                        return Ok(item);
                    }
                    let mut cache = looked_up.lock().await;
                    let (keys, asked) = &mut *cache;
                    let missing: Vec<String> = subjects
                        .into_iter()
                        .filter(|s| !asked.contains(s))
                        .collect();
                    if !missing.is_empty() {
                        let found = self
                            .key_store()
                            .keys(&missing)
                            .await
                            .map_err(StoreError::from)?;
                        keys.extend(found);
                        asked.extend(missing);
                    }
                    payload(&mut item).open_with(keys);
                    Ok(item)
                }
            })
            .boxed()
    }

    /// Opens the sealed fields of `events` (one look-up of their keys; in the all-tenants view
    /// one per tenant among them, each event opened with its tenant's keys).
    pub(crate) async fn open<P: Openable>(
        &self,
        events: &mut [evently_core::StoredEvent<P>],
    ) -> Result<(), StoreError> {
        // Payloads without envelopes (most) cost a scan; the keys are asked only for the others.
        let opened = if self.scope == evently_core::store::StoreScope::AllTenants {
            personal::open_all_by_tenant(
                events
                    .iter_mut()
                    .map(|e| (e.metadata.tenant.as_ref(), &mut e.payload)),
                |tenant| self.keys_of(tenant),
            )
            .await
        } else {
            personal::open_all(
                events.iter_mut().map(|e| &mut e.payload),
                &*self.key_store(),
            )
            .await
        };
        opened.map(drop).map_err(StoreError::from)
    }
}
