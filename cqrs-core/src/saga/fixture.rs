//! A test fixture for sagas: given which steps fail (and how often), run the saga in memory and
//! get the sequence of step executions and compensations.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Mutex;

use futures::future::BoxFuture;

use super::{InMemorySagaStore, Orchestrator, Saga, SagaError, SagaStatus, StepError, StepKey};
use crate::saga::StepSpec;

/// What a fixture run did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRun {
    /// Every call, in order: `"execute reserve"`, `"compensate reserve"`, failed tries included.
    pub calls: Vec<String>,
    /// Where the saga ended.
    pub status: SagaStatus,
}

/// Runs saga `S` with its real context, failing chosen steps (before the step is called) a chosen
/// number of times:
///
/// ```text
/// let run = SagaFixture::<Fulfillment>::new(services)
///     .failing("pay", 3)
///     .run(order)
///     .await?;
/// assert_eq!(run.calls, ["execute reserve", "execute pay", .., "compensate reserve"]);
/// ```
pub struct SagaFixture<S: Saga> {
    context: S::Context,
    failures: HashMap<String, u32>,
}

impl<S: Saga> std::fmt::Debug for SagaFixture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaFixture")
            .field("saga", &S::NAME)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> SagaFixture<S> {
    /// A fixture running `S`'s steps with `context`.
    pub fn new(context: S::Context) -> Self {
        Self {
            context,
            failures: HashMap::new(),
        }
    }

    /// Step `step` fails its next `times` tries (each retry counts).
    #[must_use]
    pub fn failing(mut self, step: &str, times: u32) -> Self {
        self.failures.insert(format!("execute {step}"), times);
        self
    }

    /// The compensation of `step` fails its next `times` tries.
    #[must_use]
    pub fn failing_compensation(mut self, step: &str, times: u32) -> Self {
        self.failures.insert(format!("compensate {step}"), times);
        self
    }

    /// Runs one instance with `data` to its end (a compensation that keeps failing is tried again
    /// at once, until it succeeds or the planned failures run out).
    ///
    /// # Errors
    /// What the orchestrator reports (data that does not serialize).
    pub async fn run(self, data: S::Data) -> Result<SagaRun, SagaError> {
        let store = InMemorySagaStore::new();
        let plan = Plan::<S> {
            context: self.context,
            failures: Mutex::new(self.failures),
            calls: Mutex::new(Vec::new()),
            _saga: PhantomData,
        };
        let orchestrator = Orchestrator::<Injected<S>, _>::new(store, plan, "fixture")
            .with_compensation_retry(std::time::Duration::ZERO);
        let (_, mut status) = orchestrator.start(data).await?;
        let mut rounds = 0;
        while status == SagaStatus::Failed && rounds < 1_000 {
            rounds += 1;
            status = orchestrator
                .run_due(1)
                .await?
                .first()
                .map_or(status, |s| s.status);
        }
        let plan = orchestrator.into_context();
        Ok(SagaRun {
            calls: plan
                .calls
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            status,
        })
    }
}

/// The context of [`Injected`]: the real one, the failure plan and the calls so far.
struct Plan<S: Saga> {
    context: S::Context,
    failures: Mutex<HashMap<String, u32>>,
    calls: Mutex<Vec<String>>,
    _saga: PhantomData<fn() -> S>,
}

impl<S: Saga> Plan<S> {
    /// Records the call and says whether the plan fails it.
    fn planned_failure(&self, call: String) -> Option<StepError> {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fail = failures.get_mut(&call).is_some_and(|left| {
            let fail = *left > 0;
            *left = left.saturating_sub(1);
            fail
        });
        let error = fail.then(|| format!("{call}: failure planned by the fixture").into());
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(call);
        error
    }
}

/// `S` with the fixture's failures injected before each call.
struct Injected<S>(PhantomData<fn() -> S>);

impl<S: Saga> Saga for Injected<S> {
    const NAME: &'static str = S::NAME;
    const STEPS: &'static [StepSpec] = S::STEPS;
    type Data = S::Data;
    type Context = Plan<S>;

    fn execute<'a>(
        step: usize,
        plan: &'a Plan<S>,
        data: &'a mut S::Data,
        key: &'a StepKey,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        match plan.planned_failure(format!("execute {}", key.step)) {
            Some(error) => Box::pin(async move { Err(error) }),
            None => S::execute(step, &plan.context, data, key),
        }
    }

    fn compensate<'a>(
        step: usize,
        plan: &'a Plan<S>,
        data: &'a mut S::Data,
        key: &'a StepKey,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        match plan.planned_failure(format!("compensate {}", key.step)) {
            Some(error) => Box::pin(async move { Err(error) }),
            None => S::compensate(step, &plan.context, data, key),
        }
    }
}
