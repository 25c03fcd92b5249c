use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_core::RecordedEvent;

#[derive(Debug, DomainEvent)]
enum NoteEvent {
    Written { text: String },
}

#[derive(Default, Projection)]
#[projection(name = "notes", events(NoteEvent), tenants = "every")]
struct Notes {
    texts: Vec<String>,
}

#[async_trait::async_trait]
impl Handles<NoteEvent> for Notes {
    async fn handle(&mut self, event: &RecordedEvent<NoteEvent>, _: &mut ()) -> Result<(), HandlerError> {
        let NoteEvent::Written { text } = &event.event;
        self.texts.push(text.clone());
        Ok(())
    }
}

fn main() {}
