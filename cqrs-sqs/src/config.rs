//! Where the queues are, how they are named, and how the client is built.

use std::fmt;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::{Credentials, Region};
use evently_transport::TransportError;

use crate::BROKER;

/// The SQS endpoint, credentials and the queue the relay sends to.
///
/// Queues are FIFO queues by default (names end in `.fifo`): the relay sends every event to
/// [`queue`](Self::queue) with `MessageGroupId` = its stream (the server hands a group's messages
/// out in order, one consumer at a time) and `MessageDeduplicationId` = its event id (the server
/// drops a resend within its 5-minute window). SQS has no fan-out of its own: a second consumer
/// of the same events reads a queue of its own, fed by a relay of its own (its own name, so its
/// own checkpoint).
///
/// A standard queue ([`with_standard_queue`](Self::with_standard_queue)) takes more messages per
/// second, but **keeps no order** (an aggregate's events may be applied in any order, by
/// several consumers at once) and may deliver a message twice (the consumer's inbox drops the
/// second). Use it only for handlers that do not depend on order: counters, notifications,
/// saga starters keyed by the starting event.
#[derive(Clone)]
pub struct SqsConfig {
    endpoint: Option<String>,
    region: String,
    credentials: Option<(String, String)>,
    queue: String,
    declare: bool,
    visibility: Duration,
    max_receive_count: u32,
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("static_credentials", &self.credentials.is_some())
            .field("queue", &self.queue)
            .field("fifo", &self.is_fifo())
            .field("declare", &self.declare)
            .field("visibility", &self.visibility)
            .field("max_receive_count", &self.max_receive_count)
            .finish()
    }
}

impl SqsConfig {
    /// AWS in `region` with the normal credential chain (environment, profile, instance role),
    /// events to queue `cqrs-events.fifo`, queues declared by this crate, a 30 s visibility
    /// timeout, the server's redrive after 10 receives.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            endpoint: None,
            region: region.into(),
            credentials: None,
            queue: "cqrs-events.fifo".to_owned(),
            declare: true,
            visibility: Duration::from_secs(30),
            max_receive_count: 10,
        }
    }

    /// A local SQS-compatible server at `endpoint` (`http://127.0.0.1:4566`), region
    /// `us-east-1`, static credentials `test`/`test` (local servers accept any).
    pub fn local(endpoint: impl Into<String>) -> Self {
        Self::new("us-east-1")
            .with_endpoint(endpoint)
            .with_static_credentials("test", "test")
    }

    /// From the environment: `SQS_ENDPOINT` (a local server, with static credentials from
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or `test`/`test`), else AWS with the normal
    /// chain; `AWS_REGION` (default `us-east-1`); `SQS_QUEUE` (default `cqrs-events.fifo`; a
    /// name without `.fifo` is a standard queue, see the type's docs), or `SQS_QUEUE_URL` (the
    /// queue's URL as the console shows it; its last path segment is the name).
    #[must_use]
    pub fn from_env() -> Self {
        let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned());
        let mut config = Self::new(region);
        if let Ok(endpoint) = std::env::var("SQS_ENDPOINT") {
            let id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".to_owned());
            let secret =
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".to_owned());
            config = config
                .with_endpoint(endpoint)
                .with_static_credentials(id, secret);
        }
        let from_url = std::env::var("SQS_QUEUE_URL").ok().and_then(|url| {
            url.trim_end_matches('/')
                .rsplit('/')
                .next()
                .map(str::to_owned)
        });
        if let Some(queue) = std::env::var("SQS_QUEUE").ok().or(from_url) {
            config.queue = queue;
        }
        config
    }

    /// Talks to `endpoint` instead of AWS's.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Static credentials instead of the normal chain.
    #[must_use]
    pub fn with_static_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key_id.into(), secret_access_key.into()));
        self
    }

    /// The FIFO queue the relay sends to.
    ///
    /// # Errors
    /// [`TransportError::Config`] when `queue` is not a FIFO queue name (1 to 80 characters of
    /// letters, digits, `-` and `_`, ending in `.fifo`).
    pub fn with_queue(mut self, queue: impl Into<String>) -> Result<Self, TransportError> {
        let queue = queue.into();
        check_queue_name(&queue, true)?;
        self.queue = queue;
        Ok(self)
    }

    /// A standard queue for the relay to send to, and for consumers made with this
    /// configuration: no order, possible duplicates (see the type's docs).
    ///
    /// # Errors
    /// [`TransportError::Config`] when `queue` is not a standard queue name (1 to 80 characters
    /// of letters, digits, `-` and `_`, not ending in `.fifo`).
    pub fn with_standard_queue(mut self, queue: impl Into<String>) -> Result<Self, TransportError> {
        let queue = queue.into();
        check_queue_name(&queue, false)?;
        self.queue = queue;
        Ok(self)
    }

    /// Whether this crate creates the queues it uses (the default) or expects operators to.
    #[must_use]
    pub fn with_declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// How long a received message stays invisible to other consumers (the consumer extends it
    /// while its handler runs), at least 1 s, at most 12 hours.
    #[must_use]
    pub fn with_visibility(mut self, visibility: Duration) -> Self {
        self.visibility = visibility.clamp(Duration::from_secs(1), Duration::from_secs(43_200));
        self
    }

    /// After how many receives the server moves a message to the dead-letter queue by itself
    /// (a consumer that crashes on it every time), 1 to 1,000.
    #[must_use]
    pub fn with_max_receive_count(mut self, count: u32) -> Self {
        self.max_receive_count = count.clamp(1, 1_000);
        self
    }

    /// The queue the relay sends to.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Whether the queues are FIFO queues (else standard ones): what the queue's name says,
    /// as in SQS (a FIFO queue's name ends in `.fifo`).
    #[must_use]
    pub fn is_fifo(&self) -> bool {
        is_fifo(&self.queue)
    }

    /// Whether queues are declared by this crate.
    #[must_use]
    pub fn declares(&self) -> bool {
        self.declare
    }

    /// The visibility timeout.
    #[must_use]
    pub fn visibility(&self) -> Duration {
        self.visibility
    }

    /// The redrive's receive count.
    #[must_use]
    pub fn max_receive_count(&self) -> u32 {
        self.max_receive_count
    }

    /// The endpoint, when not AWS's.
    #[must_use]
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// A client for this configuration (the SDK's standard retries, 30 s per operation).
    pub async fn client(&self) -> aws_sdk_sqs::Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &self.credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "cqrs-sqs",
            ));
        }
        aws_sdk_sqs::Client::new(&loader.load().await)
    }
}

/// The dead-letter queue of `queue`: `<name>-dlq.fifo` for a FIFO queue, `<name>-dlq` for a
/// standard one (SQS wants a dead-letter queue of its source's kind).
#[must_use]
pub fn dead_letter_queue(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

/// `Ok` for a queue name of the kind asked for whose dead-letter queue name is also valid.
pub(crate) fn check_queue_name(queue: &str, fifo: bool) -> Result<(), TransportError> {
    let base = if fifo {
        queue.strip_suffix(".fifo")
    } else {
        Some(queue).filter(|q| !q.ends_with(".fifo"))
    };
    let valid = base.is_some_and(|base| {
        !base.is_empty()
            // `<base>-dlq[.fifo]` must fit in 80 characters too.
            && base.len() + "-dlq".len() + if fifo { ".fifo".len() } else { 0 } <= 80
            && base
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    match (valid, fifo) {
        (true, _) => Ok(()),
        (false, true) => Err(TransportError::config(
            BROKER,
            format_args!(
                "`{queue}` is not a FIFO queue name this crate can use: letters, digits, `-` and `_`, ending in `.fifo`, at most 71 characters before `.fifo` (its dead-letter queue adds `-dlq`); for a standard queue (no order) use `with_standard_queue`"
            ),
        )),
        (false, false) => Err(TransportError::config(
            BROKER,
            format_args!(
                "`{queue}` is not a standard queue name this crate can use: letters, digits, `-` and `_`, at most 76 characters (its dead-letter queue adds `-dlq`), not ending in `.fifo` (that is a FIFO queue: use `with_queue`)"
            ),
        )),
    }
}

/// Whether `queue` (a name or a URL) is a FIFO queue.
pub(crate) fn is_fifo(queue: &str) -> bool {
    queue.ends_with(".fifo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_checked() {
        assert!(
            SqsConfig::local("http://x")
                .with_queue("orders.fifo")
                .is_ok()
        );
        for bad in [
            "orders",
            ".fifo",
            "a b.fifo",
            "a.b.fifo",
            &format!("{}.fifo", "x".repeat(72)),
        ] {
            let error = SqsConfig::local("http://x")
                .with_queue(bad)
                .expect_err(bad)
                .to_string();
            assert!(error.contains("not a FIFO queue name"), "{error}");
        }
        assert_eq!(dead_letter_queue("orders.fifo"), "orders-dlq.fifo");
        let standard = SqsConfig::local("http://x")
            .with_standard_queue("orders")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!standard.is_fifo());
        assert_eq!(dead_letter_queue("orders"), "orders-dlq");
        for bad in ["orders.fifo", "", "a b", &"x".repeat(77)] {
            let error = SqsConfig::local("http://x")
                .with_standard_queue(bad)
                .expect_err(bad)
                .to_string();
            assert!(error.contains("not a standard queue name"), "{error}");
        }
        let error = SqsConfig::local("http://x")
            .with_queue("orders")
            .expect_err("a standard name as FIFO")
            .to_string();
        assert!(error.contains("with_standard_queue"), "{error}");
    }

    #[test]
    fn durations_and_counts_are_clamped() {
        let config = SqsConfig::local("http://x")
            .with_visibility(Duration::MAX)
            .with_max_receive_count(0);
        assert_eq!(config.visibility(), Duration::from_secs(43_200));
        assert_eq!(config.max_receive_count(), 1);
    }
}
