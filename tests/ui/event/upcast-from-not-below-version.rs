use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(version = 2, upcast(from = 2, with = up))]
    Added { by: u32 },
}

fn up(v: serde_json::Value) -> Result<serde_json::Value, evently_core::UpcastError> {
    Ok(v)
}

fn main() {}
