//! Redis idempotency and the Redis inbox against the real Redis (`REDIS_URL`, default
//! redis://127.0.0.1:6379), and a `redis-server` of the test's own for the restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use evently_redis::{Claim, Deduplicated, IdempotencyError, RedisIdempotency, RedisInbox};
use evently_transport::{HandleError, Handled, MessageHandler};

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unique(name: &str) -> String {
    format!("test:{name}:{}", uuid::Uuid::now_v7().simple())
}

async fn idempotency(prefix: &str) -> RedisIdempotency {
    let conn = evently_redis::connect(&url())
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

    // One key in two tenants is two keys; each tenant replays its own outcome.
    for (tenant, value) in [("acme", 11u32), ("globex", 22)] {
        let scoped =
            idem.for_tenant(&evently_core::TenantId::new(tenant).unwrap_or_else(|e| panic!("{e}")));
        for replayed in [false, true] {
            let done = scoped
                .execute("k", &("pay", 10), || async {
                    Ok::<_, std::io::Error>(value)
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                (done.value, done.replayed),
                (value, replayed),
                "tenant {tenant}"
            );
        }
    }
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
        if let Ok(conn) = evently_redis::connect(&url).await {
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

    async fn handle(&mut self, _: &evently_core::StoredEvent) -> Result<Handled, HandleError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(HandleError::Failed("down".into()));
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(Handled::Applied)
    }
}

fn event() -> evently_core::StoredEvent {
    evently_core::StoredEvent {
        event_id: evently_core::EventId::new(),
        stream: evently_core::StreamId::new("order", "o-1"),
        version: 1,
        checkpoint: evently_core::Checkpoint::START,
        recorded_at: chrono::Utc::now(),
        event_type: "OrderPlaced".into(),
        schema_version: 1,
        payload: serde_json::json!({}),
        metadata: evently_core::Metadata::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_inbox_handles_each_event_once() {
    let conn = evently_redis::connect(&url())
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
    let other = evently_core::EventId::new();
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

/// Commands through the gateway with Redis as the key record: 8 callers race over 60 keys (a
/// deposit each, on 6 accounts): each deposit is recorded once, every caller gets the same
/// events back, a key reused for another account is refused, and a rejected command records
/// nothing (its retry decides again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_through_the_gateway_run_once_per_key() {
    use cqrs_examples::bank::{Account, AccountCommand, AccountError, Deposit};
    use evently_core::{CommandError, CommandGateway, CommandMetadata, InMemoryEventStore};

    let idem = idempotency(&unique("gateway"))
        .await
        .with_wait(Duration::from_secs(10));
    let accounts = Arc::new(CommandGateway::<Account, _>::new(InMemoryEventStore::new()));
    for a in 0..6 {
        accounts
            .execute(
                format!("acct-{a}"),
                AccountCommand::Open {
                    owner: format!("owner {a}"),
                },
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let tasks: Vec<_> = (0..8)
        .map(|caller| {
            let idem = idem.clone();
            let accounts = accounts.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for k in 0..60usize {
                    let index = (k + caller * 7) % 60;
                    let command = AccountCommand::Deposit(Deposit {
                        amount_cents: 100,
                        reference: format!("deposit {index}"),
                    });
                    let outcome = idem
                        .execute_command(
                            &accounts,
                            &format!("deposit-{index}"),
                            format!("acct-{}", index % 6),
                            command,
                            CommandMetadata::new(),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    let events = &outcome.value.events;
                    assert_eq!(events.len(), 1, "one deposit event for key {index}");
                    seen.push((
                        index,
                        outcome.replayed,
                        outcome.value.version,
                        events[0].event_id,
                    ));
                }
                seen
            })
        })
        .collect();
    let mut by_key: HashMap<usize, Vec<(bool, u64, evently_core::EventId)>> = HashMap::new();
    for task in tasks {
        for (index, replayed, version, event) in task.await.unwrap_or_else(|e| panic!("{e}")) {
            by_key
                .entry(index)
                .or_default()
                .push((replayed, version, event));
        }
    }
    for (index, answers) in &by_key {
        assert_eq!(answers.len(), 8);
        assert_eq!(
            answers.iter().filter(|(replayed, ..)| !replayed).count(),
            1,
            "key {index} executed by exactly one caller"
        );
        assert!(
            answers
                .iter()
                .all(|a| (a.1, a.2) == (answers[0].1, answers[0].2)),
            "every caller of key {index} gets the same version and event"
        );
    }
    for a in 0..6 {
        let (state, version) = accounts
            .load(format!("acct-{a}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            state.balance_cents,
            10 * 100,
            "acct-{a}: 10 deposits, once each"
        );
        assert_eq!(version, 11);
    }

    // The key of a deposit on acct-0 used for acct-1.
    let reused = idem
        .execute_command(
            &accounts,
            "deposit-0",
            "acct-1",
            AccountCommand::Withdraw { amount_cents: 1 },
            CommandMetadata::new(),
        )
        .await;
    assert!(
        matches!(reused, Err(IdempotencyError::KeyReused { ref key }) if key == "deposit-0"),
        "{reused:?}"
    );

    // Rejected: nothing recorded, the retry after a deposit decides again and succeeds.
    let withdraw = || AccountCommand::Withdraw {
        amount_cents: 5_000,
    };
    let rejected = idem
        .execute_command(&accounts, "w", "acct-2", withdraw(), CommandMetadata::new())
        .await;
    assert!(
        matches!(
            rejected,
            Err(IdempotencyError::Operation(CommandError::Rejected(
                AccountError::InsufficientFunds { .. }
            )))
        ),
        "{rejected:?}"
    );
    let topped_up = AccountCommand::Deposit(Deposit {
        amount_cents: 10_000,
        reference: "top-up".into(),
    });
    accounts
        .execute("acct-2", topped_up, CommandMetadata::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let retried = idem
        .execute_command(&accounts, "w", "acct-2", withdraw(), CommandMetadata::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!retried.replayed);
    assert_eq!(retried.value.version, 13);
}

/// A handler whose effect (counted per event) comes after 1 ms of work, and which notes when
/// its effect ended.
struct Effect {
    effects: Arc<std::sync::Mutex<HashMap<evently_core::EventId, u64>>>,
    ended: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

#[async_trait::async_trait]
impl MessageHandler for Effect {
    fn name(&self) -> &str {
        "effect"
    }

    async fn handle(&mut self, event: &evently_core::StoredEvent) -> Result<Handled, HandleError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        *self
            .effects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(event.event_id)
            .or_default() += 1;
        *self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
        Ok(Handled::Applied)
    }
}

/// The at-least-once window of the Redis inbox, measured: 300 events, each handled by a
/// consumer cut at a random point (0 to 3 ms into a handler whose effect lands after 1 ms),
/// then redelivered at once until handled. An event's effect happens twice exactly when the
/// cut fell after its effect and before its mark was stored, never otherwise; and then 1,000
/// uncut events give the window's length (effect end -> handled, the mark stored and the claim
/// released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_inbox_window_is_between_the_effect_and_the_mark() {
    let conn = evently_redis::connect(&url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let inbox = RedisInbox::new(conn)
        .with_prefix(unique("window"))
        .with_claim_ttl(Duration::from_millis(100));
    let effects = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let ended = Arc::new(std::sync::Mutex::new(None));
    let mut handler = Deduplicated::new(
        Effect {
            effects: effects.clone(),
            ended: ended.clone(),
        },
        inbox.clone(),
    );
    let count = |id| {
        effects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .copied()
            .unwrap_or(0)
    };
    let mut seed = u64::from(std::process::id()) | 1;
    let (mut before_effect, mut in_window, mut after_mark) = (0, 0, 0);
    for _ in 0..300 {
        let event = event();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let cut = Duration::from_micros(seed % 3_000);
        let finished = tokio::time::timeout(cut, handler.handle(&event))
            .await
            .is_ok();
        let effect_done = count(event.event_id) == 1;
        let marked = inbox
            .is_handled("effect", event.event_id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let double = effect_done && !marked;
        match (effect_done, marked) {
            (false, _) => before_effect += 1,
            (true, false) => in_window += 1,
            (true, true) => after_mark += 1,
        }
        assert!(!finished || marked, "a finished handling is marked");
        // Redelivered at once: tried until handled (a cut claim holds it up to 100 ms).
        loop {
            match handler.handle(&event).await {
                Ok(Handled::Applied | Handled::Duplicate) => break,
                Ok(other) => panic!("{other:?}"),
                Err(HandleError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(error) => panic!("{error}"),
            }
        }
        assert_eq!(
            count(event.event_id),
            1 + u64::from(double),
            "the effect happens twice exactly when the cut fell in the window"
        );
    }
    println!(
        "Redis inbox, 300 cut handlings: {before_effect} cut before the effect (handled once), {in_window} cut between the effect and the mark (handled twice), {after_mark} cut after the mark (handled once)"
    );
    assert!(before_effect > 0 && after_mark > 0, "the cuts spread");

    let mut windows = Vec::new();
    for _ in 0..1_000 {
        let event = event();
        let result = handler.handle(&event).await;
        let returned = std::time::Instant::now();
        assert_eq!(result.ok(), Some(Handled::Applied));
        let effect_end = ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(|| panic!("the effect ran"));
        windows.push(returned.duration_since(effect_end).as_secs_f64() * 1e3);
    }
    windows.sort_by(f64::total_cmp);
    println!(
        "Redis inbox at-least-once window (effect end -> mark stored and claim released), 1,000 events: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        windows[500], windows[990], windows[999]
    );
}
