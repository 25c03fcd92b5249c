//! Tenants in one schema with row-level security, checked as a role that is not the tables'
//! owner: the tenant conformance checks through `PostgresEventStore::for_tenant`, what the
//! server itself shows each tenant (no statement of the store names the tenant: the policies
//! do all the separating), the all-tenants view, and the refusal of a role the policies would
//! not bind.

mod common;
mod surely;

use std::str::FromStr as _;

use evently_core::tenant::Tenancy as _;
use evently_core::{
    Checkpoint, EventStore, EventStoreExt as _, ExpectedVersion, StoreError, StreamId, TenantId,
};
use evently_postgres::PostgresEventStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _};

/// The role the application runs as: neither owner nor superuser.
const APP_ROLE: &str = "evently_rls_app";

/// Schema `t_<name>` migrated and with row-level security on (as the owner), and the store on
/// it as [`APP_ROLE`].
async fn app_store(name: &str) -> PostgresEventStore {
    let owner = common::fresh_store(name).await;
    owner
        .enable_row_level_security()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let schema = owner.schema().to_owned();
    // Parallel tests create the role once between them.
    let mut tx = owner.pool().begin().await.unwrap_or_else(|e| panic!("{e}"));
    for statement in [
        "SELECT pg_advisory_xact_lock(hashtext('evently_rls_app'))".to_owned(),
        format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') \
             THEN CREATE ROLE {APP_ROLE} LOGIN; END IF; END $$"
        ),
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO {APP_ROLE}"),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA \"{schema}\" TO {APP_ROLE}"
        ),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA \"{schema}\" TO {APP_ROLE}"),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
    // Named after the test, so that a test terminating its own backends finds only those.
    let options = PgConnectOptions::from_str(&evently_postgres::database_url())
        .unwrap_or_else(|e| panic!("{e}"))
        .username(APP_ROLE)
        .application_name(&format!("evently_rls_{name}"));
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_lazy_with(options);
    PostgresEventStore::new(pool, &schema)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_tenant_pools(4, std::time::Duration::from_secs(5))
}

mod conformance {
    evently_core::tenant_conformance_tests!(|name: &'static str| super::app_store(name));
}

/// The same with group commit on: each tenant view groups its own appends.
mod conformance_group_commit {
    evently_core::tenant_conformance_tests!(|name: &'static str| async move {
        super::app_store(&format!("g_{name}"))
            .await
            .with_group_commit(evently_postgres::GroupCommit::default())
    });
}

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn the_server_shows_each_connection_its_tenant_only() {
    let store = app_store("rls_server").await;
    let stream = StreamId::new("account", "same-id");
    for (t, n) in [("acme", 3), ("globex", 2)] {
        let view = store
            .tenant_store(&tenant(t))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            view.pool().options().get_max_connections(),
            4,
            "with_tenant_pools"
        );
        let batch = (0..n).map(|i| common::deposit(i + 1)).collect();
        view.append(&stream, ExpectedVersion::NoStream, batch)
            .await
            .unwrap_or_else(|e| panic!("{t}: {e}"));
    }

    // Plain SQL as the application role: what a query that names no tenant sees.
    let options = PgConnectOptions::from_str(&evently_postgres::database_url())
        .unwrap_or_else(|e| panic!("{e}"))
        .username(APP_ROLE);
    let mut conn = sqlx::PgConnection::connect_with(&options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let count = |setting: &'static str| {
        format!(
            "SELECT set_config('evently.tenant', '{setting}', false), \
                    (SELECT count(*) FROM \"t_rls_server\".events)"
        )
    };
    let mut seen = Vec::new();
    for setting in ["acme", "globex", "initech", "", "*"] {
        let (_, n): (String, i64) = sqlx::query_as(AssertSqlSafe(count(setting)))
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        seen.push((setting, n));
    }
    assert_eq!(
        seen,
        [
            ("acme", 3),
            ("globex", 2),
            ("initech", 0),
            ("", 0),
            ("*", 5)
        ]
    );
    // A row written for another tenant than the connection's is refused by the server.
    let forged = sqlx::query(
        "INSERT INTO \"t_rls_server\".snapshots (aggregate_type, aggregate_id, version, schema_version, state, tenant_id) \
         VALUES ('account', 'x', 1, 1, '{}', 'acme')",
    )
    .execute(&mut conn)
    .await;
    let message = forged.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("row-level security"), "{message}");

    // The all-tenants view reads every tenant's events, each naming its tenant, and writes none.
    let all = store.all_tenants().await.unwrap_or_else(|e| panic!("{e}"));
    let read = evently_core::conformance::read_settled(&all, Checkpoint::START, 5).await;
    let mut tenants: Vec<_> = read
        .iter()
        .map(|e| e.metadata.tenant.as_ref().map(TenantId::to_string))
        .collect();
    tenants.sort();
    tenants.dedup();
    assert_eq!(
        tenants,
        [Some("acme".to_owned()), Some("globex".to_owned())]
    );
    let refused = all
        .append(&stream, ExpectedVersion::Any, vec![common::deposit(9)])
        .await;
    assert!(
        matches!(refused, Err(StoreError::InvalidInput(_))),
        "{refused:?}"
    );
    assert!(matches!(
        all.stream_version(&stream).await,
        Err(StoreError::InvalidInput(_))
    ));
}

#[tokio::test]
async fn a_role_the_policies_do_not_bind_gets_no_tenant_view() {
    // The owner (here a superuser) would see every tenant: refused.
    let owner = common::fresh_store("rls_owner").await;
    match owner.for_tenant(&tenant("acme")).await {
        Err(StoreError::InvalidInput(message)) => {
            assert!(message.contains("row-level security"), "{message}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    owner
        .enable_row_level_security()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!owner.row_level_security_applies().await.unwrap_or(true));
    assert!(matches!(
        owner.all_tenants().await,
        Err(StoreError::InvalidInput(_))
    ));
}

/// Deposits per tenant, across every tenant (`tenants = "all"`).
#[derive(evently_core::Projection)]
#[projection(
    name = "deposits_by_tenant",
    events(cqrs_examples::bank::AccountEvent),
    context = sqlx::PgConnection,
    tenants = "all"
)]
struct DepositsByTenant;

#[async_trait::async_trait]
impl evently_core::projection::Handles<cqrs_examples::bank::AccountEvent, sqlx::PgConnection>
    for DepositsByTenant
{
    async fn handle(
        &mut self,
        event: &evently_core::RecordedEvent<cqrs_examples::bank::AccountEvent>,
        conn: &mut sqlx::PgConnection,
    ) -> Result<(), evently_core::projection::HandlerError> {
        sqlx::query(
            "INSERT INTO t_rls_projection.by_tenant (tenant, deposits) VALUES ($1, 1) \
             ON CONFLICT (tenant) DO UPDATE SET deposits = by_tenant.deposits + 1",
        )
        .bind(event.metadata.tenant.as_ref().map(TenantId::as_str))
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// A handler of the bank's events that writes nothing (the refusals come before any event).
macro_rules! applies_nothing {
    ($projection:ty) => {
        #[async_trait::async_trait]
        impl
            evently_core::projection::Handles<cqrs_examples::bank::AccountEvent, sqlx::PgConnection>
            for $projection
        {
            async fn handle(
                &mut self,
                _: &evently_core::RecordedEvent<cqrs_examples::bank::AccountEvent>,
                _: &mut sqlx::PgConnection,
            ) -> Result<(), evently_core::projection::HandlerError> {
                Ok(())
            }
        }
    };
}

/// The same read model declared per tenant (the default).
#[derive(evently_core::Projection)]
#[projection(
    name = "deposits_of_one_tenant",
    events(cqrs_examples::bank::AccountEvent),
    context = sqlx::PgConnection
)]
struct DepositsOfOneTenant;

applies_nothing!(DepositsOfOneTenant);

/// A second version of the per-tenant read model (blue/green).
#[derive(evently_core::Projection)]
#[projection(
    name = "deposits_of_one_tenant",
    version = 2,
    events(cqrs_examples::bank::AccountEvent),
    context = sqlx::PgConnection
)]
struct DepositsOfOneTenantV2;

applies_nothing!(DepositsOfOneTenantV2);

#[tokio::test]
async fn a_projection_runs_where_its_declared_tenants_are() {
    use evently_postgres::projection::ProjectionWorker;
    let store = app_store("rls_projection").await;
    let owner = common::pool(2).await;
    for statement in [
        "CREATE TABLE t_rls_projection.by_tenant (tenant text PRIMARY KEY, deposits bigint NOT NULL)",
        "GRANT ALL ON t_rls_projection.by_tenant TO evently_rls_app",
    ] {
        sqlx::query(statement)
            .execute(&owner)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let stream = StreamId::new("account", "a-1");
    for (t, n) in [("acme", 3), ("globex", 2)] {
        let view = store
            .for_tenant(&tenant(t))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let batch = (0..n).map(|i| common::deposit(i + 1)).collect();
        view.append(&stream, ExpectedVersion::NoStream, batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let all = store.all_tenants().await.unwrap_or_else(|e| panic!("{e}"));
    let acme = store
        .for_tenant(&tenant("acme"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Declared per tenant, on the view of all: refused, naming what to do.
    let mut wrong = ProjectionWorker::new(all.clone(), DepositsOfOneTenant, "w");
    let refused = wrong.acquire().await.map_err(|e| e.to_string());
    assert!(
        refused
            .as_ref()
            .is_err_and(|m| m.contains("tenants = \"each\"")),
        "{refused:?}"
    );
    // Declared across all, on one tenant's view: refused.
    let mut narrow = ProjectionWorker::new(acme, DepositsByTenant, "w");
    let refused = narrow.acquire().await.map_err(|e| e.to_string());
    assert!(
        refused
            .as_ref()
            .is_err_and(|m| m.contains("view of tenant `acme`")),
        "{refused:?}"
    );

    // Versions are kept per schema: one tenant's promotion would switch every tenant's views.
    let acme = store
        .for_tenant(&tenant("acme"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut versioned = ProjectionWorker::new(acme, DepositsOfOneTenantV2, "w");
    let refused = versioned.acquire().await.map_err(|e| e.to_string());
    assert!(
        refused.as_ref().is_err_and(|m| m.contains("is versioned")),
        "{refused:?}"
    );

    // Declared across all, on the view of all: one read model with both tenants.
    let mut worker = ProjectionWorker::new(all, DepositsByTenant, "w");
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let counts = loop {
        worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
        let counts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT tenant, deposits FROM t_rls_projection.by_tenant ORDER BY tenant",
        )
        .fetch_all(&owner)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        if counts.iter().map(|(_, n)| n).sum::<i64>() >= 5 || std::time::Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(counts, [("acme".to_owned(), 3), ("globex".to_owned(), 2)]);
    // Its checkpoint is the pseudo-tenant `*`'s.
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT tenant_id FROM t_rls_projection.projection_checkpoints WHERE projection = 'deposits_by_tenant'",
    )
    .fetch_all(&owner)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows, [("*".to_owned(),)]);
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Welcome {
    member: String,
}

/// The step's service.
struct Greeter;

impl Greeter {
    async fn greet(
        &self,
        _: &mut Welcome,
        _: &evently_core::saga::StepKey,
    ) -> Result<(), evently_core::saga::StepError> {
        Ok(())
    }
}

#[derive(evently_core::Saga)]
#[saga(name = "rls_welcome", data = Welcome, context = std::sync::Arc<Greeter>)]
enum WelcomeSaga {
    Greet,
}

#[tokio::test]
async fn a_tenants_saga_instances_are_its_own() {
    use evently_core::saga::{Orchestrator, Saga as _, SagaStatus, SagaStore as _};
    use evently_postgres::saga::PostgresSagaStore;
    let store = app_store("rls_sagas").await;
    let acme = PostgresSagaStore::new(
        store
            .for_tenant(&tenant("acme"))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let globex = PostgresSagaStore::new(
        store
            .for_tenant(&tenant("globex"))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let saga = Orchestrator::<WelcomeSaga, _>::new(acme.clone(), std::sync::Arc::new(Greeter), "o");
    let (id, status) = saga
        .start(Welcome {
            member: "m-1".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, SagaStatus::Completed);
    let name = Some(WelcomeSaga::NAME);
    assert_eq!(acme.list(name, None).await.map(|l| l.len()).ok(), Some(1));
    assert_eq!(globex.list(name, None).await.map(|l| l.len()).ok(), Some(0));
    assert!(
        globex
            .load(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "globex cannot load acme's saga"
    );
    assert!(
        acme.load(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
}

/// Fails on a deposit of 13 cents, per tenant.
#[derive(evently_core::Projection)]
#[projection(
    name = "thirteen_refused",
    events(cqrs_examples::bank::AccountEvent),
    context = sqlx::PgConnection
)]
struct ThirteenRefused;

#[async_trait::async_trait]
impl evently_core::projection::Handles<cqrs_examples::bank::AccountEvent, sqlx::PgConnection>
    for ThirteenRefused
{
    async fn handle(
        &mut self,
        event: &evently_core::RecordedEvent<cqrs_examples::bank::AccountEvent>,
        _: &mut sqlx::PgConnection,
    ) -> Result<(), evently_core::projection::HandlerError> {
        match &event.event {
            cqrs_examples::bank::AccountEvent::Deposited(d) if d.amount_cents == 13 => {
                Err("a deposit of 13".into())
            }
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn checkpoints_and_dead_letters_are_per_tenant() {
    use evently_postgres::control::DeadLetters;
    use evently_postgres::projection::{FailureMode, FailurePolicy, ProjectionWorker};
    let store = app_store("rls_letters").await;
    let stream = StreamId::new("account", "a-1");
    let policy = FailurePolicy {
        attempts: 1,
        backoff: std::time::Duration::from_millis(1),
        max_backoff: std::time::Duration::from_millis(1),
        mode: FailureMode::Skip,
    };
    let mut letters = Vec::new();
    for (t, amounts) in [("acme", vec![1, 13, 2]), ("globex", vec![3, 4])] {
        let view = store
            .for_tenant(&tenant(t))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let batch = amounts.iter().map(|a| common::deposit(*a)).collect();
        view.append(&stream, ExpectedVersion::NoStream, batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut worker =
            ProjectionWorker::new(view.clone(), ThirteenRefused, "w").with_failure_policy(policy);
        assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while worker.checkpoint().await.unwrap_or_else(|e| panic!("{e}"))
            < view
                .head()
                .await
                .ok()
                .flatten()
                .unwrap_or(Checkpoint::START)
            && std::time::Instant::now() < deadline
        {
            worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let listed = DeadLetters::new(view)
            .list("thirteen_refused")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        letters.push((t, listed.len()));
    }
    assert_eq!(
        letters,
        [("acme", 1), ("globex", 0)],
        "each tenant lists its own dead letters"
    );
    let owner = common::pool(2).await;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT 'checkpoint', tenant_id FROM t_rls_letters.projection_checkpoints WHERE projection = 'thirteen_refused' \
         UNION ALL SELECT 'letter', tenant_id FROM t_rls_letters.projection_dead_letters ORDER BY 1, 2",
    )
    .fetch_all(&owner)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rows: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        rows,
        [
            ("checkpoint", "acme"),
            ("checkpoint", "globex"),
            ("letter", "acme")
        ]
    );
}

/// Event ids are unique across the tenants of one table (the brokers deduplicate by them), and a
/// tenant cannot see another's events: an append reusing another tenant's event ids is refused
/// with a typed error saying so, whatever its size (one event, a batch, a `COPY`) and its
/// expectation, with and without group commit; nothing is written, and the owner's own retry is
/// still recognized as a replay.
#[tokio::test]
async fn another_tenants_event_ids_are_refused_by_name() {
    for grouped in [false, true] {
        let store = app_store(&format!("rls_taken_{grouped}")).await;
        let store = if grouped {
            store.with_group_commit(evently_postgres::GroupCommit::default())
        } else {
            store
        };
        let acme = store
            .tenant_store(&tenant("acme"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let globex = store
            .tenant_store(&tenant("globex"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for size in [1u64, 3, 1_000] {
            let owned = StreamId::new("account", format!("owned-{size}"));
            let batch: Vec<_> = (0..size).map(|i| common::deposit(i + 1)).collect();
            let first = acme
                .append(&owned, ExpectedVersion::NoStream, batch.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            for expected in [ExpectedVersion::NoStream, ExpectedVersion::Any] {
                let taken = StreamId::new("account", format!("taken-{size}"));
                match globex.append(&taken, expected, batch.clone()).await {
                    Err(StoreError::EventIdTaken { event_ids }) => assert_eq!(
                        event_ids,
                        batch.iter().map(|e| e.event_id).collect::<Vec<_>>()
                    ),
                    other => panic!(
                        "group commit {grouped}, {size} events, {expected:?}: {other:?} for another tenant's ids"
                    ),
                }
                assert_eq!(
                    globex
                        .load_all(&taken)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"))
                        .len(),
                    0
                );
            }
            match acme
                .append(&owned, ExpectedVersion::NoStream, batch.clone())
                .await
            {
                Err(StoreError::AlreadyAppended(original)) => {
                    assert_eq!(original.version, first.version);
                }
                other => panic!("the owner's retry: {other:?}"),
            }
        }
    }
}

/// Tenant views under attack: 4 tenants x 3 writers append to one stream id, each append cut at a
/// random point (before, during or after its `COMMIT`) and retried at once with the same ids,
/// while the test's backends (the tenants' pools) are terminated over and over: every event is
/// stored exactly once, in its own tenant's stream, in version order, naming its tenant.
#[tokio::test]
async fn tenant_appends_cut_and_terminated_are_stored_once_in_their_tenant() {
    use rand::SeedableRng as _;
    let store = app_store("rls_cut").await;
    let tenants = ["acme", "globex", "initech", "umbrella"];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = std::sync::Arc::clone(&stop);
        let owner = common::pool(2).await;
        tokio::spawn(async move {
            let mut terminated = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(std::time::Duration::from_millis(15)).await;
                let killed: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = 'evently_rls_rls_cut' AND pid <> pg_backend_pid()",
                )
                .fetch_one(&owner)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                terminated += u64::try_from(killed).unwrap_or(0);
            }
            terminated
        })
    };
    let stream = StreamId::new("account", "shared");
    let mut writers = Vec::new();
    for (t, name) in tenants.iter().enumerate() {
        let view = store
            .tenant_store(&tenant(name))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for w in 0..3u64 {
            let (view, stream) = (view.clone(), stream.clone());
            writers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64 * 10 + w);
                let (mut ids, mut cuts) = (Vec::new(), 0);
                for n in 0..30u64 {
                    let batch: Vec<_> = (0..1 + n % 3)
                        .map(|i| common::deposit(n * 10 + i + 1))
                        .collect();
                    ids.extend(batch.iter().map(|e| e.event_id));
                    cuts += surely::append_surely(
                        &view,
                        &stream,
                        ExpectedVersion::Any,
                        batch,
                        &mut rng,
                        3_000,
                    )
                    .await
                    .1;
                }
                (t, ids, cuts)
            }));
        }
    }
    let mut written: Vec<Vec<evently_core::EventId>> = vec![Vec::new(); tenants.len()];
    let mut cuts = 0;
    for writer in writers {
        let (t, ids, c) = writer.await.unwrap_or_else(|e| panic!("{e}"));
        written[t].extend(ids);
        cuts += c;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let terminated = killer.await.unwrap_or_else(|e| panic!("{e}"));
    for (t, name) in tenants.iter().enumerate() {
        let view = store
            .tenant_store(&tenant(name))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let stored = view
            .load_all(&stream)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (event, version) in stored.iter().zip(1u64..) {
            assert_eq!(event.version, version, "{name}: versions in order, no gap");
            assert_eq!(
                event.metadata.tenant.as_ref().map(TenantId::as_str),
                Some(*name),
                "{name}: an event naming another tenant"
            );
        }
        let mut stored_ids: Vec<_> = stored.iter().map(|e| e.event_id).collect();
        let mut expected = written[t].clone();
        stored_ids.sort_unstable();
        expected.sort_unstable();
        assert_eq!(
            stored_ids, expected,
            "{name}: each event exactly once, only its own"
        );
    }
    println!("{cuts} appends cut and retried, {terminated} backends terminated");
    assert!(
        cuts > 0,
        "no append was cut: the test proved less than it says"
    );
    assert!(
        terminated > 0,
        "no backend was terminated: the test proved less than it says"
    );
}

#[derive(Debug, Clone, PartialEq, evently_core::DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii(subject = member_id)]
        email: String,
    },
}

/// One subject id in two tenants is two subjects, with the schema's key table (a tenant column
/// under the policies) and with one key store shared by every tenant (a KMS): each tenant's data
/// opens with its own key in its view and in the all-tenants view, which forgets nobody;
/// forgetting the subject in one tenant leaves the other's readable.
#[tokio::test]
async fn one_subject_id_in_two_tenants_is_two_subjects() {
    for shared_kms in [false, true] {
        let name = if shared_kms { "rls_pii_kms" } else { "rls_pii" };
        let mut store = app_store(name).await.with_personal_data::<MemberEvent>();
        if shared_kms {
            store = store.with_key_store(std::sync::Arc::new(
                evently_core::personal::InMemoryKeyStore::new(),
            ));
        }
        let stream = StreamId::new("member", "m-1");
        let view = |t: &'static str| {
            let store = store.clone();
            async move {
                store
                    .for_tenant(&tenant(t))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
        };
        let (acme, globex) = (view("acme").await, view("globex").await);
        for (store, email) in [(&acme, "ada@acme.test"), (&globex, "gus@globex.test")] {
            let joined = MemberEvent::Joined {
                member_id: "m-1".into(),
                email: email.into(),
            };
            let data = evently_core::EventData::from_event(&joined, Default::default())
                .unwrap_or_else(|e| panic!("{e}"));
            store
                .append(&stream, ExpectedVersion::NoStream, vec![data])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let emails = |events: &[evently_core::StoredEvent]| -> Vec<String> {
            let mut emails: Vec<String> = events
                .iter()
                .map(|e| {
                    format!(
                        "{}:{}",
                        e.metadata.tenant.as_ref().map_or("-", TenantId::as_str),
                        e.payload["email"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            emails.sort();
            emails
        };
        let all = store.all_tenants().await.unwrap_or_else(|e| panic!("{e}"));
        let read = evently_core::conformance::read_settled(&all, Checkpoint::START, 2).await;
        assert_eq!(
            emails(&read),
            ["acme:ada@acme.test", "globex:gus@globex.test"],
            "shared KMS: {shared_kms}"
        );
        assert!(
            matches!(all.forget("m-1").await, Err(StoreError::InvalidInput(_))),
            "the all-tenants view forgets nobody"
        );
        // Its connections read every tenant's events and keys, and change none of them.
        for table in ["events", "personal_keys"] {
            let changed = sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM \"{}\".{table}",
                all.schema()
            )))
            .execute(all.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(changed.rows_affected(), 0, "{table}");
        }
        assert!(acme.forget("m-1").await.unwrap_or(false));
        let loaded = |store: PostgresEventStore| async move {
            let stream = StreamId::new("member", "m-1");
            emails(
                &store
                    .load_all(&stream)
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        };
        assert_eq!(
            loaded(acme.clone()).await,
            ["acme:"],
            "shared KMS: {shared_kms}"
        );
        assert_eq!(
            loaded(globex.clone()).await,
            ["globex:gus@globex.test"],
            "shared KMS: {shared_kms}"
        );
        let read = evently_core::conformance::read_settled(&all, Checkpoint::START, 2).await;
        assert_eq!(
            emails(&read),
            ["acme:", "globex:gus@globex.test"],
            "shared KMS: {shared_kms}"
        );
    }
}
