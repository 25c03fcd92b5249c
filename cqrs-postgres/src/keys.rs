//! The subjects' data keys of crypto-shredding, in the store's schema (`personal_keys`).

use std::collections::HashMap;

use evently_core::personal::{DataKey, KeyStore, PersonalError};
use sqlx::{AssertSqlSafe, Row as _};

use crate::PostgresEventStore;

/// [`KeyStore`] on PostgreSQL: one row per subject in `personal_keys` of the store's schema.
/// `forget` deletes the row (and with it every copy the server keeps once its WAL and backups
/// age out; plan backups' retention with that in mind).
#[derive(Debug, Clone)]
pub struct PostgresKeyStore {
    pool: sqlx::PgPool,
    insert: String,
    select: String,
    delete: String,
    /// The tenant whose rows `select` and `delete` take (bound as `$2`), when the pool sees
    /// every tenant's.
    tenant: Option<String>,
}

impl PostgresKeyStore {
    /// The key store of `store`'s schema (migrated by [`PostgresEventStore::migrate`]).
    #[must_use]
    pub fn new(store: &PostgresEventStore) -> Self {
        let s = &store.sql.quoted_schema;
        Self {
            pool: store.pool().clone(),
            // A racing writer's key wins; both then read it.
            insert: format!(
                "INSERT INTO {s}.personal_keys (subject, key) VALUES ($1, $2) ON CONFLICT (subject, tenant_id) DO NOTHING"
            ),
            select: format!("SELECT subject, key FROM {s}.personal_keys WHERE subject = ANY($1)"),
            delete: format!("DELETE FROM {s}.personal_keys WHERE subject = $1"),
            tenant: None,
        }
    }

    /// The keys of one tenant's data (`None`: of no tenant's) in a store whose handle sees every
    /// tenant's rows (the row-level layout's all-tenants view): there a subject id two tenants
    /// use has two rows.
    pub(crate) fn of_tenant(
        store: &PostgresEventStore,
        tenant: Option<&evently_core::TenantId>,
    ) -> Self {
        let mut keys = Self::new(store);
        keys.select = format!("{} AND tenant_id = $2", keys.select);
        keys.delete = format!("{} AND tenant_id = $2", keys.delete);
        keys.tenant = Some(tenant.map_or_else(String::new, |t| t.as_str().to_owned()));
        keys
    }
}

fn failed(error: sqlx::Error) -> PersonalError {
    PersonalError::KeyStore(Box::new(error))
}

#[async_trait::async_trait]
impl KeyStore for PostgresKeyStore {
    async fn key_for(&self, subject: &str) -> Result<DataKey, PersonalError> {
        let subjects = [subject.to_owned()];
        if let Some(key) = self.keys(&subjects).await?.remove(subject) {
            return Ok(key);
        }
        let key = DataKey::generate()?;
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(subject)
            .bind(key.as_bytes().as_slice())
            .execute(&self.pool)
            .await
            .map_err(failed)?;
        self.keys(&subjects).await?.remove(subject).ok_or_else(|| {
            PersonalError::KeyStore(
                format!("the key of subject `{subject}` was forgotten as it was made").into(),
            )
        })
    }

    async fn keys(&self, subjects: &[String]) -> Result<HashMap<String, DataKey>, PersonalError> {
        if subjects.is_empty() {
            return Ok(HashMap::new());
        }
        let mut select = sqlx::query(AssertSqlSafe(self.select.clone())).bind(subjects);
        if let Some(tenant) = &self.tenant {
            select = select.bind(tenant);
        }
        let rows = select.fetch_all(&self.pool).await.map_err(failed)?;
        let mut keys = HashMap::with_capacity(rows.len());
        for row in rows {
            let subject: String = row.try_get("subject").map_err(failed)?;
            let bytes: Vec<u8> = row.try_get("key").map_err(failed)?;
            let key = DataKey::from_bytes(&bytes).ok_or_else(|| {
                PersonalError::KeyStore(
                    format!("the key of subject `{subject}` is not 32 bytes").into(),
                )
            })?;
            keys.insert(subject, key);
        }
        Ok(keys)
    }

    async fn forget(&self, subject: &str) -> Result<bool, PersonalError> {
        let mut delete = sqlx::query(AssertSqlSafe(self.delete.clone())).bind(subject);
        if let Some(tenant) = &self.tenant {
            delete = delete.bind(tenant);
        }
        let deleted = delete.execute(&self.pool).await.map_err(failed)?;
        Ok(deleted.rows_affected() > 0)
    }
}
