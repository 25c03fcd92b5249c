//! Two command variants dispatch to one handler when they carry the same fields.
use evently_core::prelude::*;

#[derive(Debug, DomainEvent)]
#[event(aggregate = Counter)]
enum CounterEvent {
    Added { by: u32 },
}

#[derive(Debug, Clone, Command)]
#[command(aggregate = Counter)]
enum CounterCommand {
    Increment { by: u32 },
    #[command(handler = increment)]
    Add { by: u32 },
}

#[derive(Debug, thiserror::Error)]
#[error("refused")]
struct Refused;

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "counter", command = CounterCommand, event = CounterEvent, error = Refused)]
struct Counter {
    total: u64,
}

impl Counter {
    fn increment(&self, by: u32) -> Result<Vec<CounterEvent>, Refused> {
        Ok(vec![CounterEvent::Added { by }])
    }
    fn apply_added(&mut self, by: &u32) {
        self.total += u64::from(*by);
    }
}

fn main() {
    let counter = Counter::default();
    let events = Command::handle(CounterCommand::Add { by: 2 }, &counter).unwrap();
    assert!(matches!(events[..], [CounterEvent::Added { by: 2 }]));
}
