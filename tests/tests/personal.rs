//! `#[pii(subject = ...)]` on event fields: the derive's table of personal fields, sealing what
//! `EventData::from_event` encodes, and decoding after the subject is forgotten.

use evently_core::personal::{InMemoryKeyStore, KeyStore, open_text, seal};
use evently_core::prelude::*;
use evently_core::{DomainEvent, EventData};

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii(subject = member_id)]
        email: String,
        #[pii(subject = member_id)]
        age: Option<u32>,
        plan: String,
    },
    #[event(name = "MemberMoved")]
    Moved {
        member: u64,
        #[pii(subject = member)]
        address: Vec<String>,
    },
    Left {
        member_id: String,
    },
}

#[test]
fn the_derive_lists_the_personal_fields_with_their_placeholders() {
    let fields: Vec<_> = MemberEvent::PERSONAL_FIELDS
        .iter()
        .map(|f| (f.event_type, f.field, f.subject, (f.forgotten)()))
        .collect();
    assert_eq!(
        fields,
        vec![
            ("Joined", "email", "member_id", serde_json::json!("")),
            ("Joined", "age", "member_id", serde_json::Value::Null),
            ("MemberMoved", "address", "member", serde_json::json!([])),
        ]
    );
}

async fn stored(keys: &InMemoryKeyStore, event: &MemberEvent) -> (String, String) {
    let mut data =
        EventData::from_event(event, Metadata::default()).unwrap_or_else(|e| panic!("{e}"));
    let seed = *data.event_id.0.as_bytes();
    seal(
        &mut data.payload,
        &data.event_type,
        MemberEvent::PERSONAL_FIELDS,
        keys,
        &seed,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    (data.event_type, data.payload.to_string())
}

async fn read(keys: &InMemoryKeyStore, (event_type, text): &(String, String)) -> MemberEvent {
    let opened = open_text(text, keys)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| text.clone());
    MemberEvent::decode_json(event_type, 1, &opened).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn sealed_events_decode_whole_and_after_forgetting_as_placeholders() {
    let keys = InMemoryKeyStore::new();
    let joined = MemberEvent::Joined {
        member_id: "m-7".into(),
        email: "grace@example.com".into(),
        age: Some(37),
        plan: "gold".into(),
    };
    let moved = MemberEvent::Moved {
        member: 7,
        address: vec!["1 Main St".into(), "Springfield".into()],
    };
    let left = MemberEvent::Left {
        member_id: "m-7".into(),
    };
    let rows = [
        stored(&keys, &joined).await,
        stored(&keys, &moved).await,
        stored(&keys, &left).await,
    ];
    for (_, text) in &rows {
        for secret in ["grace@example.com", "\"age\":37", "Main St", "Springfield"] {
            assert!(!text.contains(secret), "`{secret}` in the clear: {text}");
        }
    }
    assert_eq!(read(&keys, &rows[0]).await, joined);
    assert_eq!(read(&keys, &rows[1]).await, moved);
    assert_eq!(read(&keys, &rows[2]).await, left);

    assert!(keys.forget("m-7").await.unwrap_or(false));
    assert_eq!(
        read(&keys, &rows[0]).await,
        MemberEvent::Joined {
            member_id: "m-7".into(),
            email: String::new(),
            age: None,
            plan: "gold".into(),
        }
    );
    // Subject 7 (a number) is another subject: still readable.
    assert_eq!(read(&keys, &rows[1]).await, moved);
}

#[tokio::test]
async fn the_in_memory_store_seals_and_forgets_as_the_postgres_store_does() {
    use evently_core::store::{Snapshot, SnapshotStore};
    use evently_core::{EventStore, InMemoryEventStore};
    use futures::TryStreamExt as _;
    let store = InMemoryEventStore::new().with_personal_data::<MemberEvent>();
    let stream = StreamId::new("member", "m-7");
    let joined = MemberEvent::Joined {
        member_id: "m-7".into(),
        email: "grace@example.com".into(),
        age: Some(37),
        plan: "gold".into(),
    };
    let data =
        EventData::from_event(&joined, Metadata::default()).unwrap_or_else(|e| panic!("{e}"));
    store
        .append(&stream, ExpectedVersion::NoStream, vec![data.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Retried with the same id: recognized (sealing is deterministic).
    let again = store
        .append(&stream, ExpectedVersion::NoStream, vec![data])
        .await;
    assert!(
        matches!(
            again,
            Ok(_) | Err(evently_core::StoreError::AlreadyAppended(_))
        ),
        "{again:?}"
    );
    let loaded: Vec<_> = store
        .load(&stream, 0)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].decode::<MemberEvent>().ok(), Some(joined.clone()));
    store
        .save_snapshot(Snapshot {
            stream: stream.clone(),
            version: 1,
            schema_version: 1,
            state: serde_json::json!({"email": "grace@example.com"}),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let snapshot = store
        .load_snapshot(&stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        snapshot.map(|s| s.state),
        Some(serde_json::json!({"email": "grace@example.com"}))
    );

    assert!(store.forget("m-7").await.unwrap_or(false));
    let loaded: Vec<_> = store
        .load(&stream, 0)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        loaded[0].decode::<MemberEvent>().ok(),
        Some(MemberEvent::Joined {
            member_id: "m-7".into(),
            email: String::new(),
            age: None,
            plan: "gold".into(),
        })
    );
    let all = store
        .read_all(evently_core::Checkpoint::START, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all[0].payload["email"], "");
    assert!(
        store
            .load_snapshot(&stream)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "a snapshot readable after forget"
    );
}

/// Two tenants' views of one store (one key store), the same subject id in both: each tenant's
/// data is sealed under its own key, the all-tenants view opens each event with its tenant's
/// key, and forgetting the subject in one tenant leaves the other's data readable.
#[tokio::test]
async fn one_subject_id_in_two_tenants_is_two_subjects() {
    use evently_core::{EventStore, InMemoryEventStore, TenantId};
    use futures::TryStreamExt as _;
    let keys = std::sync::Arc::new(InMemoryKeyStore::new());
    let store = InMemoryEventStore::new()
        .with_personal_data::<MemberEvent>()
        .with_key_store(keys.clone());
    let tenant = |id: &str| TenantId::new(id).unwrap_or_else(|e| panic!("{e}"));
    let joined = |email: &str| MemberEvent::Joined {
        member_id: "m-1".into(),
        email: email.into(),
        age: Some(40),
        plan: "gold".into(),
    };
    let stream = StreamId::new("member", "m-1");
    let (acme, globex) = (
        store.for_tenant(tenant("acme")),
        store.for_tenant(tenant("globex")),
    );
    for (view, email) in [(&acme, "ada@acme.test"), (&globex, "gus@globex.test")] {
        let data = EventData::from_event(&joined(email), Metadata::default())
            .unwrap_or_else(|e| panic!("{e}"));
        view.append(&stream, ExpectedVersion::NoStream, vec![data])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Two keys in the shared key store, one per tenant.
    let named = keys
        .keys(&[
            "acme/m-1".to_owned(),
            "globex/m-1".to_owned(),
            "m-1".to_owned(),
        ])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut names: Vec<_> = named.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["acme/m-1", "globex/m-1"]);
    let emails = |events: Vec<evently_core::StoredEvent>| -> Vec<String> {
        events
            .iter()
            .map(|e| e.payload["email"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let everyone = store.all_tenants();
    let all = everyone
        .read_all(evently_core::Checkpoint::START, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(emails(all), ["ada@acme.test", "gus@globex.test"]);
    // The all-tenants view forgets nobody: it does not know whose subject.
    assert!(everyone.forget("m-1").await.is_err());
    // Forgotten in acme: acme's reads the placeholder, globex's its data, in every view.
    assert!(acme.forget("m-1").await.unwrap_or(false));
    let loaded = |view: InMemoryEventStore| async move {
        let events: Vec<_> = view
            .load(&StreamId::new("member", "m-1"), 0)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        emails(events)
    };
    assert_eq!(loaded(acme.clone()).await, [""]);
    assert_eq!(loaded(globex.clone()).await, ["gus@globex.test"]);
    let all = everyone
        .read_all(evently_core::Checkpoint::START, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(emails(all), ["", "gus@globex.test"]);
}
