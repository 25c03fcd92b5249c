use evently_core::saga::{StepError, StepKey};

struct Order {
    id: String,
}

struct Services;

impl Services {
    async fn reserve(&self, order: &mut Order, _: &StepKey) -> Result<(), StepError> {
        order.id.push('!');
        Ok(())
    }
}

#[derive(evently_core::Saga)]
#[saga(name = "fulfillment", data = Order, context = Services)]
enum Fulfillment {
    Reserve,
}

fn main() {}
