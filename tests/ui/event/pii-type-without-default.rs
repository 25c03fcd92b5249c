use evently_core::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Email(String);

#[derive(DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii(subject = member_id)]
        email: Email,
    },
}

fn main() {}
