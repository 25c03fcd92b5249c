//! Tenant isolation: every [`Tenancy`] keeps its tenants' streams, keys, snapshots and events apart,
//! stamps each event with its tenant and refuses an event that names another.

use std::collections::BTreeMap;

use serde_json::json;

use crate::envelope::{EventId, TenantId};
use crate::store::{EventStore, ExpectedVersion, Snapshot, SnapshotStore, StoreError};
use crate::tenant::Tenancy;

use super::*;

/// Generates one `#[tokio::test]` per tenant-isolation check. `$make` takes the test's name and
/// returns a future of a fresh [`Tenancy`] whose tenants `t0` to `t7` can be used (a
/// schema-per-tenant layout registers them first).
#[macro_export]
macro_rules! tenant_conformance_tests {
    ($make:expr) => {
        $crate::tenant_conformance_tests!(@tests $make;
            tenants_never_share_streams,
            tenants_keep_their_own_keys_and_snapshots,
            an_event_naming_another_tenant_is_refused,
            a_large_batch_stays_in_its_tenant,
            a_tenants_retry_is_recognized,
            concurrent_tenants_on_identical_stream_ids,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let tenancy = ($make)(stringify!($name)).await;
                $crate::conformance::$name(tenancy).await;
            }
        )*
    };
}

/// Tenant `t{n}` of the checks.
///
/// # Panics
/// Never: `t0`..`t7` are valid tenant ids.
#[must_use]
pub fn tenant(n: usize) -> TenantId {
    TenantId::new(format!("t{n}")).unwrap_or_else(|e| panic!("{e}"))
}

async fn store_of<T: Tenancy>(tenancy: &T, n: usize) -> T::Store {
    tenancy
        .tenant_store(&tenant(n))
        .await
        .unwrap_or_else(|e| panic!("store of tenant t{n}: {e}"))
}

/// One stream id in two tenants is two streams: each expects no stream, each reads its own events
/// stamped with its tenant, and each tenant's global order holds only its own events.
pub async fn tenants_never_share_streams<T: Tenancy>(tenancy: T) {
    let (a, b) = (store_of(&tenancy, 0).await, store_of(&tenancy, 1).await);
    let s = stream("tenants");
    let (a_head, b_head) = (head(&a).await, head(&b).await);
    assert_eq!(
        append_ok(&a, &s, ExpectedVersion::NoStream, events(0..3)).await,
        3
    );
    assert_eq!(
        append_ok(&b, &s, ExpectedVersion::NoStream, events(10..12)).await,
        2,
        "tenant t1 must see no stream where tenant t0 wrote one"
    );
    for (store, n, expected) in [(&a, 0, vec![0, 1, 2]), (&b, 1, vec![10, 11])] {
        let loaded = load(store, &s).await;
        assert_eq!(numbers(&loaded), expected, "stream {s} of tenant t{n}");
        assert!(
            loaded.iter().all(|e| e.metadata.tenant == Some(tenant(n))),
            "every event of tenant t{n} names it: {:?}",
            loaded
                .iter()
                .map(|e| &e.metadata.tenant)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            store
                .stream_version(&s)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            expected.len() as u64
        );
    }
    let a_read = read_settled(&a, a_head, 3).await;
    assert_eq!(numbers(&a_read), vec![0, 1, 2], "t0 reads only its events");
    let b_read = read_settled(&b, b_head, 2).await;
    assert_eq!(numbers(&b_read), vec![10, 11], "t1 reads only its events");
}

/// An idempotency key and a snapshot of one stream id are per tenant.
pub async fn tenants_keep_their_own_keys_and_snapshots<T: Tenancy>(tenancy: T) {
    let (a, b) = (store_of(&tenancy, 2).await, store_of(&tenancy, 3).await);
    let s = stream("tenant-keys");
    let key = format!("key-{}", EventId::new());
    a.append_with_key(&s, ExpectedVersion::NoStream, events(0..2), &key)
        .await
        .unwrap_or_else(|e| panic!("t2: {e}"));
    assert_eq!(
        b.find_key(&key).await.unwrap_or_else(|e| panic!("{e}")),
        None,
        "tenant t3 must not see tenant t2's key"
    );
    let used = b
        .append_with_key(&s, ExpectedVersion::NoStream, events(0..1), &key)
        .await
        .unwrap_or_else(|e| panic!("t3 with the key t2 used: {e}"));
    assert_eq!(used.version, 1);
    let a_record = a.find_key(&key).await.ok().flatten();
    assert_eq!(a_record.map(|r| r.last_version), Some(2));

    for (store, version) in [(&a, 2), (&b, 1)] {
        store
            .save_snapshot(Snapshot {
                stream: s.clone(),
                version,
                schema_version: 1,
                state: json!({ "version": version }),
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for (store, version) in [(&a, 2), (&b, 1)] {
        let snapshot = store
            .load_snapshot(&s)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no snapshot"));
        assert_eq!(snapshot.state, json!({ "version": version }));
    }
}

/// A large batch (past the PostgreSQL store's `COPY` threshold) through a tenant's store lands
/// in that tenant's stream, stamped, and nowhere else.
pub async fn a_large_batch_stays_in_its_tenant<T: Tenancy>(tenancy: T) {
    let (a, b) = (store_of(&tenancy, 6).await, store_of(&tenancy, 7).await);
    let s = stream("tenant-large");
    assert_eq!(
        append_ok(&a, &s, ExpectedVersion::NoStream, events(0..1_500)).await,
        1_500
    );
    let loaded = load(&a, &s).await;
    assert_eq!(loaded.len(), 1_500);
    assert!(loaded.iter().all(|e| e.metadata.tenant == Some(tenant(6))));
    assert_eq!(
        b.stream_version(&s).await.ok(),
        Some(0),
        "t7 sees no stream"
    );
}

/// An append through a tenant's store retried at once with the same events (its outcome unknown
/// to the caller) is recognized, also when the retry comes through another handle of the same
/// tenant, and writes nothing more.
pub async fn a_tenants_retry_is_recognized<T: Tenancy>(tenancy: T) {
    let a = store_of(&tenancy, 5).await;
    let again = store_of(&tenancy, 5).await;
    let s = stream("tenant-retry");
    let batch = events(0..3);
    let first = a
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match again.append(&s, ExpectedVersion::NoStream, batch).await {
        Err(StoreError::AlreadyAppended(outcome)) => assert_eq!(*outcome, first),
        other => panic!("a retry of the same events: expected AlreadyAppended, got {other:?}"),
    }
    assert_eq!(load(&a, &s).await.len(), 3, "nothing written twice");
}

/// An event whose metadata names another tenant is refused whole, and nothing is written.
pub async fn an_event_naming_another_tenant_is_refused<T: Tenancy>(tenancy: T) {
    let a = store_of(&tenancy, 4).await;
    let s = stream("tenant-refused");
    let mut batch = events(0..2);
    batch[1].metadata.tenant = Some(tenant(5));
    match a.append(&s, ExpectedVersion::NoStream, batch).await {
        Err(StoreError::InvalidInput(message)) => assert!(
            message.contains("`t5`") && message.contains("`t4`"),
            "the error names both tenants: {message}"
        ),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(a.stream_version(&s).await.ok(), Some(0), "nothing written");
    // Naming its own tenant is fine.
    let mut own = events(0..1);
    own[0].metadata.tenant = Some(tenant(4));
    assert_eq!(append_ok(&a, &s, ExpectedVersion::NoStream, own).await, 1);
}

/// Eight tenants, four writers each, all on the same stream id with exact expected versions and
/// retries on conflict: each tenant's stream holds exactly its own writers' events, in versions
/// 1..=n, and each tenant's global order exactly those events (0 cross-tenant reads or writes).
pub async fn concurrent_tenants_on_identical_stream_ids<T: Tenancy>(tenancy: T) {
    const TENANTS: usize = 8;
    const WRITERS: usize = 4;
    const EACH: u64 = 10;
    let s = stream("tenant-race");
    let mut stores = Vec::new();
    for n in 0..TENANTS {
        let store = store_of(&tenancy, n).await;
        let start = head(&store).await;
        stores.push((store, start));
    }
    let mut tasks = Vec::new();
    for (n, (store, _)) in stores.iter().enumerate() {
        for w in 0..WRITERS {
            let (store, s) = (store.clone(), s.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..EACH {
                    // A number that says which tenant and writer wrote it.
                    let number = (n * 1_000 + w * 100) as u64 + i;
                    loop {
                        let version = store
                            .stream_version(&s)
                            .await
                            .unwrap_or_else(|e| panic!("{e}"));
                        match store
                            .append(&s, ExpectedVersion::Exact(version), vec![event(number)])
                            .await
                        {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                            Err(error) => panic!("tenant t{n} writer {w}: {error}"),
                        }
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let total = WRITERS * EACH as usize;
    let mut cross = BTreeMap::new();
    for (n, (store, start)) in stores.iter().enumerate() {
        let loaded = load(store, &s).await;
        let read = read_settled(store, *start, total).await;
        for (what, got) in [("stream", &loaded), ("global order", &read)] {
            assert_eq!(got.len(), total, "tenant t{n}'s {what}");
            let foreign = got
                .iter()
                .filter(|e| {
                    e.metadata.tenant != Some(tenant(n))
                        || numbers(&[(*e).clone()])[0] / 1_000 != n as u64
                })
                .count();
            cross.insert(format!("t{n} {what}"), foreign);
        }
        let versions: Vec<u64> = loaded.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=total as u64).collect::<Vec<_>>());
    }
    assert!(
        cross.values().all(|&n| n == 0),
        "events of another tenant seen: {cross:?}"
    );
}

async fn head<S: EventStore>(store: &S) -> Checkpoint {
    store
        .head()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or(Checkpoint::START)
}

fn numbers(events: &[StoredEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.payload["n"].as_u64().unwrap_or(u64::MAX))
        .collect()
}
