//! A handler's panic as its failure: the runtimes catch it and record its text.

/// The text of a panic's payload (what a runtime that turns a handler's panic into its failure
/// records as the error).
#[must_use]
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned())
}
