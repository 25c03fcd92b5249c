//! The broker going away: restarted mid-stream, and its connections cut by a proxy.

use std::sync::Arc;
use std::time::Duration;

use crate::Relay;

use super::*;

/// The broker is stopped and started again `restarts` times (by `restart`, which returns once
/// the broker is back) while writers append and a running relay ([`Relay::run`]) and consumer
/// work. Both must come back by themselves: every event applied once, in each aggregate's order.
///
/// # Panics
/// When a guarantee does not hold.
pub async fn broker_restarted_mid_stream<B, R>(broker: &B, ns: &str, restarts: u32, mut restart: R)
where
    B: Broker,
    R: FnMut(u32) -> BoxFuture<'static, ()>,
{
    let store = fresh_store(&format!("{ns}_restart")).await;
    let consumer = "restart-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop_consumer, consuming) =
        start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = Relay::new(store.clone(), broker.sink(ns), "restarted");
    let relaying = tokio::spawn(relay.run(Duration::from_millis(50), async move {
        let _ = relay_stopped.await;
    }));
    let writers = Writers::start(&store, "r", 2, Duration::from_millis(10));
    for n in 0..restarts {
        tokio::time::sleep(Duration::from_millis(700)).await;
        restart(n).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected = writers.stop().await;
    let events: u64 = expected.values().sum();
    let pool = store.pool().clone();
    let waited = try_wait_applied(
        &pool,
        store.schema(),
        consumer,
        i64::try_from(events).unwrap_or(i64::MAX),
        Duration::from_secs(120),
    )
    .await;
    if waited.is_ok() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = stop_relay.send(());
    let _ = stop_consumer.send(());
    let relayed = relaying.await.unwrap_or_else(|e| panic!("{e}"));
    let consumed = consuming.await.unwrap_or_else(|e| panic!("{e}"));
    if let Err(why) = waited {
        // What each side says it did, and what the broker holds, beside the missing events.
        let dead = broker.dead_letters(ns, consumer).await;
        panic!("{why}; relay {relayed:?}; consumer {consumed:?}; broker dead letters {dead:?}");
    }
    let relayed = relayed.unwrap_or_else(|e| panic!("the relay stopped: {e}"));
    let consumed = consumed.unwrap_or_else(|e| panic!("the consumer stopped: {e}"));
    let by_id = applied(&pool, store.schema(), consumer).await;
    for (id, written) in &expected {
        let versions = by_id.get(id).cloned().unwrap_or_default();
        let want: Vec<i64> = (1..=i64::try_from(*written).unwrap_or(0)).collect();
        assert_eq!(
            versions, want,
            "{id}: applied once each, in order, across {restarts} broker restarts \
             (relay {relayed:?}, consumer {consumed:?})"
        );
    }
    println!(
        "{} broker restarts: {events} events, relay {relayed:?}, consumer {consumed:?}",
        restarts
    );
}
/// A TCP proxy to a broker whose connections can all be cut at once: a network failure between
/// the framework and a live broker (both ends see the connection closed; bytes in flight are
/// lost; the broker keeps its state). Point the relay and consumers at
/// `127.0.0.1:<`[`port`](Self::port)`>` and pass [`cut`](Self::cut) as the restart of
/// [`broker_restarted_mid_stream`].
#[derive(Debug)]
pub struct CutProxy {
    port: u16,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards every connection to `target` (`host:port`).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(target: impl Into<String>) -> Self {
        let target = target.into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind a proxy port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let held = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let piping = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(piping);
            }
        });
        Self {
            port,
            connections,
            accepting,
        }
    }

    /// The port to connect to.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every connection through the proxy now; returns how many there were. New
    /// connections are accepted at once.
    pub fn cut(&self) -> usize {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cut = connections.len();
        for connection in connections.drain(..) {
            connection.abort();
        }
        cut
    }

    /// How many connections through the proxy are open now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|connection| !connection.is_finished())
            .count()
    }

    /// The "restart" of [`broker_restarted_mid_stream`]: cuts every connection once at least one
    /// is open (a client still backing off from the last cut has not reconnected yet; cutting
    /// nothing would prove nothing), and panics when none opens within 30 s: the relay and
    /// consumer are not going through the proxy, or did not come back after the last cut.
    pub fn cuts(self: Arc<Self>) -> impl FnMut(u32) -> BoxFuture<'static, ()> {
        move |n| {
            let proxy = Arc::clone(&self);
            Box::pin(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while proxy.open() == 0 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "nothing connected through the proxy within 30 s before cut {}: the \
                         relay and consumer do not use it, or did not come back after a cut",
                        n + 1
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                proxy.cut();
            })
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}
