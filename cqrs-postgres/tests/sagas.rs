//! Sagas on PostgreSQL: the saga store's save refuses a stale version, an instance cut midway is
//! resumed by another orchestrator, and two orchestrators on one database each run every saga
//! exactly once between them.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fresh_store;
use evently_core::Saga;
use evently_core::saga::{
    Orchestrator, Saga as _, SagaError, SagaStatus, SagaStore, StepError, StepKey, StepOutcome,
};
use evently_postgres::saga::PostgresSagaStore;
use serde::{Deserialize, Serialize};

/// Counts every execution by step key, across orchestrators; fails the payment of orders whose
/// amount is a multiple of 5.
#[derive(Default, Clone)]
struct Services {
    executions: Arc<Mutex<HashMap<String, u32>>>,
    by_owner: Arc<Mutex<HashMap<&'static str, u32>>>,
    owner: &'static str,
    /// Payments hang (the orchestrator dies while waiting on the payment service).
    hang_payments: bool,
}

impl Services {
    fn record(&self, key: &StepKey) {
        *self
            .executions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.to_string())
            .or_default() += 1;
        *self
            .by_owner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(self.owner)
            .or_default() += 1;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    amount: u64,
}

#[derive(Saga)]
#[saga(name = "pg_fulfillment", data = Order, context = Arc<Services>)]
enum Fulfillment {
    #[step(compensate = release)]
    Reserve,
    #[step(compensate = refund)]
    Pay,
    Confirm,
}

impl Services {
    async fn reserve(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        tokio::task::yield_now().await;
        self.record(key);
        Ok(())
    }

    async fn release(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.record(key);
        Ok(())
    }

    async fn pay(&self, order: &mut Order, key: &StepKey) -> Result<(), StepError> {
        tokio::task::yield_now().await;
        if self.hang_payments {
            tokio::time::sleep(Duration::from_secs(3_600)).await;
        }
        if order.amount.is_multiple_of(5) {
            return Err(format!("card declined for {}", order.amount).into());
        }
        self.record(key);
        Ok(())
    }

    async fn refund(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.record(key);
        Ok(())
    }

    async fn confirm(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.record(key);
        Ok(())
    }
}

#[tokio::test]
async fn a_saga_runs_to_its_end_and_a_stale_save_is_refused() {
    let store = PostgresSagaStore::new(fresh_store("sagas_basic").await);
    let saga =
        Orchestrator::<Fulfillment, _>::new(store.clone(), Arc::new(Services::default()), "o");
    let (done, status) = saga
        .start(Order { amount: 7 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, SagaStatus::Completed);
    let (undone, status) = saga
        .start(Order { amount: 10 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, SagaStatus::Compensated);
    let state = store
        .load(undone)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("stored"));
    assert_eq!(state.steps[0].1, StepOutcome::Compensated);
    assert!(matches!(state.steps[1].1, StepOutcome::Failed { .. }));
    assert_eq!(
        store
            .list(
                Some(<Fulfillment as evently_core::saga::Saga>::NAME),
                Some(SagaStatus::Completed)
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        [done]
    );

    // A save that names a version another orchestrator already moved past is refused.
    let mut stale = store
        .load(done)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("stored"));
    stale.version -= 1;
    assert!(matches!(
        store.save(&stale, None).await,
        Err(SagaError::Conflict { .. })
    ));
    assert_eq!(Fulfillment::STEPS.len(), 3);
}

/// 60 sagas submitted, two orchestrators claiming from one database at once: every saga ends,
/// every step ran exactly once between them, and both did part of the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_never_run_the_same_saga() {
    let store = PostgresSagaStore::new(fresh_store("sagas_two_orchestrators").await);
    let shared = Services::default();
    let submitter =
        Orchestrator::<Fulfillment, _>::new(store.clone(), Arc::new(shared.clone()), "submitter");
    let mut ids = Vec::new();
    for amount in 1..=60 {
        ids.push(
            submitter
                .submit(Order { amount })
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let run = |owner: &'static str| {
        let store = store.clone();
        let services = Arc::new(Services {
            owner,
            ..shared.clone()
        });
        tokio::spawn(async move {
            let orchestrator = Orchestrator::<Fulfillment, _>::new(store, services, owner);
            while !orchestrator
                .run_due(3)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .is_empty()
            {}
        })
    };
    let (a, b) = (run("a"), run("b"));
    a.await.unwrap_or_else(|e| panic!("{e}"));
    b.await.unwrap_or_else(|e| panic!("{e}"));

    for id in &ids {
        let state = store
            .load(*id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("stored"));
        assert!(state.status.is_final(), "{id}: {:?}", state.status);
    }
    let executions = shared
        .executions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(
        executions.values().all(|n| *n == 1),
        "a step ran twice: {:?}",
        executions
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    // 48 completed (reserve, pay, confirm) + 12 compensated (reserve, release).
    assert_eq!(executions.len(), 48 * 3 + 12 * 2);
    let by_owner = shared
        .by_owner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    eprintln!("two orchestrators: step executions by owner {by_owner:?}, 0 twice");
    assert_eq!(by_owner.len(), 2, "both orchestrators worked: {by_owner:?}");
}

/// An instance whose orchestrator died mid-run (its lease ran out) is resumed by another.
#[tokio::test]
async fn a_saga_left_by_a_dead_orchestrator_is_resumed() {
    let store = PostgresSagaStore::new(fresh_store("sagas_resume").await);
    let services = Services::default();
    let dying = Orchestrator::<Fulfillment, _>::new(
        store.clone(),
        Arc::new(Services {
            hang_payments: true,
            ..services.clone()
        }),
        "dying",
    )
    .with_lease(Duration::from_millis(50));
    let id = evently_core::saga::SagaId::new();
    // The orchestrator dies while the payment hangs, once the reservation is saved (however
    // long that takes on a loaded machine).
    let reservation_saved = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let saved = store.load(id).await.unwrap_or_else(|e| panic!("{e}"));
            if saved.is_some_and(|s| s.steps[0].1 == StepOutcome::Executed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the reservation was never saved");
    };
    tokio::select! {
        outcome = dying.start_with_id(id, Order { amount: 3 }) => panic!("the payment hangs, yet: {outcome:?}"),
        () = reservation_saved => {}
    }
    let recorded = store
        .load(id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("stored"));
    assert_eq!(recorded.steps[0].1, StepOutcome::Executed);
    assert_eq!(recorded.steps[1].1, StepOutcome::Pending);
    let taker =
        Orchestrator::<Fulfillment, _>::new(store.clone(), Arc::new(services.clone()), "taker");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        taker.run_due(10).await.unwrap_or_else(|e| panic!("{e}"));
        let state = store
            .load(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("stored"));
        if state.status.is_final() {
            assert_eq!(state.status, SagaStatus::Completed);
            let executions = services
                .executions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            assert_eq!(executions.len(), 3, "{executions:?}");
            assert!(
                executions.values().all(|n| *n == 1),
                "the saved reservation did not run again"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deadlines are stored with the instance in PostgreSQL: after the submitting orchestrator is
/// gone, another fires exactly the ones not cancelled.
#[tokio::test]
async fn stored_deadlines_fire_on_another_orchestrator_unless_cancelled() {
    let store = PostgresSagaStore::new(fresh_store("sagas_deadlines").await);
    let first =
        Orchestrator::<Fulfillment, _>::new(store.clone(), Arc::new(Services::default()), "first")
            .with_deadline(Duration::from_millis(40));
    let mut ids = Vec::new();
    for amount in 1..=12 {
        ids.push(
            first
                .submit(Order {
                    amount: amount * 5 + 1,
                })
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    for id in &ids[..5] {
        assert!(
            first
                .cancel_deadline(*id)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        );
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(80)).await;
    let other =
        Orchestrator::<Fulfillment, _>::new(store.clone(), Arc::new(Services::default()), "other");
    let mut ended = Vec::new();
    loop {
        let ran = other.run_due(5).await.unwrap_or_else(|e| panic!("{e}"));
        if ran.is_empty() {
            break;
        }
        ended.extend(ran);
    }
    assert_eq!(ended.len(), 12);
    let fired = ended.iter().filter(|s| s.deadline_fired).count();
    assert_eq!(fired, 12 - 5, "fired = scheduled - cancelled");
    for state in &ended {
        let expected = if state.deadline_fired {
            SagaStatus::Compensated
        } else {
            SagaStatus::Completed
        };
        assert_eq!(state.status, expected, "{}", state.id);
    }
}

/// 200 orchestrators on PostgreSQL crash at a chosen poll of their run (between a step's effect and
/// its save, inside a save, between compensations) and a restarted one resumes each saga: all end
/// completed or compensated, and no step whose completion was saved runs again.
#[tokio::test]
async fn sagas_cut_at_random_points_on_postgres_resume_to_an_end() {
    let store = PostgresSagaStore::new(fresh_store("sagas_cut").await);
    let (mut completed, mut compensated, mut never_stored) = (0, 0, 0);
    for run in 0..200u64 {
        let services = Services::default();
        let dying =
            Orchestrator::<Fulfillment, _>::new(store.clone(), Arc::new(services.clone()), "dying")
                .with_lease(Duration::from_millis(1));
        let id = evently_core::saga::SagaId::new();
        // Amounts that are multiples of 5 are declined: those sagas compensate.
        let order = Order { amount: run % 10 };
        let cut = usize::try_from(run % 50).unwrap_or(0);
        let _ = evently_core::testing::cut_after(cut, dying.start_with_id(id, order)).await;
        let Some(saved) = store.load(id).await.unwrap_or_else(|e| panic!("{e}")) else {
            never_stored += 1;
            continue;
        };
        let before: HashMap<String, u32> = services
            .executions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        tokio::time::sleep(Duration::from_millis(2)).await;
        let restarted = Orchestrator::<Fulfillment, _>::new(
            store.clone(),
            Arc::new(services.clone()),
            "restarted",
        );
        let state = loop {
            restarted
                .run_due(10)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let state = store
                .load(id)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("stored"));
            if state.status.is_final() {
                break state;
            }
        };
        let after = services
            .executions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (name, outcome) in &saved.steps {
            if *outcome == StepOutcome::Executed {
                let key = format!("{id}/{name}/execute");
                assert_eq!(
                    after.get(&key),
                    before.get(&key),
                    "run {run}: `{name}` ran again after its completion was saved"
                );
            }
        }
        match state.status {
            SagaStatus::Completed => completed += 1,
            SagaStatus::Compensated => compensated += 1,
            other => panic!("run {run}: {other:?}"),
        }
    }
    eprintln!(
        "200 cut sagas on PostgreSQL: {completed} completed, {compensated} compensated, {never_stored} cut before being stored"
    );
    assert_eq!(completed + compensated + never_stored, 200);
    assert!(completed > 50 && compensated > 10);
}
