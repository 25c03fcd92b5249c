//! Where the server is and how the framework's streams and subjects are named.

use std::fmt;
use std::time::Duration;

/// The server's address and the stream events are published to.
///
/// Subjects are `<prefix>.<aggregate type>.<aggregate id>.<event type>`
/// (`cqrs.events.order.o-1.OrderPlaced`), each part a single subject token: characters a token
/// cannot hold (`.`, `*`, `>`, whitespace, `%`) are written `%XX`. A consumer filters
/// `cqrs.events.order.>` for one aggregate type.
#[derive(Clone)]
pub struct NatsConfig {
    url: String,
    stream: String,
    prefix: String,
    declare: bool,
    duplicate_window: Duration,
    replicas: usize,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &evently_transport::masked_url(&self.url))
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .field("declare", &self.declare)
            .field("duplicate_window", &self.duplicate_window)
            .finish_non_exhaustive()
    }
}

impl NatsConfig {
    /// The server at `url` (`nats://host:4222`), events to stream `CQRS_EVENTS` under subject
    /// prefix `cqrs.events`, streams declared by this crate, a 2-minute duplicate window.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: "CQRS_EVENTS".to_owned(),
            prefix: "cqrs.events".to_owned(),
            declare: true,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        }
    }

    /// The server at `NATS_URL`, or `nats://127.0.0.1:4222`.
    #[must_use]
    pub fn from_env() -> Self {
        Self::new(std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()))
    }

    /// The stream's name and its subject prefix.
    ///
    /// # Errors
    /// [`TransportError::Config`](evently_transport::TransportError::Config) when the stream name
    /// has `.`, `*`, `>` or whitespace, or the prefix is empty or has wildcards.
    pub fn with_stream(
        mut self,
        stream: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Result<Self, evently_transport::TransportError> {
        let (stream, prefix) = (stream.into(), prefix.into());
        if stream.is_empty()
            || stream
                .chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace())
        {
            return Err(evently_transport::TransportError::config(
                crate::BROKER,
                format_args!("`{stream}` is not a stream name (no `.`, `*`, `>` or whitespace)"),
            ));
        }
        if prefix.is_empty()
            || prefix
                .split('.')
                .any(|t| t.is_empty() || t == "*" || t == ">" || t.chars().any(char::is_whitespace))
        {
            return Err(evently_transport::TransportError::config(
                crate::BROKER,
                format_args!(
                    "`{prefix}` is not a subject prefix (dot-separated tokens, no wildcards)"
                ),
            ));
        }
        self.stream = stream;
        self.prefix = prefix;
        Ok(self)
    }

    /// Whether this crate creates the streams it uses (the default) or only checks they exist.
    #[must_use]
    pub fn with_declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// How long the server remembers a message id to drop a resend (2 minutes by default): a
    /// relay that restarts within it re-sends nothing a consumer sees twice.
    #[must_use]
    pub fn with_duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Replicas of the streams this crate creates (1 by default; 3 in a cluster).
    #[must_use]
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// The server's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The events stream.
    #[must_use]
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The subject prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The dead-letter stream: `<stream>_DLQ`.
    #[must_use]
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.stream)
    }

    /// The dead-letter subject of consumer `durable`: `<prefix>-dlq.<durable>` (outside the
    /// events stream's subjects).
    #[must_use]
    pub fn dead_letter_subject(&self, durable: &str) -> String {
        format!("{}-dlq.{}", self.prefix, token(durable))
    }

    pub(crate) fn declares(&self) -> bool {
        self.declare
    }

    pub(crate) fn duplicate_window(&self) -> Duration {
        self.duplicate_window
    }

    pub(crate) fn replicas(&self) -> usize {
        self.replicas
    }

    /// The subject of an event.
    #[must_use]
    pub fn subject(&self, aggregate_type: &str, aggregate_id: &str, event_type: &str) -> String {
        format!(
            "{}.{}.{}.{}",
            self.prefix,
            token(aggregate_type),
            token(aggregate_id),
            token(event_type)
        )
    }

    /// The subjects of one aggregate type's events (a consumer's filter).
    #[must_use]
    pub fn subjects_of(&self, aggregate_type: &str) -> String {
        format!("{}.{}.>", self.prefix, token(aggregate_type))
    }
}

/// `text` as one subject token: `.`, `*`, `>`, whitespace, `%` and control characters as `%XX`
/// (an empty text as `%00`).
#[must_use]
pub fn token(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| matches!(c, '.' | '*' | '>' | '%') || c.is_whitespace() || c.is_control();
    if !text.is_empty() && !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    if text.is_empty() {
        return std::borrow::Cow::Borrowed("%00");
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_per_part() {
        let config = NatsConfig::new("nats://localhost");
        assert_eq!(
            config.subject("order", "o-1", "OrderPlaced"),
            "cqrs.events.order.o-1.OrderPlaced"
        );
        assert_eq!(
            config.subject("order", "a.b *>c", "X"),
            "cqrs.events.order.a%2Eb%20%2A%3Ec.X"
        );
        assert_eq!(config.subject("order", "", "X"), "cqrs.events.order.%00.X");
        assert_eq!(config.subjects_of("order"), "cqrs.events.order.>");
    }

    #[test]
    fn bad_names_are_refused() {
        let config = NatsConfig::new("nats://localhost");
        assert!(config.clone().with_stream("A.B", "p").is_err());
        assert!(config.clone().with_stream("A", "p.*").is_err());
        assert!(config.clone().with_stream("A", "").is_err());
        assert!(config.with_stream("A", "p.q").is_ok());
    }

    #[test]
    fn debug_masks_the_password() {
        let shown = format!("{:?}", NatsConfig::new("nats://app:s3cret@host:4222"));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
