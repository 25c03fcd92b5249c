//! Crypto-shredding's key store on the real server: one key per subject also under racing
//! writers, forgetting deletes it, and sealed payloads stored in `events` hold no personal text
//! in the table's bytes, read back whole, and read as placeholders after `forget`.

mod common;

use common::fresh_store;
use evently_core::personal::{KeyStore, open_text, seal};
use evently_core::prelude::*;
use evently_core::{DomainEvent, EventData, EventStore, RecordedEvent};
use evently_postgres::PostgresKeyStore;
use futures::TryStreamExt as _;
use sqlx::AssertSqlSafe;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii(subject = member_id)]
        email: String,
        plan: String,
    },
}

/// The relay's read of the first `n` events, as stored: waits while transactions of other tests
/// still hold the global order back (it is gap-safe).
async fn relayed(
    store: &evently_postgres::PostgresEventStore,
    n: usize,
) -> Vec<evently_core::RawStoredEvent> {
    let by = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut read = Vec::new();
        store
            .read_all_raw_each(evently_core::Checkpoint::START, n, |e| {
                read.push(e);
                std::ops::ControlFlow::Continue(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if read.len() == n {
            return read;
        }
        assert!(
            std::time::Instant::now() < by,
            "{} of {n} events readable after 30 s",
            read.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_key_per_subject_under_racing_writers_and_forget_deletes_it() {
    let store = fresh_store("personal_keys").await;
    let keys = PostgresKeyStore::new(&store);
    let racing: Vec<_> = (0..8)
        .map(|_| {
            let keys = keys.clone();
            tokio::spawn(async move { keys.key_for("m-1").await })
        })
        .collect();
    let mut made = Vec::new();
    for task in racing {
        let key = task
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        made.push(*key.as_bytes());
    }
    made.dedup();
    assert_eq!(made.len(), 1, "racing writers got different keys");
    let found = keys
        .keys(&["m-1".to_owned(), "m-2".to_owned()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(found.len(), 1);
    assert!(keys.forget("m-1").await.unwrap_or_else(|e| panic!("{e}")));
    assert!(!keys.forget("m-1").await.unwrap_or_else(|e| panic!("{e}")));
    let again = keys.key_for("m-1").await.unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        *again.as_bytes(),
        made[0],
        "a forgotten subject got its old key back"
    );
}

#[tokio::test]
async fn sealed_payloads_hold_no_personal_text_and_read_as_placeholders_once_forgotten() {
    let store = fresh_store("personal_events").await;
    let keys = PostgresKeyStore::new(&store);
    let stream = StreamId::new("member", "m-9");
    let joined = MemberEvent::Joined {
        member_id: "m-9".into(),
        email: "hopper@example.com".into(),
        plan: "gold".into(),
    };
    let mut data =
        EventData::from_event(&joined, Metadata::default()).unwrap_or_else(|e| panic!("{e}"));
    let seed = *data.event_id.0.as_bytes();
    seal(
        &mut data.payload,
        &data.event_type,
        MemberEvent::PERSONAL_FIELDS,
        &keys,
        &seed,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    store
        .append(&stream, ExpectedVersion::NoStream, vec![data])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The table's bytes, as a dump would see them.
    let raw: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT string_agg(e::text, '') FROM \"{}\".events e",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !raw.contains("hopper"),
        "personal text in the events table: {raw}"
    );
    assert!(raw.contains("gold") && raw.contains("$personal"), "{raw}");

    let read = async || {
        let events: Vec<_> = store
            .load(&stream, 0)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let text = events[0].payload.to_string();
        let opened = open_text(&text, &keys)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or(text);
        MemberEvent::decode_json(&events[0].event_type, 1, &opened)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(read().await, joined);
    assert!(keys.forget("m-9").await.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        read().await,
        MemberEvent::Joined {
            member_id: "m-9".into(),
            email: String::new(),
            plan: "gold".into(),
        }
    );
}

/// The e-mail per member, as a projection sees it.
#[derive(Projection)]
#[projection(name = "member_emails", events(MemberEvent), context = sqlx::PgConnection)]
struct Emails {
    schema: String,
}

#[async_trait::async_trait]
impl Handles<MemberEvent, sqlx::PgConnection> for Emails {
    async fn handle(
        &mut self,
        event: &RecordedEvent<MemberEvent>,
        conn: &mut sqlx::PgConnection,
    ) -> Result<(), evently_core::projection::HandlerError> {
        let MemberEvent::Joined {
            member_id, email, ..
        } = &event.event;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".emails (member, email) VALUES ($1, $2) \
             ON CONFLICT (member) DO UPDATE SET email = EXCLUDED.email",
            self.schema
        )))
        .bind(member_id)
        .bind(email)
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[tokio::test]
async fn the_store_seals_on_append_and_every_reader_sees_placeholders_after_forget() {
    use evently_postgres::projection::ProjectionWorker;
    let store = fresh_store("personal_store")
        .await
        .with_personal_data::<MemberEvent>();
    let schema = store.schema().to_owned();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".emails (member TEXT PRIMARY KEY, email TEXT NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let joined = |member: &str, email: &str| MemberEvent::Joined {
        member_id: member.into(),
        email: email.into(),
        plan: "gold".into(),
    };
    let mut sent = Vec::new();
    for (member, email) in [
        ("m-1", "lovelace@example.com"),
        ("m-2", "babbage@example.com"),
    ] {
        let data = EventData::from_event(&joined(member, email), Metadata::default())
            .unwrap_or_else(|e| panic!("{e}"));
        sent.push(data.clone());
        store
            .append(
                &StreamId::new("member", member),
                ExpectedVersion::NoStream,
                vec![data],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Sent again with the same ids (a retry after an unknown outcome): sealing is deterministic,
    // so the store recognizes them and stores nothing more.
    let again = store
        .append(
            &StreamId::new("member", "m-1"),
            ExpectedVersion::NoStream,
            vec![sent[0].clone()],
        )
        .await;
    assert!(
        matches!(
            again,
            Ok(_) | Err(evently_core::StoreError::AlreadyAppended(_))
        ),
        "a retried append: {again:?}"
    );
    let raw: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT string_agg(e::text, '') FROM \"{schema}\".events e"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !raw.contains("lovelace") && !raw.contains("babbage"),
        "{raw}"
    );
    // What a relay forwards to a broker is the stored text: sealed.
    let forwarded: Vec<String> = relayed(&store, 2)
        .await
        .iter()
        .map(|e| e.payload.get().to_owned())
        .collect();
    assert!(
        forwarded
            .iter()
            .all(|p| p.contains("$personal") && !p.contains("@example.com"))
    );

    let loaded = |member: &'static str| {
        let store = store.clone();
        async move {
            let events: Vec<_> = store
                .load(&StreamId::new("member", member), 0)
                .try_collect()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            events[0]
                .decode::<MemberEvent>()
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert_eq!(loaded("m-1").await, joined("m-1", "lovelace@example.com"));
    let all = store
        .read_all(evently_core::Checkpoint::START, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all[1].payload["email"], "babbage@example.com");

    let mut worker = ProjectionWorker::new(
        store.clone(),
        Emails {
            schema: schema.clone(),
        },
        "w",
    );
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let emails = || async {
        let rows: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT member, email FROM \"{schema}\".emails ORDER BY member"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        rows
    };
    assert_eq!(emails().await[0].1, "lovelace@example.com");

    // The right to be forgotten: m-1's key goes; every reader, a rebuild included, goes on.
    assert!(store.forget("m-1").await.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(loaded("m-1").await, joined("m-1", ""));
    assert_eq!(loaded("m-2").await, joined("m-2", "babbage@example.com"));
    let truncate = format!("TRUNCATE \"{schema}\".emails");
    worker
        .rebuild(move |conn| {
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(truncate))
                    .execute(conn)
                    .await
                    .map(drop)
            })
        })
        .await
        .unwrap_or_else(|e| panic!("rebuild after forget: {e}"));
    assert_eq!(
        emails().await,
        vec![
            ("m-1".to_owned(), String::new()),
            ("m-2".to_owned(), "babbage@example.com".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_snapshot_of_a_stream_with_personal_data_is_sealed_and_gone_after_forget() {
    use evently_core::store::{Snapshot, SnapshotStore};
    let store = fresh_store("personal_snapshot")
        .await
        .with_personal_data::<MemberEvent>();
    let stream = StreamId::new("member", "m-5");
    let joined = MemberEvent::Joined {
        member_id: "m-5".into(),
        email: "noether@example.com".into(),
        plan: "gold".into(),
    };
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                EventData::from_event(&joined, Metadata::default())
                    .unwrap_or_else(|e| panic!("{e}")),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let state = serde_json::json!({"email": "noether@example.com", "plan": "gold"});
    store
        .save_snapshot(Snapshot {
            stream: stream.clone(),
            version: 1,
            schema_version: 1,
            state: state.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let raw: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT string_agg(s::text, '') FROM \"{}\".snapshots s",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !raw.contains("noether@example.com") && !raw.contains("\"plan\""),
        "{raw}"
    );
    let loaded = store
        .load_snapshot(&stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(loaded.state, state);
    forget_then_no_snapshot(&store, "m-5", &stream).await;
    // A stream without personal data keeps a plain snapshot.
    let plain = StreamId::new("member", "nobody");
    store
        .save_snapshot(Snapshot {
            stream: plain.clone(),
            version: 0,
            schema_version: 1,
            state: serde_json::json!({"plan": "free"}),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let loaded = store
        .load_snapshot(&plain)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        loaded.map(|s| s.state),
        Some(serde_json::json!({"plan": "free"}))
    );
}

/// A snapshot save reads only the events after the stream's last snapshot for their subjects
/// (the row keeps what its save found), and reads the whole stream when the row has no such list
/// (saved before the column, or by a store that seals nothing). Shown by an envelope planted in an
/// event before the first snapshot: the second save does not see it, the one after the list is
/// cleared does.
#[tokio::test]
async fn a_snapshot_save_reads_only_the_events_since_the_last_snapshot() {
    use evently_core::store::{Snapshot, SnapshotStore};
    let store = fresh_store("personal_snapshot_since")
        .await
        .with_personal_data::<MemberEvent>();
    let schema = store.schema().to_owned();
    let stream = StreamId::new("member", "m-7");
    let joined = |member: &str| {
        EventData::from_event(
            &MemberEvent::Joined {
                member_id: member.into(),
                email: format!("{member}@example.com"),
                plan: "gold".into(),
            },
            Metadata::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![joined("m-7"), joined("m-7"), joined("m-7")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let snapshot = |version: u64| Snapshot {
        stream: stream.clone(),
        version,
        schema_version: 1,
        state: serde_json::json!({ "version": version }),
    };
    // What the row says and what the state is sealed under.
    let row = || async {
        let (version, listed, state): (i64, Option<Vec<String>>, serde_json::Value) =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT version, personal_subjects, state FROM \"{schema}\".snapshots"
            )))
            .fetch_one(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let sealed: Vec<String> =
            serde_json::from_value(state["$personal_state"]["subjects"].clone())
                .unwrap_or_else(|e| panic!("{e}: {state}"));
        (version, listed, sealed)
    };
    let save = |version: u64| {
        let store = store.clone();
        let snapshot = snapshot(version);
        async move {
            store
                .save_snapshot(snapshot)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    save(3).await;
    let m7 = vec!["m-7".to_owned()];
    assert_eq!(row().await, (3, Some(m7.clone()), m7.clone()));
    // An envelope of another subject planted in version 2, before the snapshot.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{schema}\".events SET payload = \
           '{{\"member_id\": \"m-7\", \"plan\": \"gold\", \
              \"email\": {{\"$personal\": {{\"subject\": \"planted\"}}}}}}' \
         WHERE aggregate_id = 'm-7' AND version = 2"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    store
        .append(&stream, ExpectedVersion::Exact(3), vec![joined("m-9")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    save(4).await;
    let since = vec!["m-7".to_owned(), "m-9".to_owned()];
    assert_eq!(row().await, (4, Some(since.clone()), since.clone()));
    // A save older than the row (a newer one won meanwhile) trusts nothing and changes nothing.
    save(2).await;
    assert_eq!(row().await, (4, Some(since.clone()), since));
    // A row without the list: the whole stream is read.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{schema}\".snapshots SET personal_subjects = NULL"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    save(4).await;
    let all: Vec<String> = ["m-7", "m-9", "planted"].map(str::to_owned).into();
    assert_eq!(row().await, (4, Some(all.clone()), all));
    // Forgetting a subject found after the first snapshot makes the snapshot unreadable.
    let opened = store
        .load_snapshot(&stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|s| s.state);
    assert_eq!(opened, Some(serde_json::json!({ "version": 4 })));
    forget_then_no_snapshot(&store, "m-9", &stream).await;
}

/// Forgets `subject`, which `stream`'s snapshot is sealed under: the snapshot reads as absent.
async fn forget_then_no_snapshot(
    store: &evently_postgres::PostgresEventStore,
    subject: &str,
    stream: &StreamId,
) {
    use evently_core::store::SnapshotStore;
    assert!(
        store
            .forget(subject)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let after = store
        .load_snapshot(stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        after.is_none(),
        "a snapshot readable after forgetting {subject}"
    );
}

/// What a broker consumer gets is what the relay published, sealed: the engine opens it through
/// the inbox backend's store before the projection applies it, and after `forget` applies the
/// placeholder.
#[tokio::test]
async fn events_received_from_a_broker_are_opened_before_they_are_applied() {
    use evently_core::projection::Engine;
    use evently_postgres::projection::InboxBackend;
    let store = fresh_store("personal_broker")
        .await
        .with_personal_data::<MemberEvent>();
    let schema = store.schema().to_owned();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".emails (member TEXT PRIMARY KEY, email TEXT NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (member, email) in [
        ("m-1", "hamilton@example.com"),
        ("m-2", "johnson@example.com"),
    ] {
        let joined = MemberEvent::Joined {
            member_id: member.into(),
            email: email.into(),
            plan: "gold".into(),
        };
        store
            .append(
                &StreamId::new("member", member),
                ExpectedVersion::NoStream,
                vec![
                    EventData::from_event(&joined, Metadata::default())
                        .unwrap_or_else(|e| panic!("{e}")),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // The relay's read: the payloads as stored, as they travel through a broker.
    let published = relayed(&store, 2).await;
    let received: Vec<evently_core::StoredEvent> = published
        .iter()
        .map(|e| e.parse().unwrap_or_else(|err| panic!("{err}")))
        .collect();
    assert!(
        received
            .iter()
            .all(|e| !e.payload.to_string().contains("@example.com"))
    );
    let mut engine = Engine::new(
        Emails {
            schema: schema.clone(),
        },
        InboxBackend::new(store.clone()),
        10,
    );
    assert!(store.forget("m-2").await.unwrap_or_else(|e| panic!("{e}")));
    let delivered = engine
        .deliver(&received)
        .await
        .unwrap_or_else(|e| panic!("deliver: {e}"));
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    assert!(
        delivered
            .iter()
            .all(|d| *d == evently_core::projection::Delivered::Applied),
        "{delivered:?}"
    );
    let rows: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT member, email FROM \"{schema}\".emails ORDER BY member"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rows,
        vec![
            ("m-1".to_owned(), "hamilton@example.com".to_owned()),
            ("m-2".to_owned(), String::new())
        ]
    );
}
