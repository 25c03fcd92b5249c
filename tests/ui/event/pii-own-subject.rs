use evently_core::prelude::*;

#[derive(DomainEvent)]
enum MemberEvent {
    Joined {
        member_id: String,
        #[pii(subject = email)]
        email: String,
    },
}

fn main() {}
