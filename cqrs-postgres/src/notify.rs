//! Commit notifications, sent after the commit and coalesced.
//!
//! A `NOTIFY` inside the appending transaction makes PostgreSQL take a global lock on its
//! notification queue at every commit, which serializes the commits of all concurrent writers
//! (the cost: docs/benchmarks.md). So the store notifies after a successful append instead, from
//! one task per store that sends at most one `NOTIFY` per [`COALESCE`] window and always one after
//! the last commit of a burst. Listeners are woken at most [`COALESCE`] late; a missed
//! notification costs them at most one poll interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use evently_core::StoreError;
use sqlx::PgPool;

/// The longest a commit waits for its notification while others are being notified.
pub(crate) const COALESCE: Duration = Duration::from_millis(2);

/// Counts commits and runs at most one sending task.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    commits: AtomicU64,
    sending: AtomicBool,
}

impl Notifier {
    /// Records a commit of events and makes sure a notification follows it.
    pub(crate) fn committed(self: &Arc<Self>, pool: &PgPool, channel: &Arc<str>) {
        self.commits.fetch_add(1, Ordering::SeqCst);
        if self.sending.swap(true, Ordering::SeqCst) {
            // The running task sees this commit when it checks the count.
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sending.store(false, Ordering::SeqCst);
            return;
        };
        let (me, pool, channel) = (Arc::clone(self), pool.clone(), Arc::clone(channel));
        runtime.spawn(async move {
            loop {
                let seen = me.commits.load(Ordering::SeqCst);
                // Covers every commit counted so far: they returned before being counted.
                if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                    .bind(&*channel)
                    .execute(&pool)
                    .await
                {
                    tracing::debug!(%error, "commit notification not sent; listeners poll");
                }
                tokio::time::sleep(COALESCE).await;
                if me.commits.load(Ordering::SeqCst) != seen {
                    continue;
                }
                me.sending.store(false, Ordering::SeqCst);
                // A commit counted between the check and the store left it to this task.
                if me.commits.load(Ordering::SeqCst) == seen
                    || me.sending.swap(true, Ordering::SeqCst)
                {
                    return;
                }
            }
        });
    }
}

/// The receiving side: one listening connection per store (shared by its clones and every worker,
/// relay and `listen()` on it), opened outside the store's pool so listeners never take
/// connections appends need. It turns notifications into a counter on a `watch` channel; it
/// reconnects by itself (and wakes everyone after a reconnection, since notifications sent
/// meanwhile are lost) and stops when the last receiver is gone.
#[derive(Debug, Default)]
pub(crate) struct Listener {
    sender: std::sync::Mutex<Option<Running>>,
}

/// A running listening task: its wake-up counter, and whether it listens yet.
#[derive(Debug)]
struct Running {
    wakeups: tokio::sync::watch::Sender<u64>,
    listening: tokio::sync::watch::Receiver<bool>,
}

impl Listener {
    /// A receiver of commit wake-ups on `channel`, starting the listening task if none runs;
    /// `None` outside a tokio runtime.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        pool: &PgPool,
        channel: &Arc<str>,
    ) -> Option<(
        tokio::sync::watch::Receiver<u64>,
        tokio::sync::watch::Receiver<bool>,
    )> {
        let mut slot = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(running) = slot.as_ref() {
            return Some((running.wakeups.subscribe(), running.listening.clone()));
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (sender, receiver) = tokio::sync::watch::channel(0u64);
        let (listening_tx, listening) = tokio::sync::watch::channel(false);
        *slot = Some(Running {
            wakeups: sender.clone(),
            listening: listening.clone(),
        });
        let options = pool.connect_options().as_ref().clone();
        let (me, channel) = (Arc::clone(self), Arc::clone(channel));
        runtime.spawn(async move { me.listen(options, &channel, sender, listening_tx).await });
        Some((receiver, listening))
    }

    async fn listen(
        self: Arc<Self>,
        options: sqlx::postgres::PgConnectOptions,
        channel: &str,
        sender: tokio::sync::watch::Sender<u64>,
        listening: tokio::sync::watch::Sender<bool>,
    ) {
        // A pool of one of its own: the listener's connection never counts against the store's.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .connect_lazy_with(options);
        let mut backoff =
            evently_core::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        loop {
            if listener.is_none() {
                let connected = async {
                    let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                    l.listen(channel).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                let connected = tokio::select! {
                    connected = connected => connected,
                    () = sender.closed() => Err(sqlx::Error::PoolClosed),
                };
                match connected {
                    Ok(l) => {
                        listener = Some(l);
                        backoff.reset();
                        // After a reconnection, whatever committed while no one listened:
                        // readers look again.
                        if listening.send_replace(true) {
                            sender.send_modify(|n| *n = n.wrapping_add(1));
                        }
                    }
                    Err(error) => {
                        if self.stop_if_unused(&sender) {
                            return;
                        }
                        tracing::debug!(%error, "commit listener cannot connect; readers poll meanwhile");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            let Some(l) = listener.as_mut() else { continue };
            tokio::select! {
                () = sender.closed() => {
                    if self.stop_if_unused(&sender) {
                        return;
                    }
                }
                received = l.try_recv() => match received {
                    Ok(Some(_)) => sender.send_modify(|n| *n = n.wrapping_add(1)),
                    // The connection was lost; it reconnects on the next call. Wake everyone:
                    // notifications sent meanwhile are lost.
                    Ok(None) => sender.send_modify(|n| *n = n.wrapping_add(1)),
                    Err(error) => {
                        tracing::debug!(%error, "commit listener lost its connection; reconnecting");
                        listener = None;
                    }
                },
            }
        }
    }

    /// Clears the slot when no receiver is left (under the lock `subscribe` takes, so none can
    /// appear meanwhile); `true` when the task should end.
    fn stop_if_unused(&self, sender: &tokio::sync::watch::Sender<u64>) -> bool {
        let mut slot = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sender.receiver_count() == 0 {
            *slot = None;
            true
        } else {
            false
        }
    }
}

/// Moves of projection checkpoints on their own channel: workers signal after each committed
/// batch (coalesced and after the commit, as appends are), and waiters for a checkpoint
/// (`wait_until_caught_up`) are woken by it instead of polling. The listening connection opens
/// on the first wait and stays while the store does.
#[derive(Debug)]
pub(crate) struct Moves {
    notifier: Arc<Notifier>,
    listener: Arc<Listener>,
    channel: Arc<str>,
    /// Keeps the listening task alive between waits (each wait would reconnect otherwise).
    kept: std::sync::Mutex<Option<tokio::sync::watch::Receiver<u64>>>,
}

impl Moves {
    pub(crate) fn new(channel: &str) -> Self {
        Self {
            notifier: Arc::default(),
            listener: Arc::default(),
            channel: channel.into(),
            kept: std::sync::Mutex::default(),
        }
    }

    /// Signals that a checkpoint of this schema moved (after the commit).
    pub(crate) fn moved(&self, pool: &PgPool) {
        self.notifier.committed(pool, &self.channel);
    }

    /// Resolves at the next signal, or after `at_most`; a signal before this call is not seen
    /// (the waiter reads the checkpoint again at most `at_most` later).
    pub(crate) async fn next(&self, pool: &PgPool, at_most: Duration) {
        let receiver = {
            let mut kept = self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if kept.is_none() {
                *kept = self
                    .listener
                    .subscribe(pool, &self.channel)
                    .map(|(signal, _)| signal);
            }
            kept.clone()
        };
        let Some(mut receiver) = receiver else {
            tokio::time::sleep(at_most).await;
            return;
        };
        receiver.mark_unchanged();
        let deadline = tokio::time::Instant::now() + at_most;
        if let Ok(Err(_stopped)) = tokio::time::timeout_at(deadline, receiver.changed()).await {
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// How long [`PostgresEventStore::listen`](crate::PostgresEventStore::listen) waits for the shared listening connection.
pub(crate) const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// Commit notifications of one schema's events, from [`PostgresEventStore::listen`](crate::PostgresEventStore::listen).
#[derive(Debug)]
pub struct Wakeups {
    pub(crate) signal: tokio::sync::watch::Receiver<u64>,
}

impl Wakeups {
    /// Waits for the next commit of events. A hint only: notifications sent while the listening
    /// connection was down are lost (everyone is woken once it is back), so readers keep polling
    /// too.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the store's listener has stopped (its store is gone).
    pub async fn next(&mut self) -> Result<(), StoreError> {
        self.signal
            .changed()
            .await
            .map_err(|_| StoreError::backend("the store's commit listener has stopped"))
    }

    /// Waits for the next commit or `timeout`, whichever comes first; `true` if woken by a commit.
    ///
    /// # Errors
    /// As [`Wakeups::next`].
    pub async fn next_within(&mut self, timeout: Duration) -> Result<bool, StoreError> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(result) => result.map(|()| true),
            Err(_) => Ok(false),
        }
    }
}
