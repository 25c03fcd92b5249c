use evently_core::prelude::*;

#[derive(DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii(subject = member_id)]
        #[serde(rename = "mail")]
        email: String,
    },
}

fn main() {}
