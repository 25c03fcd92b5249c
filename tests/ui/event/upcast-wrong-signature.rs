use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(version = 2, upcast(from = 1, with = up))]
    Added { by: u32 },
}

fn up(v: serde_json::Value) -> serde_json::Value {
    v
}

fn main() {}
