//! Redis idempotency and the Redis inbox against the real Redis (`REDIS_URL`, default
//! redis://127.0.0.1:6379), and a `redis-server` of the test's own for the restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cqrs_redis::{Claim, Deduplicated, IdempotencyError, RedisIdempotency, RedisInbox};
use cqrs_transport::{HandleError, Handled, MessageHandler};

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unique(name: &str) -> String {
    format!("test:{name}:{}", uuid::Uuid::now_v7().simple())
}

async fn idempotency(prefix: &str) -> RedisIdempotency {
    let conn = cqrs_redis::connect(&url())
        .await
        .unwrap_or_else(|e| panic!("Redis at {}: {e}", url()));
    RedisIdempotency::new(conn).with_prefix(prefix)
}

/// 8 callers race over 300 keys, each calling every key: each operation runs once, and every
/// caller gets the first outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_callers_execute_each_key_once_and_share_its_outcome() {
    let idem = idempotency(&unique("race"))
        .await
        .with_wait(Duration::from_secs(10));
    let runs: Arc<Vec<AtomicU64>> = Arc::new((0..300).map(|_| AtomicU64::new(0)).collect());
    let tasks: Vec<_> = (0..8)
        .map(|caller| {
            let idem = idem.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                let mut seen = HashMap::new();
                for k in 0..300usize {
                    let key = format!("k{}", (k + caller * 37) % 300);
                    let index = (k + caller * 37) % 300;
                    let runs = runs.clone();
                    let label = key.clone();
                    let outcome = idem
                        .execute(&key, &("place", index), || async move {
                            runs[index].fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            Ok::<_, std::io::Error>(format!("{label} by caller {caller}"))
                        })
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    seen.insert(index, outcome.value);
                }
                seen
            })
        })
        .collect();
    let mut outcomes: Vec<HashMap<usize, String>> = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|e| panic!("{e}")));
    }
    for (index, count) in runs.iter().enumerate() {
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "key k{index} ran more than once"
        );
        let first = &outcomes[0][&index];
        assert!(
            outcomes.iter().all(|o| &o[&index] == first),
            "every caller gets the first outcome of k{index}"
        );
    }
}

#[tokio::test]
async fn a_key_reused_with_another_request_is_refused() {
    let idem = idempotency(&unique("reuse")).await;
    let first = idem
        .execute("k", &("pay", 10), || async {
            Ok::<_, std::io::Error>(1u32)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((first.value, first.replayed), (1, false));
    let again = idem
        .execute("k", &("pay", 10), || async {
            Ok::<_, std::io::Error>(2u32)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((again.value, again.replayed), (1, true));
    let other = idem
        .execute("k", &("pay", 99), || async {
            Ok::<_, std::io::Error>(3u32)
        })
        .await;
    assert!(
        matches!(other, Err(IdempotencyError::KeyReused { ref key }) if key == "k"),
        "{other:?}"
    );
    // A failed operation stores nothing: the retry executes.
    let failed = idem
        .execute("f", &"x", || async {
            Err::<u32, _>(std::io::Error::other("down"))
        })
        .await;
    assert!(
        matches!(failed, Err(IdempotencyError::Operation(_))),
        "{failed:?}"
    );
    let retried = idem
        .execute("f", &"x", || async { Ok::<_, std::io::Error>(7u32) })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((retried.value, retried.replayed), (7, false));
}

/// A holder killed mid-operation (its task aborted, the lock left): a concurrent call is told
/// it is in progress; after the lock's TTL the key is usable and the operation runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lock_holder_frees_the_key_after_the_ttl() {
    let idem = idempotency(&unique("killed"))
        .await
        .with_lock_ttl(Duration::from_millis(300));
    let started = Arc::new(tokio::sync::Notify::new());
    let holder = {
        let idem = idem.clone();
        let started = started.clone();
        tokio::spawn(async move {
            idem.execute("k", &"req", || async move {
                started.notify_one();
                std::future::pending::<Result<u32, std::io::Error>>().await
            })
            .await
        })
    };
    started.notified().await;
    holder.abort();
    let busy = idem
        .execute("k", &"req", || async { Ok::<_, std::io::Error>(1u32) })
        .await;
    assert!(
        matches!(busy, Err(IdempotencyError::InProgress { .. })),
        "{busy:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = idem
        .execute("k", &"req", || async { Ok::<_, std::io::Error>(2u32) })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((after.value, after.replayed), (2, false));
}

/// An operation longer than the lock's TTL keeps its lock (renewed while it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_operation_keeps_its_lock() {
    let idem = idempotency(&unique("long"))
        .await
        .with_lock_ttl(Duration::from_millis(150));
    let slow = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute("k", &"req", || async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                Ok::<_, std::io::Error>(1u32)
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let meanwhile = idem
        .execute("k", &"req", || async { Ok::<_, std::io::Error>(2u32) })
        .await;
    assert!(
        matches!(meanwhile, Err(IdempotencyError::InProgress { .. })),
        "{meanwhile:?}"
    );
    let first = slow
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.value, 1);
}

/// A Redis of the test's own (no persistence, as on these machines) restarted mid-run: while it
/// is down a call is a typed Redis error and runs nothing; after the restart the keys are
/// forgotten and a retry executes again, as the crate's docs say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_forgets_the_keys_as_documented() {
    let port = 16_379 + (std::process::id() % 1_000) as u16;
    let start = || {
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"))
    };
    let mut server = start();
    let url = format!("redis://127.0.0.1:{port}");
    let conn = loop {
        if let Ok(conn) = cqrs_redis::connect(&url).await {
            break conn;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let idem = RedisIdempotency::new(conn);
    let runs = Arc::new(AtomicU64::new(0));
    let call = |idem: RedisIdempotency, runs: Arc<AtomicU64>| async move {
        idem.execute("k", &"req", || async move {
            Ok::<_, std::io::Error>(runs.fetch_add(1, Ordering::SeqCst))
        })
        .await
    };
    let first = call(idem.clone(), runs.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((first.value, first.replayed), (0, false));
    let again = call(idem.clone(), runs.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.replayed);
    server.kill().unwrap_or_else(|e| panic!("{e}"));
    let _ = server.wait();
    let down = call(idem.clone(), runs.clone()).await;
    assert!(matches!(down, Err(IdempotencyError::Redis(_))), "{down:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "nothing ran while Redis was down"
    );
    let mut server = start();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        match call(idem.clone(), runs.clone()).await {
            Ok(outcome) => break outcome,
            Err(IdempotencyError::Redis(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("{other}"),
        }
    };
    assert_eq!(
        (after.value, after.replayed),
        (1, false),
        "the restarted Redis forgot the key: the operation ran again"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// Counts what it handles; fails while `failing` is set.
struct Counting {
    handled: Arc<AtomicU64>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl MessageHandler for Counting {
    fn name(&self) -> &str {
        "counting"
    }

    async fn handle(&mut self, _: &cqrs_core::StoredEvent) -> Result<Handled, HandleError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(HandleError::Failed("down".into()));
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(Handled::Applied)
    }
}

fn event() -> cqrs_core::StoredEvent {
    cqrs_core::StoredEvent {
        event_id: cqrs_core::EventId::new(),
        stream: cqrs_core::StreamId::new("order", "o-1"),
        version: 1,
        checkpoint: cqrs_core::Checkpoint::START,
        recorded_at: chrono::Utc::now(),
        event_type: "OrderPlaced".into(),
        schema_version: 1,
        payload: serde_json::json!({}),
        metadata: cqrs_core::Metadata::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_inbox_handles_each_event_once() {
    let conn = cqrs_redis::connect(&url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let inbox = RedisInbox::new(conn).with_prefix(unique("inbox"));
    let handled = Arc::new(AtomicU64::new(0));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut handler = Deduplicated::new(
        Counting {
            handled: handled.clone(),
            failing: failing.clone(),
        },
        inbox.clone(),
    );
    let event = event();
    // A failure releases the claim: the next delivery handles it.
    assert!(handler.handle(&event).await.is_err());
    failing.store(false, Ordering::SeqCst);
    assert_eq!(handler.handle(&event).await.ok(), Some(Handled::Applied));
    assert_eq!(handler.handle(&event).await.ok(), Some(Handled::Duplicate));
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    // Another consumer holding a claim: the event waits (an outage, its tries not spent).
    let other = cqrs_core::EventId::new();
    let Claim::New(_token) = inbox
        .claim("counting", other)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    else {
        panic!("a fresh event is new");
    };
    let mut busy = event.clone();
    busy.event_id = other;
    assert!(matches!(
        handler.handle(&busy).await,
        Err(HandleError::Unavailable(_))
    ));
}
