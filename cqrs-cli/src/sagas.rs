//! `cqrs sagas`: saga instances, and the operator's retry and abandon.

use clap::Subcommand;
use evently_core::saga::{SagaId, SagaStatus, SagaStore};
use evently_postgres::PostgresEventStore;
use evently_postgres::saga::PostgresSagaStore;

use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum Sagas {
    /// Saga instances, oldest first.
    List {
        /// Only this saga.
        #[arg(long)]
        saga: Option<String>,
        /// Only in this state.
        #[arg(long, value_parser = state_parser())]
        state: Option<SagaStatus>,
    },
    /// One instance with its steps.
    Show {
        /// The instance's id.
        id: uuid::Uuid,
    },
    /// Makes an unreadable instance (set aside because its state or data did not read) or a
    /// failed one due again now, after a fix: the next orchestrator run picks it up.
    Retry {
        /// The instance's id.
        id: uuid::Uuid,
    },
    /// Ends an unfinished instance for good (nothing more runs or compensates).
    Abandon {
        /// The instance's id.
        id: uuid::Uuid,
    },
}

/// Runs a `sagas` command.
pub(crate) async fn run(
    store: &PostgresEventStore,
    command: Sagas,
    json: bool,
) -> Result<(), Failure> {
    match command {
        Sagas::Retry { id } => {
            let sagas = PostgresSagaStore::new(store.clone());
            if sagas.retry(SagaId(id)).await? {
                out!("saga {id} is due again");
            } else {
                return Err(format!(
                    "saga {id} is neither unreadable nor failed: nothing to retry"
                )
                .into());
            }
        }
        Sagas::Abandon { id } => {
            let sagas = PostgresSagaStore::new(store.clone());
            if sagas.abandon(SagaId(id)).await? {
                out!("saga {id} abandoned");
            } else {
                return Err(format!("saga {id} has ended already").into());
            }
        }
        Sagas::List { saga, state } => {
            let sagas = PostgresSagaStore::new(store.clone());
            // Instances set aside whose state does not read at all are listed from their columns.
            if state.is_none_or(|s| s == SagaStatus::Unreadable) {
                let readable: std::collections::HashSet<SagaId> = sagas
                    .list(saga.as_deref(), Some(SagaStatus::Unreadable))
                    .await?
                    .iter()
                    .map(|s| s.id)
                    .collect();
                for q in sagas.quarantined(saga.as_deref()).await? {
                    if readable.contains(&q.id) {
                        continue;
                    }
                    if json {
                        out!(
                            "{}",
                            serde_json::json!({
                                "id": q.id.0,
                                "saga": q.saga,
                                "status": SagaStatus::Unreadable,
                                "set_aside_at": q.at,
                                "error": q.error,
                            })
                        );
                    } else {
                        out!(
                            "{} {:<24} {:<13} set aside {} error: {}",
                            q.id,
                            q.saga,
                            SagaStatus::Unreadable,
                            q.at.format("%Y-%m-%d %H:%M:%S"),
                            q.error
                        );
                    }
                }
            }
            for s in sagas.list(saga.as_deref(), state).await? {
                let done = s
                    .steps
                    .iter()
                    .filter(|(_, o)| !matches!(o, evently_core::saga::StepOutcome::Pending))
                    .count();
                if json {
                    out!(
                        "{}",
                        serde_json::json!({
                            "id": s.id.0,
                            "saga": s.saga,
                            "status": s.status,
                            "steps_done": done,
                            "steps": s.steps.len(),
                            "started_at": s.started_at,
                            "updated_at": s.updated_at,
                            "error": s.error,
                        })
                    );
                    continue;
                }
                out!(
                    "{} {:<24} {:<13} steps {done}/{} started {}{}",
                    s.id,
                    s.saga,
                    s.status.as_str(),
                    s.steps.len(),
                    s.started_at.format("%Y-%m-%d %H:%M:%S"),
                    s.error.map(|e| format!(" error: {e}")).unwrap_or_default()
                );
            }
        }
        Sagas::Show { id } => {
            let sagas = PostgresSagaStore::new(store.clone());
            let Some(s) = sagas.load(SagaId(id)).await? else {
                return Err(format!("no saga {id}").into());
            };
            if json {
                let steps: Vec<serde_json::Value> = s
                    .steps
                    .iter()
                    .map(|(name, outcome)| {
                        serde_json::json!({
                            "name": name,
                            "outcome": step_text(outcome).0,
                            "error": step_text(outcome).1,
                        })
                    })
                    .collect();
                out!(
                    "{}",
                    serde_json::json!({
                        "id": s.id.0,
                        "saga": s.saga,
                        "status": s.status,
                        "version": s.version,
                        "error": s.error,
                        "retry_at": s.retry_at,
                        "deadline_at": s.deadline_at,
                        "deadline_fired": s.deadline_fired,
                        "started_by": s.started_by,
                        "started_at": s.started_at,
                        "updated_at": s.updated_at,
                        "steps": steps,
                        "data": s.data,
                    })
                );
                return Ok(());
            }
            out!(
                "saga {} ({}): {}, version {}",
                s.id,
                s.saga,
                s.status,
                s.version
            );
            if let Some(error) = &s.error {
                out!("error: {error}");
            }
            if let Some(at) = s.deadline_at {
                out!(
                    "deadline: {at}{}",
                    if s.deadline_fired { " (fired)" } else { "" }
                );
            }
            for (name, outcome) in &s.steps {
                match step_text(outcome) {
                    (outcome, Some(error)) => out!("  {name}: {outcome}: {error}"),
                    (outcome, None) => out!("  {name}: {outcome}"),
                }
            }
            out!("data: {}", s.data);
        }
    }
    Ok(())
}

/// The saga states `--state` takes, listed in `--help` and suggested on a typo.
fn state_parser() -> impl clap::builder::TypedValueParser<Value = SagaStatus> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(SagaStatus::ALL.map(SagaStatus::as_str))
        .try_map(|state: String| state.parse::<SagaStatus>())
}

/// A step's outcome in words, and its error.
fn step_text(outcome: &evently_core::saga::StepOutcome) -> (&'static str, Option<&str>) {
    use evently_core::saga::StepOutcome;
    match outcome {
        StepOutcome::Pending => ("pending", None),
        StepOutcome::Executed => ("executed", None),
        StepOutcome::Failed { error } => ("failed", Some(error)),
        StepOutcome::Compensated => ("compensated", None),
    }
}
