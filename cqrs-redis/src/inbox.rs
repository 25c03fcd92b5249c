//! A consumer-side inbox in Redis, for handlers whose effects are not in PostgreSQL (an email, a
//! payment, a call to another service), where the PostgreSQL inbox cannot share the effect's
//! transaction.

use std::time::Duration;

use evently_core::{EventId, StoredEvent};
use evently_transport::{HandleError, Handled, MessageHandler};
use redis::aio::ConnectionManager;

use crate::idempotency::{RELEASE, millis};

/// Sets the mark `KEYS[1]` for `ARGV[1]` ms, then deletes the claim `KEYS[2]` if it still holds
/// the caller's token `ARGV[2]`.
const FINISH: &str = "redis.call('set', KEYS[1], 1, 'PX', ARGV[1]); if redis.call('get', KEYS[2]) == ARGV[2] then return redis.call('del', KEYS[2]) else return 0 end";

/// What [`RedisInbox::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Not handled before: this caller holds it (with this token) until
    /// [`finish`](RedisInbox::finish) or [`abandon`](RedisInbox::abandon), or until the claim
    /// expires.
    New(String),
    /// Handled before: do nothing.
    Done,
    /// Another consumer is handling it now.
    InProgress,
}

/// Which events a consumer has handled, in Redis: a claim (`SET NX PX`) while the handler runs,
/// then a mark kept for the retention time. First processing wins.
///
/// The effect and the mark are not one transaction: a consumer that dies after the effect and
/// before [`finish`](Self::finish) leaves the claim to expire, and the redelivered event is
/// handled again (the at-least-once window, as long as one handler run). A Redis that keeps
/// nothing on disk forgets every mark when it restarts. Where the effect is a PostgreSQL write,
/// use the PostgreSQL inbox (`evently_transport::Transactional`) instead: it has neither window.
#[derive(Clone)]
pub struct RedisInbox {
    conn: ConnectionManager,
    prefix: String,
    retention: Duration,
    claim_ttl: Duration,
}

impl std::fmt::Debug for RedisInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisInbox")
            .field("prefix", &self.prefix)
            .field("retention", &self.retention)
            .field("claim_ttl", &self.claim_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisInbox {
    /// Keys under `cqrs:inbox`, marks kept 7 days, claims expiring after 60 s.
    #[must_use]
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: "cqrs:inbox".to_owned(),
            retention: Duration::from_secs(7 * 86_400),
            claim_ttl: Duration::from_secs(60),
        }
    }

    /// The inbox of `tenant`'s consumers (keys under `<prefix>:t:<tenant>`).
    #[must_use]
    pub fn for_tenant(&self, tenant: &evently_core::TenantId) -> Self {
        Self {
            prefix: format!("{}:t:{tenant}", self.prefix),
            ..self.clone()
        }
    }

    /// The prefix of its keys.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a handled event is remembered (at least 1 s): longer than the broker can
    /// redeliver it.
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention.max(Duration::from_secs(1));
        self
    }

    /// How long a claim outlives a consumer that died holding it (at least 100 ms): longer than
    /// a handler runs.
    #[must_use]
    pub fn with_claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl.max(Duration::from_millis(100));
        self
    }

    fn keys(&self, consumer: &str, event: EventId) -> (String, String) {
        (
            format!("{}:done:{consumer}:{event}", self.prefix),
            format!("{}:claim:{consumer}:{event}", self.prefix),
        )
    }

    /// Whether `consumer` has marked `event` handled (and the mark is still kept).
    ///
    /// # Errors
    /// Redis failing or out of reach.
    pub async fn is_handled(
        &self,
        consumer: &str,
        event: EventId,
    ) -> Result<bool, redis::RedisError> {
        let (done, _) = self.keys(consumer, event);
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS").arg(&done).query_async(&mut conn).await
    }

    /// Claims `event` for `consumer`.
    ///
    /// # Errors
    /// Redis failing or out of reach.
    pub async fn claim(&self, consumer: &str, event: EventId) -> Result<Claim, redis::RedisError> {
        let (done, claim) = self.keys(consumer, event);
        let mut conn = self.conn.clone();
        let handled: bool = redis::cmd("EXISTS")
            .arg(&done)
            .query_async(&mut conn)
            .await?;
        if handled {
            return Ok(Claim::Done);
        }
        let token = uuid::Uuid::now_v7().simple().to_string();
        let acquired: Option<String> = redis::cmd("SET")
            .arg(&claim)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.claim_ttl))
            .query_async(&mut conn)
            .await?;
        if acquired.is_none() {
            return Ok(Claim::InProgress);
        }
        // Marked done between the look and the claim.
        let handled: bool = redis::cmd("EXISTS")
            .arg(&done)
            .query_async(&mut conn)
            .await?;
        if handled {
            self.abandon(consumer, event, &token).await?;
            return Ok(Claim::Done);
        }
        Ok(Claim::New(token))
    }

    /// Marks `event` handled by `consumer` and drops the claim, in one round trip (the mark is
    /// what closes the at-least-once window, so nothing else waits before it).
    ///
    /// # Errors
    /// Redis failing: the event is then handled again when redelivered.
    pub async fn finish(
        &self,
        consumer: &str,
        event: EventId,
        token: &str,
    ) -> Result<(), redis::RedisError> {
        let (done, claim) = self.keys(consumer, event);
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("EVAL")
            .arg(FINISH)
            .arg(2)
            .arg(&done)
            .arg(&claim)
            .arg(millis(self.retention))
            .arg(token)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Drops this caller's claim (the handler failed: the next delivery tries again).
    ///
    /// # Errors
    /// Redis failing (the claim then expires by itself).
    pub async fn abandon(
        &self,
        consumer: &str,
        event: EventId,
        token: &str,
    ) -> Result<(), redis::RedisError> {
        let (_, claim) = self.keys(consumer, event);
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&claim)
            .arg(token)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// A [`MessageHandler`] behind a [`RedisInbox`]: a redelivered event is
/// [`Handled::Duplicate`]; one another consumer is handling is waited for (as an outage: the
/// message is tried again, its tries not spent); Redis out of reach is an outage too.
#[derive(Debug)]
pub struct Deduplicated<H> {
    inner: H,
    inbox: RedisInbox,
}

impl<H> Deduplicated<H> {
    /// `inner` behind `inbox`, under `inner`'s name.
    pub fn new(inner: H, inbox: RedisInbox) -> Self {
        Self { inner, inbox }
    }

    /// The handler inside.
    pub fn inner(&self) -> &H {
        &self.inner
    }
}

fn unavailable(error: &redis::RedisError) -> HandleError {
    HandleError::Unavailable(format!("Redis: {error}").into())
}

#[async_trait::async_trait]
impl<H: MessageHandler> MessageHandler for Deduplicated<H> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn set_retries(&mut self, attempts: u32, backoff: Duration) {
        self.inner.set_retries(attempts, backoff);
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        let name = self.inner.name().to_owned();
        let token = match self
            .inbox
            .claim(&name, event.event_id)
            .await
            .map_err(|e| unavailable(&e))?
        {
            Claim::Done => return Ok(Handled::Duplicate),
            Claim::InProgress => {
                return Err(HandleError::Unavailable(
                    format!(
                        "event {} is being handled by another consumer of `{name}`",
                        event.event_id
                    )
                    .into(),
                ));
            }
            Claim::New(token) => token,
        };
        match self.inner.handle(event).await {
            Ok(handled) => {
                if let Err(error) = self.inbox.finish(&name, event.event_id, &token).await {
                    tracing::error!(consumer = %name, event = %event.event_id, %error, "handled, but the inbox mark was not stored: a redelivery handles it again");
                }
                Ok(handled)
            }
            Err(error) => {
                if let Err(release) = self.inbox.abandon(&name, event.event_id, &token).await {
                    tracing::warn!(consumer = %name, event = %event.event_id, error = %release, "the inbox claim was not released; it expires");
                }
                Err(error)
            }
        }
    }
}
