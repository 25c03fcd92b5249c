use evently_core::prelude::*;

#[derive(DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii]
        email: String,
    },
}

fn main() {}
