use evently_core::saga::{StepError, StepKey};

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    id: String,
}

struct Services;

impl Services {
    async fn reserve(&self, _: &mut Order, _: &StepKey) -> Result<(), StepError> {
        Ok(())
    }
    async fn release(&self, _: &mut Order, _: &StepKey) -> Result<(), StepError> {
        Ok(())
    }
    async fn pay(&self, _: &mut Order, _: &StepKey) -> Result<(), StepError> {
        Ok(())
    }
}

#[derive(evently_core::Saga)]
#[saga(name = "fulfillment")]
enum Fulfillment {
    Reserve,
}

fn main() {}
