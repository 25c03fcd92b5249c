use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_core::RecordedEvent;

#[derive(Debug, DomainEvent)]
enum NoteEvent {
    Written { text: String },
}

/// Writes through a context of its own, as a PostgreSQL projection writes through its transaction.
#[derive(Default)]
pub struct Sink {
    lines: Vec<String>,
}

#[derive(Default, Projection)]
#[projection(name = "notes.v2", events(NoteEvent), context = Sink)]
struct Notes;

#[async_trait::async_trait]
impl Handles<NoteEvent, Sink> for Notes {
    async fn handle(&mut self, event: &RecordedEvent<NoteEvent>, sink: &mut Sink) -> Result<(), HandlerError> {
        let NoteEvent::Written { text } = &event.event;
        sink.lines.push(text.clone());
        Ok(())
    }
}

fn main() {
    assert_eq!(<Notes as evently_core::projection::Projection>::NAME, "notes.v2");
    let _ = Sink::default().lines;
}
