use evently_core::prelude::*;

#[derive(DomainEvent)]
enum MemberEvent {
    Joined {
        #[pii(subject = email)]
        name: String,
        #[pii(subject = name)]
        email: String,
    },
}

fn main() {}
