use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    Added {
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
}

fn main() {}
