use evently_core::prelude::*;

#[derive(Debug, serde::Serialize, DomainEvent)]
enum CounterEvent {
    #[serde(rename = "counter_added")]
    Added { by: u32 },
    #[serde(skip)]
    Reset { to: u32 },
}

fn main() {}
