//! Crypto-shredding's key store on the real server: one key per subject also under racing
//! writers, forgetting deletes it, and sealed payloads stored in `events` hold no personal text
//! in the table's bytes, read back whole, and read as placeholders after `forget`.

mod common;

use common::fresh_store;
use evently_core::personal::{KeyStore, open_text, seal};
use evently_core::prelude::*;
use evently_core::{DomainEvent, EventData, EventStore};
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
    seal(
        &mut data.payload,
        &data.event_type,
        MemberEvent::PERSONAL_FIELDS,
        &keys,
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
