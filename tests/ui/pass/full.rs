//! Every attribute of the three derives, used together.
use evently_core::prelude::*;
use evently_core::UpcastError;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    pub sku: String,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(aggregate = Basket)]
pub enum BasketEvent {
    #[event(name = "basket.opened")]
    Opened,
    #[event(version = 3, upcast(from = 1, with = v1), upcast(from = 2, with = v2), apply = on_added)]
    Added(Line),
    Removed {
        sku: String,
        #[serde(default, rename = "why")]
        reason: Option<String>,
    },
}

fn v1(v: serde_json::Value) -> Result<serde_json::Value, UpcastError> {
    Ok(v)
}

fn v2(v: serde_json::Value) -> Result<serde_json::Value, UpcastError> {
    Ok(v)
}

#[derive(Debug, Clone, Command)]
#[command(aggregate = Basket)]
pub enum BasketCommand {
    #[command(create)]
    Open,
    Add(Line),
    #[command(handler = take_out, create_or_update)]
    Remove { sku: String, reason: Option<String> },
    /// A variant whose snake_case name is a keyword: the handler is `r#move`.
    Move,
}

#[derive(Debug, thiserror::Error)]
pub enum BasketError {
    #[error("empty")]
    Empty,
}

#[derive(Debug, Default, Aggregate, serde::Serialize, serde::Deserialize)]
#[aggregate(
    name = "basket",
    command = BasketCommand,
    event = BasketEvent,
    error = BasketError,
    snapshot(every = 50, version = 2)
)]
pub struct Basket {
    lines: Vec<Line>,
}

impl Basket {
    fn open(&self) -> Result<Vec<BasketEvent>, BasketError> {
        Ok(vec![BasketEvent::Opened])
    }
    fn add(&self, line: Line) -> Result<Vec<BasketEvent>, BasketError> {
        Ok(vec![BasketEvent::Added(line)])
    }
    fn take_out(&self, sku: String, reason: Option<String>) -> Result<Vec<BasketEvent>, BasketError> {
        if self.lines.is_empty() {
            return Err(BasketError::Empty);
        }
        Ok(vec![BasketEvent::Removed { sku, reason }])
    }
    fn r#move(&self) -> Result<Vec<BasketEvent>, BasketError> {
        Ok(Vec::new())
    }
    fn apply_opened(&mut self) {}
    fn on_added(&mut self, line: &Line) {
        self.lines.push(line.clone());
    }
    fn apply_removed(&mut self, sku: &str, _reason: &Option<String>) {
        self.lines.retain(|l| l.sku != sku);
    }
}

fn main() {
    assert_eq!(<Basket as Aggregate>::NAME, "basket");
    assert_eq!(BasketEvent::EVENT_TYPES, ["basket.opened", "Added", "Removed"]);
}
