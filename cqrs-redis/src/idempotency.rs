//! Idempotent command execution across processes: the outcome of a command stored under its key,
//! a lock while it runs, so a retried request gets the first outcome instead of a second effect.

use std::future::Future;
use std::time::{Duration, Instant};

use evently_core::{
    Aggregate, AggregateId, CommandError, CommandGateway, CommandMetadata, EventStore, Executed,
    KeyRecord, StreamId,
};
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Deletes `KEYS[1]` only while it holds `ARGV[1]` (the caller's lock token).
pub(crate) const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";
/// One round trip to start an execution: the stored outcome `KEYS[1]` if there is one
/// (`{1, outcome}`), else the lock `KEYS[2]` taken with token `ARGV[1]` for `ARGV[2]` ms
/// (`{2, ''}`), else the token of the caller holding it (`{3, token}`).
const ACQUIRE: &str = "local r = redis.call('get', KEYS[1]) if r then return {1, r} end if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end return {3, redis.call('get', KEYS[2]) or ''}";
/// One round trip to end an execution: the outcome `ARGV[1]` stored under `KEYS[1]` for
/// `ARGV[2]` ms, then the lock `KEYS[2]` released if it still holds `ARGV[3]`.
const COMPLETE: &str = "redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) if redis.call('get', KEYS[2]) == ARGV[3] then return redis.call('del', KEYS[2]) end return 0";
/// Extends `KEYS[1]` to `ARGV[2]` ms only while it holds `ARGV[1]`.
const RENEW: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";

/// Why an idempotent execution gave no outcome.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError<E> {
    /// Another caller is executing under this key right now (and waiting was off, or ran out).
    #[error("idempotency key `{key}`: another request with it is being executed")]
    InProgress {
        /// The key.
        key: String,
    },
    /// The key was used with another request (a client bug, or a key collision).
    #[error("idempotency key `{key}` was used with another request")]
    KeyReused {
        /// The key.
        key: String,
    },
    /// Redis failed or could not be reached.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored outcome does not decode into the type asked for (another type was stored under
    /// the key, or the stored value was changed).
    #[error("idempotency key `{key}`: the stored outcome does not decode: {source}")]
    Decode {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The request or the outcome does not serialize.
    #[error("idempotency: cannot serialize: {0}")]
    Encode(#[source] serde_json::Error),
    /// The operation failed: nothing is stored, a retry executes it again.
    #[error(transparent)]
    Operation(E),
}

/// An outcome and whether it was stored by an earlier execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    /// The first execution's result.
    pub value: T,
    /// `true` when this call executed nothing and returned what an earlier one stored.
    pub replayed: bool,
}

/// What is stored under a key: the request's fingerprint and the outcome.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    fingerprint: String,
    value: serde_json::Value,
}

/// Executes an operation once per idempotency key, with Redis as the record: `SET lock NX PX`
/// makes one caller the executor (its lock renewed while the operation runs, released when it
/// ends or expiring when its holder dies), its successful outcome is stored with a TTL and
/// returned to every later call with the key, a key reused with another request is refused, and
/// a concurrent call gets [`IdempotencyError::InProgress`] or waits for the outcome
/// ([`with_wait`](Self::with_wait)).
///
/// Unlike the PostgreSQL command keys (`CommandGateway::execute_idempotent`), the record is not
/// written in the transaction of the effect: a process that dies after the effect and before the
/// outcome is stored leaves the key free once the lock expires, and a retry executes again (the
/// at-least-once window). A Redis that keeps nothing on disk forgets every key when it restarts.
#[derive(Clone)]
pub struct RedisIdempotency {
    conn: ConnectionManager,
    prefix: String,
    lock_ttl: Duration,
    result_ttl: Duration,
    wait: Option<Duration>,
}

impl std::fmt::Debug for RedisIdempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIdempotency")
            .field("prefix", &self.prefix)
            .field("lock_ttl", &self.lock_ttl)
            .field("result_ttl", &self.result_ttl)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

/// Milliseconds of `d`, at least 1 (Redis refuses 0), saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Connects to `url` (`redis://127.0.0.1:6379`) with a connection manager (it reconnects by
/// itself; a command during an outage fails with the connection's error).
///
/// # Errors
/// A malformed URL, or a server that cannot be reached.
pub async fn connect(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    ConnectionManager::new(client).await
}

impl RedisIdempotency {
    /// Keys under `cqrs:idem`, a 30 s lock (renewed while the operation runs), outcomes kept a
    /// day, concurrent calls answered [`IdempotencyError::InProgress`] at once.
    #[must_use]
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: "cqrs:idem".to_owned(),
            lock_ttl: Duration::from_secs(30),
            result_ttl: Duration::from_secs(86_400),
            wait: None,
        }
    }

    /// The prefix of its Redis keys.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The keys of `tenant` (under `<prefix>:t:<tenant>`): one key used by two tenants is two
    /// keys, each executed once (a tenant id holds no `:`, so no tenant's keys can reach
    /// another's).
    #[must_use]
    pub fn for_tenant(&self, tenant: &evently_core::TenantId) -> Self {
        Self {
            prefix: format!("{}:t:{tenant}", self.prefix),
            ..self.clone()
        }
    }

    /// How long a lock outlives a holder that died (at least 100 ms; renewed every third of it
    /// while the operation runs).
    #[must_use]
    pub fn with_lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl.max(Duration::from_millis(100));
        self
    }

    /// How long an outcome is kept (at least 1 s).
    #[must_use]
    pub fn with_result_ttl(mut self, ttl: Duration) -> Self {
        self.result_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// A concurrent call waits up to `wait` for the outcome (polling every 10 ms) instead of
    /// getting [`IdempotencyError::InProgress`] at once.
    #[must_use]
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Executes `operation` for `request` once per `key` (see the type's docs). The request is
    /// fingerprinted (a name-based UUID of its JSON) to refuse a key reused with another one.
    ///
    /// # Errors
    /// [`IdempotencyError`]: in progress elsewhere, the key reused, Redis failing, an outcome
    /// that does not decode, or the operation's own error (nothing stored).
    pub async fn execute<R, T, E, F, Fut>(
        &self,
        key: &str,
        request: &R,
        operation: F,
    ) -> Result<Outcome<T>, IdempotencyError<E>>
    where
        R: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let body = serde_json::to_vec(request).map_err(IdempotencyError::Encode)?;
        let fingerprint = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &body)
            .simple()
            .to_string();
        let result_key = format!("{}:result:{key}", self.prefix);
        let lock_key = format!("{}:lock:{key}", self.prefix);
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let token = format!("{}:{fingerprint}", uuid::Uuid::now_v7().simple());
        loop {
            let (found, value): (u8, String) = redis::cmd("EVAL")
                .arg(ACQUIRE)
                .arg(2)
                .arg(&result_key)
                .arg(&lock_key)
                .arg(&token)
                .arg(millis(self.lock_ttl))
                .query_async(&mut conn)
                .await?;
            match found {
                1 => return Self::decode(key, &value, &fingerprint),
                2 => break,
                // The holder's token says which request it executes.
                _ if !value.is_empty() && !value.ends_with(&fingerprint) => {
                    return Err(IdempotencyError::KeyReused {
                        key: key.to_owned(),
                    });
                }
                _ => {}
            }
            match self.wait {
                Some(wait) if started.elapsed() < wait => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => {
                    return Err(IdempotencyError::InProgress {
                        key: key.to_owned(),
                    });
                }
            }
        }
        let outcome = self.run_locked(&lock_key, &token, operation).await;
        let value = match outcome {
            Ok(value) => value,
            Err(error) => {
                self.release(&mut conn, &lock_key, &token).await;
                return Err(IdempotencyError::Operation(error));
            }
        };
        let stored = serde_json::to_value(&value)
            .map(|value| Stored {
                fingerprint: fingerprint.clone(),
                value,
            })
            .and_then(|s| serde_json::to_string(&s));
        match stored {
            Ok(text) => {
                let saved: Result<i64, redis::RedisError> = redis::cmd("EVAL")
                    .arg(COMPLETE)
                    .arg(2)
                    .arg(&result_key)
                    .arg(&lock_key)
                    .arg(text)
                    .arg(millis(self.result_ttl))
                    .arg(&token)
                    .query_async(&mut conn)
                    .await;
                if let Err(error) = saved {
                    // The operation happened: its outcome is returned, but a retry with this
                    // key will execute again once the lock expires (the at-least-once window).
                    tracing::error!(%key, %error, "the outcome of an idempotent operation could not be stored; a retry will execute it again");
                }
            }
            Err(error) => {
                tracing::error!(%key, %error, "the outcome of an idempotent operation does not serialize; a retry will execute it again");
                self.release(&mut conn, &lock_key, &token).await;
            }
        }
        Ok(Outcome {
            value,
            replayed: false,
        })
    }

    /// [`CommandGateway::execute_idempotent`] with Redis as the key record: `command` runs once
    /// per `key` through `gateway`; what Redis keeps is the [`KeyRecord`] (the stream and the
    /// versions of the events the command appended), and a retry with the key gets those events
    /// back from the store ([`CommandGateway::recorded`]), `replayed` set, without deciding
    /// again. The key is fingerprinted with the stream: a key used for another aggregate is
    /// [`IdempotencyError::KeyReused`]. A rejected command records nothing (a retry decides
    /// again), as with the store's keys.
    ///
    /// For stores without command keys, or when the key must be shared with effects outside the
    /// store; the record is not in the events' transaction (see the type's docs for the window
    /// that leaves).
    ///
    /// # Errors
    /// As [`execute`](Self::execute), with the gateway's [`CommandError`] as the operation's
    /// error (also when the store fails while rebuilding a replayed outcome).
    pub async fn execute_command<A, S>(
        &self,
        gateway: &CommandGateway<A, S>,
        key: &str,
        id: impl Into<AggregateId>,
        command: A::Command,
        metadata: CommandMetadata,
    ) -> Result<Outcome<Executed<A::Event>>, IdempotencyError<CommandError<A::Error>>>
    where
        A: Aggregate,
        A::Command: Clone,
        S: EventStore,
    {
        let stream = StreamId::new(A::NAME, id.into());
        let mut executed = None;
        let record = self
            .execute(key, &stream, || async {
                let done = gateway
                    .execute(stream.aggregate_id.clone(), command, metadata)
                    .await?;
                let record = KeyRecord {
                    key: key.to_owned(),
                    stream: done.stream.clone(),
                    first_version: done.version + 1 - done.events.len() as u64,
                    last_version: done.version,
                };
                executed = Some(done);
                Ok(record)
            })
            .await?;
        match executed {
            Some(value) => Ok(Outcome {
                value,
                replayed: false,
            }),
            None => gateway
                .recorded(record.value)
                .await
                .map(|value| Outcome {
                    value,
                    replayed: true,
                })
                .map_err(IdempotencyError::Operation),
        }
    }

    /// Runs `operation`, renewing the lock every third of its TTL while it runs.
    async fn run_locked<T, E, F, Fut>(
        &self,
        lock_key: &str,
        token: &str,
        operation: F,
    ) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let operation = operation();
        tokio::pin!(operation);
        // Not `interval`: its first tick waits for the timer wheel's next millisecond, a
        // millisecond added to every execution.
        let every = self.lock_ttl / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut conn = self.conn.clone();
        loop {
            tokio::select! {
                outcome = &mut operation => return outcome,
                _ = renew.tick() => {
                    let renewed: Result<i64, redis::RedisError> = redis::cmd("EVAL")
                        .arg(RENEW)
                        .arg(1)
                        .arg(lock_key)
                        .arg(token)
                        .arg(millis(self.lock_ttl))
                        .query_async(&mut conn)
                        .await;
                    if !matches!(renewed, Ok(1)) {
                        tracing::warn!(lock = lock_key, "an idempotency lock could not be renewed: another caller may execute the same key");
                    }
                }
            }
        }
    }

    /// The outcome stored as `text`, if it was stored for the request with `fingerprint`.
    fn decode<T: DeserializeOwned, E>(
        key: &str,
        text: &str,
        fingerprint: &str,
    ) -> Result<Outcome<T>, IdempotencyError<E>> {
        let decode = |source| IdempotencyError::Decode {
            key: key.to_owned(),
            source,
        };
        let stored: Stored = serde_json::from_str(text).map_err(decode)?;
        if stored.fingerprint != fingerprint {
            return Err(IdempotencyError::KeyReused {
                key: key.to_owned(),
            });
        }
        let value = serde_json::from_value(stored.value).map_err(decode)?;
        Ok(Outcome {
            value,
            replayed: true,
        })
    }

    /// Releases the lock if it is still this caller's (best effort: it expires anyway).
    async fn release(&self, conn: &mut ConnectionManager, lock_key: &str, token: &str) {
        let released: Result<i64, redis::RedisError> = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(lock_key)
            .arg(token)
            .query_async(conn)
            .await;
        if let Err(error) = released {
            tracing::warn!(lock = lock_key, %error, "an idempotency lock could not be released; it expires after its TTL");
        }
    }
}
