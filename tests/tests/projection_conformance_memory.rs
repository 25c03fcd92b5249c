//! The projection-engine conformance suite against the in-process runner on the in-memory store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use evently_core::prelude::*;
use evently_core::projection::{
    Batch, DeadLetter, DeliveryError, FailurePolicy, HandlerError, InMemoryCheckpoints,
    InMemoryDeadLetters, ProjectionRunner, Redrive,
};
use evently_core::projection_conformance::{LedgerRuntime, is_poison};

/// The suite's credits.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum LedgerEvent {
    Credited { amount: u64 },
}

/// Events the ledger does not listen to.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum NoiseEvent {
    Noise,
}

/// The ledger, in the process: one entry per application.
#[derive(Clone, Default, Projection)]
#[projection(name = "ledger", events(LedgerEvent))]
struct Ledger {
    entries: Arc<Mutex<Vec<(StreamId, u64)>>>,
    poisoned: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Handles<LedgerEvent> for Ledger {
    async fn handle(
        &mut self,
        event: &RecordedEvent<LedgerEvent>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        let LedgerEvent::Credited { amount } = event.event;
        if self.poisoned.load(Ordering::SeqCst) && is_poison(amount) {
            return Err(format!("poison credit {amount}").into());
        }
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((event.stream.clone(), amount));
        Ok(())
    }
}

struct MemoryLedger {
    store: InMemoryEventStore,
    ledger: Ledger,
    checkpoints: Arc<InMemoryCheckpoints>,
    dead_letters: InMemoryDeadLetters,
    policy: FailurePolicy,
    runner: ProjectionRunner<Ledger, InMemoryEventStore>,
}

impl MemoryLedger {
    fn runner(&self) -> ProjectionRunner<Ledger, InMemoryEventStore> {
        ProjectionRunner::new(self.store.clone(), self.ledger.clone(), ())
            .with_checkpoints(self.checkpoints.clone())
            .with_dead_letters(self.dead_letters.clone())
            .with_failure_policy(self.policy)
            .with_batch(16)
    }

    fn new() -> Self {
        let store = InMemoryEventStore::new();
        let ledger = Ledger::default();
        let runner = ProjectionRunner::new(store.clone(), ledger.clone(), ());
        let mut this = Self {
            store,
            ledger,
            checkpoints: Arc::new(InMemoryCheckpoints::new()),
            dead_letters: InMemoryDeadLetters::new(),
            policy: FailurePolicy::default(),
            runner,
        };
        this.runner = this.runner();
        this
    }
}

fn store_error(error: evently_core::StoreError) -> DeliveryError {
    DeliveryError::Store(error)
}

#[async_trait::async_trait]
impl LedgerRuntime for MemoryLedger {
    type Store = InMemoryEventStore;

    fn store(&self) -> &InMemoryEventStore {
        &self.store
    }

    fn credit(amount: u64) -> evently_core::EventData {
        evently_core::EventData::from_event(&LedgerEvent::Credited { amount }, Metadata::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn noise() -> evently_core::EventData {
        evently_core::EventData::from_event(&NoiseEvent::Noise, Metadata::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn reopen(&self) -> Self {
        Self {
            store: self.store.clone(),
            ledger: self.ledger.clone(),
            checkpoints: self.checkpoints.clone(),
            dead_letters: self.dead_letters.clone(),
            policy: self.policy,
            runner: self.runner(),
        }
    }

    fn set_poisoned(&mut self, poisoned: bool) {
        self.ledger.poisoned.store(poisoned, Ordering::SeqCst);
    }

    async fn set_policy(&mut self, policy: FailurePolicy) {
        self.policy = policy;
        self.runner = self.runner();
    }

    async fn step(&mut self) -> Result<Batch, DeliveryError> {
        self.runner.step().await.map_err(store_error)
    }

    async fn catch_up(&mut self) -> Result<usize, DeliveryError> {
        self.runner.catch_up().await.map_err(store_error)
    }

    async fn retry_all(&mut self) -> Result<Redrive, DeliveryError> {
        Ok(self.runner.retry_all().await)
    }

    async fn rebuild(&mut self) -> Result<usize, DeliveryError> {
        self.runner
            .rebuild(|ledger, ()| {
                ledger
                    .entries
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
            })
            .await
            .map_err(store_error)
    }

    async fn applications(&self) -> Vec<(StreamId, u64)> {
        self.ledger
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead_letters.list(Ledger::NAME)
    }
}

evently_core::projection_conformance_tests!(|_test: &'static str| async { MemoryLedger::new() });
