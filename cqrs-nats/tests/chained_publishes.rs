//! What the relay's order guard rests on, checked against the real server: a message carrying
//! `Nats-Expected-Last-Msg-Id` is stored only right after that message, and a resend of a stored
//! message is acknowledged as a duplicate whatever it expects (the server checks duplicates
//! first), so a relay starting again from its checkpoint goes on from what is stored.

use async_nats::HeaderMap;
use async_nats::header::{NATS_EXPECTED_LAST_MESSAGE_ID, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, context::PublishErrorKind, stream};

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("chain_{name}_{}_{nanos}", std::process::id())
}

#[tokio::test]
async fn a_message_is_stored_only_after_its_predecessor_and_a_resend_is_a_duplicate() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client);
    let name = unique("s").to_uppercase();
    let subject = unique("p");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{subject}.>")],
        ..stream::Config::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let publish = |id: &'static str, after: Option<&'static str>| {
        let js = js.clone();
        let subject = format!("{subject}.a");
        async move {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, id);
            if let Some(after) = after {
                headers.insert(NATS_EXPECTED_LAST_MESSAGE_ID, after);
            }
            js.publish_with_headers(subject, headers, id.into())
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .await
        }
    };
    let ack = publish("e1", None).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!ack.duplicate);
    // e3 sent while e2 was lost: refused.
    let refused = publish("e3", Some("e2")).await;
    assert_eq!(
        refused.map(|a| a.sequence).map_err(|e| e.kind()),
        Err(PublishErrorKind::WrongLastMessageId)
    );
    // The relay starts again: e2 (first of its run, no expectation), then e3 after e2.
    let e2 = publish("e2", None).await.unwrap_or_else(|e| panic!("{e}"));
    let e3 = publish("e3", Some("e2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((e2.sequence, e3.sequence), (2, 3));
    // A later run resends e2 and e3 (their acks were lost): duplicates, not refusals, though e2's
    // expectation (e1) is not the stream's last message; e4 then follows e3.
    let again = publish("e2", Some("e1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.duplicate, "{again:?}");
    let again = publish("e3", Some("e2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.duplicate, "{again:?}");
    let e4 = publish("e4", Some("e3"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(e4.sequence, 4);
    let info = js
        .get_stream(&name)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .info()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .state
        .messages;
    assert_eq!(info, 4, "e1..e4 once each, in order");
    let _ = js.delete_stream(&name).await;
}
