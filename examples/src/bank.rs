//! A bank account: opened, deposited, withdrawn; no overdraft.
//!
//! Shows newtype event variants, a schema version with an upcaster, a snapshot policy and a query.

use evently::prelude::*;
use evently::{Query, UpcastError};
use serde::{Deserialize, Serialize};

/// Money moved into the account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deposit {
    /// Amount in cents.
    pub amount_cents: u64,
    /// Free text shown on the statement.
    pub reference: String,
}

/// The events of an account.
#[derive(Debug, Clone, PartialEq, Eq, DomainEvent)]
#[event(aggregate = Account)]
pub enum AccountEvent {
    /// The account was opened.
    #[event(name = "AccountOpened")]
    Opened {
        /// Its holder.
        owner: String,
    },
    /// Money came in. Version 1 had `amount` in whole units and no reference.
    #[event(name = "MoneyDeposited", version = 2, upcast(from = 1, with = deposit_v1_to_v2))]
    Deposited(Deposit),
    /// Money went out.
    #[event(name = "MoneyWithdrawn")]
    Withdrawn {
        /// Amount in cents.
        amount_cents: u64,
    },
}

/// `MoneyDeposited` v1 `{"amount": 12}` (whole units) becomes v2
/// `{"amount_cents": 1200, "reference": ""}`.
///
/// # Errors
/// When the v1 payload has no numeric `amount`.
pub fn deposit_v1_to_v2(payload: serde_json::Value) -> Result<serde_json::Value, UpcastError> {
    let amount = payload
        .get("amount")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| UpcastError::new("v1 deposit without a numeric `amount`"))?;
    Ok(serde_json::json!({ "amount_cents": amount * 100, "reference": "" }))
}

/// The commands of an account.
#[derive(Debug, Clone, Command)]
#[command(aggregate = Account)]
pub enum AccountCommand {
    /// Open a new account.
    #[command(create)]
    Open {
        /// Its holder.
        owner: String,
    },
    /// Put money in.
    Deposit(Deposit),
    /// Take money out.
    Withdraw {
        /// Amount in cents.
        amount_cents: u64,
    },
}

/// Why an account command is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Amounts are positive.
    #[error("the amount must be positive")]
    ZeroAmount,
    /// Not enough money.
    #[error("insufficient funds: balance {balance_cents}, asked {asked_cents}")]
    InsufficientFunds {
        /// What is there.
        balance_cents: u64,
        /// What was asked.
        asked_cents: u64,
    },
}

/// An account's state (serializable, for snapshots).
#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "account",
    command = AccountCommand,
    event = AccountEvent,
    error = AccountError,
    snapshot(every = 100)
)]
pub struct Account {
    /// Its holder.
    pub owner: String,
    /// Balance in cents.
    pub balance_cents: u64,
    /// How many movements.
    pub movements: u64,
}

impl Account {
    fn open(&self, owner: String) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![AccountEvent::Opened { owner }])
    }

    fn deposit(&self, deposit: Deposit) -> Result<Vec<AccountEvent>, AccountError> {
        if deposit.amount_cents == 0 {
            return Err(AccountError::ZeroAmount);
        }
        Ok(vec![AccountEvent::Deposited(deposit)])
    }

    fn withdraw(&self, amount_cents: u64) -> Result<Vec<AccountEvent>, AccountError> {
        if amount_cents == 0 {
            return Err(AccountError::ZeroAmount);
        }
        if amount_cents > self.balance_cents {
            return Err(AccountError::InsufficientFunds {
                balance_cents: self.balance_cents,
                asked_cents: amount_cents,
            });
        }
        Ok(vec![AccountEvent::Withdrawn { amount_cents }])
    }

    fn apply_opened(&mut self, owner: &str) {
        owner.clone_into(&mut self.owner);
    }

    fn apply_deposited(&mut self, deposit: &Deposit) {
        self.balance_cents += deposit.amount_cents;
        self.movements += 1;
    }

    fn apply_withdrawn(&mut self, amount_cents: &u64) {
        self.balance_cents -= amount_cents;
        self.movements += 1;
    }
}

/// Asks for an account's balance.
#[derive(Debug, Clone)]
pub struct GetBalance(pub String);

impl Query for GetBalance {
    type Output = Option<u64>;
}
