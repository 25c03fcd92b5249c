//! Schema-per-tenant end to end on PostgreSQL: two tenants with the same aggregate ids through
//! [`TenantGateways`], a projection per tenant (its checkpoint and dead letters in the tenant's
//! schema, a poison event of one tenant parking nothing of the other), a saga per tenant whose
//! step records an event through the tenant's gateway, and the registry (`migrate_all`, an
//! unknown tenant, a schema taken by another tenant, a registration cut at each of its polls).

mod common;

use std::sync::Arc;
use std::time::Duration;

use cqrs_examples::bank::{Account, AccountCommand, AccountEvent, Deposit};
use evently_core::Saga;
use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_core::saga::{Orchestrator, SagaStatus, SagaStore, StepError, StepKey};
use evently_core::tenant::{Tenancy, TenantGateways};
use evently_core::{RecordedEvent, StoreError, TenantId};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::{DeadLetters, read_checkpoint};
use evently_postgres::projection::{FailureMode, FailurePolicy, ProjectionWorker};
use evently_postgres::saga::PostgresSagaStore;
use evently_postgres::tenants::SchemaPerTenant;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection};

/// Each deposit's account, amount and the tenant its event names, in the tenant's own schema.
#[derive(Projection)]
#[projection(name = "tenant_deposits", events(AccountEvent), context = PgConnection)]
struct TenantDeposits {
    schema: String,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for TenantDeposits {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let AccountEvent::Deposited(deposit) = &event.event else {
            return Ok(());
        };
        if deposit.amount_cents == 13 {
            return Err("poison deposit of 13".into());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".deposits (account, amount, tenant) VALUES ($1, $2, $3)",
            self.schema
        )))
        .bind(event.stream.aggregate_id.as_str())
        .bind(i64::try_from(deposit.amount_cents)?)
        .bind(event.metadata.tenant.as_ref().map(TenantId::as_str))
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Bonus {
    account: String,
    amount_cents: u64,
}

type Gateways = TenantGateways<Account, SchemaPerTenant>;

/// What a tenant's saga steps reach: the tenant and the gateways.
struct BonusServices {
    tenant: TenantId,
    gateways: Arc<Gateways>,
}

#[derive(Saga)]
#[saga(name = "tenant_bonus", data = Bonus, context = Arc<BonusServices>)]
enum PayBonus {
    Credit,
}

impl BonusServices {
    async fn credit(&self, bonus: &mut Bonus, key: &StepKey) -> Result<(), StepError> {
        let gateway = self.gateways.tenant(&self.tenant).await?;
        gateway
            .execute(
                bonus.account.as_str(),
                AccountCommand::Deposit(Deposit {
                    amount_cents: bonus.amount_cents,
                    reference: key.to_string(),
                }),
                CommandMetadata::new(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

async fn layout(name: &str) -> SchemaPerTenant {
    let pool = common::pool(20).await;
    let control = format!("tn_{name}");
    for schema in [
        control.clone(),
        format!("{control}_acme"),
        format!("{control}_globex"),
        format!("{control}_taken"),
    ] {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let prefix = control.clone();
    SchemaPerTenant::open(pool, &control)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .with_schema_names(move |tenant| format!("{prefix}_{tenant}"))
}

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap_or_else(|e| panic!("{e}"))
}

async fn rows(store: &PostgresEventStore, sql: &str) -> Vec<(String, i64, Option<String>)> {
    sqlx::query_as(AssertSqlSafe(sql.replace("{s}", store.schema())))
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Catches `worker` up until its table holds `count` rows (the global order may hold readers
/// back while other tests' transactions are open).
async fn project(
    worker: &mut ProjectionWorker<TenantDeposits>,
    store: &PostgresEventStore,
    count: usize,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
        let seen = rows(
            store,
            "SELECT account, amount, tenant FROM \"{s}\".deposits",
        )
        .await;
        if seen.len() >= count || std::time::Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_share_ids_but_never_data_end_to_end() {
    let tenancy = layout("e2e").await;
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    let acme_store = tenancy
        .register(&acme)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let globex_store = tenancy
        .register(&globex)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(acme_store.schema(), "tn_e2e_acme");
    assert_eq!(acme_store.tenant(), Some(&acme));

    // One account id in both tenants, each opened (a create command) and credited.
    let gateways = Arc::new(Gateways::new(tenancy.clone()));
    for (t, amounts) in [(&acme, [10_u64, 13, 20]), (&globex, [7, 8, 9])] {
        let gateway = gateways.tenant(t).await.unwrap_or_else(|e| panic!("{e}"));
        gateway
            .execute(
                "acc-1",
                AccountCommand::Open {
                    owner: t.to_string(),
                },
                CommandMetadata::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("open in {t}: {e}"));
        for amount_cents in amounts {
            gateway
                .execute(
                    "acc-1",
                    AccountCommand::Deposit(Deposit {
                        amount_cents,
                        reference: String::new(),
                    }),
                    CommandMetadata::new(),
                )
                .await
                .unwrap_or_else(|e| panic!("deposit in {t}: {e}"));
        }
    }
    let (acme_account, acme_version) = gateways
        .tenant(&acme)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .load("acc-1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (globex_account, _) = gateways
        .tenant(&globex)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .load("acc-1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(acme_version, 4);
    assert_eq!(acme_account.balance_cents, 43);
    assert_eq!(globex_account.balance_cents, 24);

    // A projection per tenant: globex's worker never sees acme's poison event, each checkpoint
    // and dead letter is in its tenant's schema.
    let policy = FailurePolicy {
        attempts: 2,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        mode: FailureMode::Skip,
    };
    let mut workers = Vec::new();
    for store in [&acme_store, &globex_store] {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE \"{}\".deposits (account text, amount bigint, tenant text)",
            store.schema()
        )))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let projection = TenantDeposits {
            schema: store.schema().to_owned(),
        };
        let mut worker =
            ProjectionWorker::new(store.clone(), projection, "w").with_failure_policy(policy);
        assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
        workers.push(worker);
    }
    project(&mut workers[0], &acme_store, 2).await;
    project(&mut workers[1], &globex_store, 3).await;
    let query = "SELECT account, amount, tenant FROM \"{s}\".deposits ORDER BY amount";
    assert_eq!(
        rows(&acme_store, query).await,
        vec![
            ("acc-1".into(), 10, Some("acme".into())),
            ("acc-1".into(), 20, Some("acme".into()))
        ]
    );
    assert_eq!(
        rows(&globex_store, query).await,
        [7, 8, 9]
            .map(|n| ("acc-1".to_owned(), n, Some("globex".to_owned())))
            .to_vec()
    );
    let acme_letters = DeadLetters::new(acme_store.clone())
        .list("tenant_deposits")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let globex_letters = DeadLetters::new(globex_store.clone())
        .list("tenant_deposits")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (acme_letters.len(), globex_letters.len()),
        (1, 0),
        "the poison event is parked in acme's schema only"
    );
    let acme_at = read_checkpoint(&acme_store, "tenant_deposits")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let globex_at = read_checkpoint(&globex_store, "tenant_deposits")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(acme_at, globex_at, "one checkpoint per tenant");

    // A saga of acme: its instance in acme's schema, its step's event stamped acme.
    let saga_store = PostgresSagaStore::new(acme_store.clone());
    let services = Arc::new(BonusServices {
        tenant: acme.clone(),
        gateways: Arc::clone(&gateways),
    });
    let saga = Orchestrator::<PayBonus, _>::new(saga_store.clone(), services, "o");
    let (_, status) = saga
        .start(Bonus {
            account: "acc-1".into(),
            amount_cents: 100,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, SagaStatus::Completed);
    let name = <PayBonus as Saga>::NAME;
    let in_acme = saga_store
        .list(Some(name), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let in_globex = PostgresSagaStore::new(globex_store.clone())
        .list(Some(name), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((in_acme.len(), in_globex.len()), (1, 0));
    let stream = StreamId::new("account", "acc-1");
    let last = futures::TryStreamExt::try_collect::<Vec<_>>(acme_store.load(&stream, 4))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0].metadata.tenant.as_ref(),
        Some(&acme),
        "the saga's event names acme"
    );
    assert_eq!(
        globex_store.stream_version(&stream).await.ok(),
        Some(4),
        "globex untouched"
    );
}

#[tokio::test]
async fn the_registry_refuses_what_it_cannot_keep_apart() {
    let tenancy = layout("registry").await;
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    match tenancy.tenant_store(&acme).await {
        Err(StoreError::UnknownTenant(t)) => assert_eq!(t, acme),
        other => panic!("expected UnknownTenant, got {other:?}"),
    }
    tenancy
        .register(&acme)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Registering again keeps the schema it was given, whatever the resolver says now.
    let renamed = tenancy
        .clone()
        .with_schema_names(|_| "tn_registry_taken".to_owned());
    let again = renamed
        .register(&acme)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.schema(), "tn_registry_acme");
    renamed
        .register(&globex)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A resolver that names a schema another tenant has is refused.
    let other = tenant("initech");
    match renamed.register(&other).await {
        Err(StoreError::InvalidInput(message)) => {
            assert!(message.contains("another tenant"), "{message}")
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let stores = tenancy.stores().await.unwrap_or_else(|e| panic!("{e}"));
    let schemas: Vec<_> = stores
        .iter()
        .map(|(t, s)| (t.to_string(), s.schema().to_owned(), s.tenant().cloned()))
        .collect();
    assert_eq!(
        schemas,
        [
            (
                "acme".to_owned(),
                "tn_registry_acme".to_owned(),
                Some(acme.clone())
            ),
            (
                "globex".to_owned(),
                "tn_registry_taken".to_owned(),
                Some(globex.clone())
            )
        ]
    );
    let migrated = tenancy
        .migrate_all()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        migrated,
        vec![
            (acme.clone(), "tn_registry_acme".into()),
            (globex.clone(), "tn_registry_taken".into())
        ]
    );
    // A store of a tenant refuses an event that names the other.
    let store = tenancy
        .tenant_store(&acme)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut event = common::deposit(5);
    event.metadata.tenant = Some(globex.clone());
    let refused = store
        .append(
            &StreamId::new("account", "x"),
            ExpectedVersion::NoStream,
            vec![event],
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::InvalidInput(_))),
        "{refused:?}"
    );
}

/// Six processes (a pool and a layout each) open the same registry and register the same four
/// tenants at once, each in its own order: every registration succeeds, each tenant has one row
/// and one migrated schema, and what one process appends to a tenant another reads.
///
/// Six rounds, each on a registry of its own (one round saw the race about one time in fifteen).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_registering_at_once_agree_on_every_tenant() {
    for round in 0..6 {
        registration_race(&format!("tn_race{round}")).await;
    }
}

async fn registration_race(control: &str) {
    const PROCESSES: usize = 6;
    let tenants: Vec<TenantId> = (0..4).map(|i| tenant(&format!("t{i}"))).collect();
    let setup = common::pool(2).await;
    for schema in
        std::iter::once(control.to_owned()).chain(tenants.iter().map(|t| format!("{control}_{t}")))
    {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&setup)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let processes = futures::future::join_all((0..PROCESSES).map(|p| {
        let tenants = tenants.clone();
        // Polled together on this task: the registrations race in the database, where it counts.
        async move {
            let layout = SchemaPerTenant::open(common::pool(3).await, control)
                .await
                .unwrap_or_else(|e| panic!("process {p} opening the registry: {e}"))
                .with_schema_names({
                    let control = control.to_owned();
                    move |tenant| format!("{control}_{tenant}")
                });
            // Each process its own order: rotated by its number.
            let order: Vec<TenantId> = tenants
                .iter()
                .cycle()
                .skip(p)
                .take(tenants.len())
                .cloned()
                .collect();
            let stores = futures::future::join_all(order.iter().map(|t| layout.register(t))).await;
            let schemas: Vec<(TenantId, String)> = order
                .into_iter()
                .zip(stores)
                .map(|(t, store)| {
                    let store =
                        store.unwrap_or_else(|e| panic!("process {p} registering {t}: {e}"));
                    (t, store.schema().to_owned())
                })
                .collect();
            (layout, schemas)
        }
    }))
    .await;
    let mut layouts = Vec::new();
    for (layout, schemas) in processes {
        for (t, schema) in schemas {
            assert_eq!(schema, format!("{control}_{t}"));
        }
        layouts.push(layout);
    }
    let registered = layouts[0].tenants().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        registered,
        tenants
            .iter()
            .map(|t| (t.clone(), format!("{control}_{t}")))
            .collect::<Vec<_>>()
    );
    // Each schema migrated once and usable from every process: one appends, the next reads.
    for (i, t) in tenants.iter().enumerate() {
        let writer = layouts[i % PROCESSES]
            .tenant_store(t)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        writer
            .append(
                &StreamId::new("account", "shared-id"),
                ExpectedVersion::NoStream,
                vec![common::deposit(u64::try_from(i).unwrap_or(0) + 1)],
            )
            .await
            .unwrap_or_else(|e| panic!("{t}: {e}"));
        let reader = layouts[(i + 1) % PROCESSES]
            .tenant_store(t)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let events = evently_core::store::EventStoreExt::load_all(
            &reader,
            &StreamId::new("account", "shared-id"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(events.len(), 1, "{t}: its own event only");
        assert_eq!(events[0].metadata.tenant.as_ref(), Some(t));
    }
}

/// A registration cut after each of its polls in turn (a crash, a timeout, a shutdown), each time
/// with a second process looking the tenant up and registering it at once, with no pause:
///
/// - right after the cut, the tenant is either unknown or has a store that appends (never a
///   registered tenant without its tables);
/// - the second registration is held up by nothing the cut one left behind (a session lock on a
///   pooled connection would hold it until the pool closed that connection);
/// - the cut process's pool hands out connections as they were: the default `search_path`, no
///   advisory lock held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_cut_anywhere_leaves_a_working_tenant_or_none() {
    let control = "tn_cut";
    let setup = common::pool(2).await;
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname = 'tn_cut' OR nspname LIKE 'tn\\_cut\\_%'",
    )
    .fetch_all(&setup)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for schema in schemas {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&setup)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let open = || async {
        SchemaPerTenant::open(common::pool(2).await, control)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .with_schema_names(|tenant| format!("tn_cut_{tenant}"))
    };
    let (dying, other) = (open().await, open().await);
    let mut cut = 0;
    let polls = loop {
        cut += 1;
        assert!(cut < 2_000, "a registration should finish in fewer polls");
        let t = tenant(&format!("t{cut}"));
        let finished = evently_core::testing::cut_after(cut, dying.register(&t))
            .await
            .map(|registered| registered.unwrap_or_else(|e| panic!("cut {cut}: {e}")))
            .is_some();
        let stream = StreamId::new("account", "a");
        match other.tenant_store(&t).await {
            Err(StoreError::UnknownTenant(_)) => assert!(!finished, "cut {cut}"),
            Ok(store) => {
                store
                    .append(&stream, ExpectedVersion::Any, vec![common::deposit(1)])
                    .await
                    .unwrap_or_else(|e| {
                        panic!("cut {cut}: a registered tenant whose store fails: {e}")
                    });
            }
            Err(e) => panic!("cut {cut}: {e}"),
        }
        let store = tokio::time::timeout(Duration::from_secs(20), other.register(&t))
            .await
            .unwrap_or_else(|_| panic!("cut {cut}: a second registration held up for 20 s"))
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        store
            .append(&stream, ExpectedVersion::Any, vec![common::deposit(2)])
            .await
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        if finished {
            break cut;
        }
    };
    // Every tenant registered once, in its own schema.
    let registered = other.tenants().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(registered.len(), polls);
    for (t, schema) in &registered {
        assert_eq!(schema, &format!("tn_cut_{t}"));
    }
    // Both connections the cut process's pool may hold, taken at once.
    let mut conns = Vec::new();
    for _ in 0..2 {
        conns.push(
            dying
                .pool()
                .acquire()
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    for conn in &mut conns {
        let (path, locks): (String, i64) = sqlx::query_as(
            "SELECT current_setting('search_path'), \
                    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
        )
        .fetch_one(&mut **conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((path.as_str(), locks), ("\"$user\", public", 0));
    }
    eprintln!("registration cut after each of its {polls} polls");
}
