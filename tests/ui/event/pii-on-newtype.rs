use evently_core::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Contact {
    email: String,
}

#[derive(DomainEvent)]
enum MemberEvent {
    Joined(#[pii(subject = member_id)] Contact),
}

fn main() {}
