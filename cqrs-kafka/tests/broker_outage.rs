//! The relay against a Kafka-protocol broker of the test's own, stopped and restarted mid-stream
//! (a test binary of its own: its timing must not share the machine with the other Kafka tests).

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

#[path = "support/mod.rs"]
#[allow(
    dead_code,
    reason = "the shared broker's address is for the other test files"
)]
mod support;

mod common;
use common::*;

use std::time::{Duration, Instant};

use evently_core::prelude::*;
use evently_kafka::{KafkaConfig, KafkaSink, OutboxRelay};
use evently_postgres::PostgresEventStore;
use support::unique;

/// A tansu broker of the test's own on a free loopback port, storing in SQLite in a directory of
/// its own, so that what it acknowledged survives a restart as on a real Kafka broker (the shared
/// broker of the other tests keeps everything in memory and forgets its topics when it stops).
struct OwnBroker {
    dir: std::path::PathBuf,
    port: u16,
    child: Option<std::process::Child>,
    /// The length of the log when the broker last started.
    log_mark: u64,
    /// How many times [`OwnBroker::repair`] restarted it.
    repairs: u32,
}

impl OwnBroker {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("tansu"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("no free port: {e}"))
            .port();
        let mut broker = Self {
            dir,
            port,
            child: None,
            log_mark: 0,
            repairs: 0,
        };
        broker.restart();
        broker
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker process on the same port and storage, and waits until it listens.
    fn restart(&mut self) {
        // `scripts/kafka-up.sh` installs tansu (with its SQLite engine) in ~/.cargo/bin.
        let binary = std::env::var_os("TANSU").map_or_else(
            || {
                let home = std::env::var_os("HOME").unwrap_or_default();
                let installed = std::path::Path::new(&home).join(".cargo/bin/tansu");
                if installed.exists() {
                    installed
                } else {
                    "tansu".into()
                }
            },
            Into::into,
        );
        let url = format!("tcp://{}", self.address());
        self.log_mark = std::fs::metadata(self.dir.join("broker.log")).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        let child = std::process::Command::new(&binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): scripts/kafka-up.sh installs tansu",
                    binary.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.address()).is_err() {
            if Instant::now() > deadline
                || self
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
                panic!(
                    "tansu did not start on {} (it needs the `libsql` feature; \
                     scripts/kafka-up.sh installs it so); its log:\n{log}",
                    self.address()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the broker's storage service died since it last started: tansu 0.6 sometimes
    /// answers every request with `Storage(UnableToSend)` after a restart on its SQLite store,
    /// and stays so until it is started again (a broker fault, not the relay's).
    fn storage_failed(&self) -> bool {
        std::fs::read(self.dir.join("broker.log")).is_ok_and(|log| {
            let since = usize::try_from(self.log_mark).unwrap_or(0).min(log.len());
            String::from_utf8_lossy(&log[since..]).contains("UnableToSend")
        })
    }

    /// Starts the broker again if its storage failed (at most 3 times in a test): the broker, not
    /// the relay, is broken then, and an operator would restart it; the relay must then catch
    /// up by itself, losing and reordering nothing.
    fn repair(&mut self) {
        if self.repairs < 3 && self.storage_failed() {
            eprintln!(
                "the broker's storage failed after its restart (UnableToSend): restarting it"
            );
            self.repairs += 1;
            self.kill();
            self.restart();
        }
    }

    /// Kills the broker process (SIGKILL: no clean shutdown).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The stored checkpoint of the relay named `name`.
async fn relayed(store: &PostgresEventStore, name: &str) -> evently_core::Checkpoint {
    evently_postgres::control::read_checkpoint(store, name)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the relay's stored checkpoint passes `past`: how long that took.
async fn relayed_past(
    store: &PostgresEventStore,
    name: &str,
    past: evently_core::Checkpoint,
    broker: &mut OwnBroker,
) -> Duration {
    let started = Instant::now();
    while relayed(store, name).await <= past {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the relay did not move past {past:?} in 90 s"
        );
        broker.repair();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_stopped_and_restarted_mid_stream_loses_and_reorders_nothing() {
    // Outages shorter than the message timeout are bridged by the producer (it keeps the
    // messages and sends them on reconnection); a longer one fails the deliveries in flight, and
    // the relay starts again from its checkpoint with a new producer.
    const MESSAGE_TIMEOUT: Duration = Duration::from_millis(2_500);
    const OUTAGES: [Duration; 3] = [
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(2),
    ];
    let mut broker = OwnBroker::start();
    let store = pg::fresh_store("k_restart").await;
    let (map, topic) = account_topics("restart", 6);
    // Reconnect attempts at most every 500 ms (librdkafka's default backs off to 10 s).
    let config = KafkaConfig::new(broker.address())
        .set("reconnect.backoff.max.ms", "500")
        .set(
            "message.timeout.ms",
            MESSAGE_TIMEOUT.as_millis().to_string(),
        );
    let name = "restart-relay";
    let mut relay = KafkaSink::new(&config)
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "relay"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_name(name)
        .with_batch(50);
    relay
        .sink_mut()
        .create_topics(&["account"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relaying = tokio::spawn(relay.run(Duration::from_millis(20), async {
        let _ = stopped.await;
    }));

    // Writers append all along: before, during and after each outage.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (store, writing) = (store.clone(), writing.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    deposit(&store, 1 + w * 1_000_000 + n, 1, 17).await;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                n
            })
        })
        .collect();

    let mut resumes = Vec::new();
    for down in OUTAGES {
        // Publishing: the checkpoint moves.
        let before = relayed(&store, name).await;
        relayed_past(&store, name, before, &mut broker).await;
        broker.kill();
        tokio::time::sleep(down).await;
        let at_restart = relayed(&store, name).await;
        broker.restart();
        // The relay resumes by itself: its checkpoint moves past where the outage left it.
        resumes.push(relayed_past(&store, name, at_restart, &mut broker).await);
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut appended = 0;
    for writer in writers {
        appended += writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let head = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or(evently_core::Checkpoint::START);
    let started = Instant::now();
    loop {
        let at = relayed(&store, name).await;
        if at >= head {
            break;
        }
        broker.repair();
        if started.elapsed() >= Duration::from_secs(90) {
            let lag = store.lag_after(at).await.map(|l| l.events).ok();
            let log = std::fs::read_to_string(broker.dir.join("broker.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "the relay did not catch up after the restarts: checkpoint {at:?}, head {head:?}, \
                 lag {lag:?}, relay task finished: {}; resumed after {resumes:?}; the broker's \
                 log, last lines first:\n{}",
                relaying.is_finished(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    let metrics = relaying
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));

    let stored = all_events(&store).await;
    assert_eq!(stored.len() as u64, appended);
    let read = read_until(&broker.address(), std::slice::from_ref(&topic), |r| {
        distinct(r) >= stored.len()
    })
    .await;
    let (missing, duplicates, inversions) = audit(&stored, &read);
    println!(
        "broker outages: {OUTAGES:?} (message timeout {MESSAGE_TIMEOUT:?}); resumed after {resumes:?}; \
         broker restarted for a failed storage: {}; events: {}; read back: {}; \
         missing: {missing}; duplicates: {duplicates}; inversions: {inversions}; relay: {metrics:?}",
        broker.repairs,
        stored.len(),
        read.len()
    );
    assert_eq!((missing, inversions), (0, 0));
    // The long outage went through the failure path: a new producer, from the checkpoint.
    assert!(
        metrics.failures >= 1 && metrics.producers > 1,
        "{metrics:?}"
    );
}
