//! `cqrs forget <subject>` against the real PostgreSQL: `events show` prints a member's sealed
//! e-mail before, the placeholder after; without a terminal it asks for `--yes`.

use evently_core::prelude::*;
use evently_core::{EventData, EventStore};

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

mod common;

/// The schema `pg::fresh_store("cli_forget")` makes.
const SCHEMA: &str = "t_cli_forget";

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii(subject = member_id)]
        email: String,
    },
}

/// (exit code, stdout, stderr).
fn cqrs(args: &[&str]) -> (i32, String, String) {
    common::run(&["--schema", SCHEMA], args)
}

#[tokio::test]
async fn forget_turns_what_events_show_prints_into_placeholders() {
    let store = pg::fresh_store("cli_forget")
        .await
        .with_personal_data::<MemberEvent>();
    let joined = MemberEvent::Joined {
        member_id: "m-3".into(),
        email: "turing@example.com".into(),
    };
    store
        .append(
            &StreamId::new("member", "m-3"),
            ExpectedVersion::NoStream,
            vec![
                EventData::from_event(&joined, Metadata::default())
                    .unwrap_or_else(|e| panic!("{e}")),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, out, err) = cqrs(&["events", "show", "member/m-3", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("turing@example.com"), "{out}");

    let (code, _, err) = cqrs(&["forget", "m-3"]);
    assert_ne!(code, 0);
    assert!(err.contains("pass --yes"), "{err}");
    let (code, out, err) = cqrs(&["forget", "m-3", "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("`m-3` is forgotten"), "{out}");

    let (code, out, err) = cqrs(&["events", "show", "member/m-3", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("turing"), "{out}");
    let event: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(event["payload"]["email"], "", "{event}");
    assert_eq!(event["payload"]["member_id"], "m-3", "{event}");
    let (code, out, err) = cqrs(&["forget", "m-3", "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("has no data key"), "{out}");
}
