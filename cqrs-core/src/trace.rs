//! W3C trace context carried from a command to its events and on to every reader of them.
//!
//! A command given a trace context ([`CommandMetadata::with_trace`](crate::CommandMetadata::with_trace),
//! e.g. from the `traceparent` header of the HTTP request that sent it), or executed inside a
//! span that OpenTelemetry traces (feature `opentelemetry`), stores it in each event's metadata
//! under the [`TRACEPARENT`] header. The relays copy it into the broker message's headers, and
//! consumers, projections and sagas run the event's handling inside it: with the feature on, their
//! spans are children of the command's span in the same trace; without it, their spans still carry
//! the `trace_id` field, and [`current`] returns the context for code that passes it on (a handler
//! that sends a command of its own continues the trace).
//!
//! Trace state is read from the `traceparent` alone (`tracestate` is not carried).
//!
//! Nothing is stored when there is no trace: an event's metadata only grows when a trace exists.

use std::fmt;
use std::future::Future;

/// The metadata header (and broker message header) holding the trace context, as W3C names it.
pub const TRACEPARENT: &str = "traceparent";

/// A W3C `traceparent`: the trace, the span that is the parent of what follows, and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace's id (16 bytes, never all zero).
    pub trace_id: [u8; 16],
    /// The id of the span this context continues from (8 bytes, never all zero).
    pub parent_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a W3C traceparent ({reason}); expected `00-<32 hex>-<16 hex>-<2 hex>`")]
pub struct TraceContextError {
    /// The value, cut to 80 characters.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl TraceContext {
    /// Reads a `traceparent` header value (version `00`, or a later version's first four fields,
    /// as the W3C recommendation asks of readers).
    ///
    /// # Errors
    /// [`TraceContextError`] naming what is wrong: the length, a field that is not lowercase hex,
    /// version `ff`, or an all-zero id.
    pub fn parse(value: &str) -> Result<Self, TraceContextError> {
        let refuse = |reason| TraceContextError {
            value: value.chars().take(80).collect(),
            reason,
        };
        let bytes = value.trim().as_bytes();
        if bytes.len() < 55 {
            return Err(refuse("too short"));
        }
        let version = hex::<1>(&bytes[0..2]).ok_or_else(|| refuse("the version is not hex"))?[0];
        if version == 0xff {
            return Err(refuse("version ff is invalid"));
        }
        if (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return Err(refuse("unexpected characters after the flags"));
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(refuse("the fields are not separated by `-`"));
        }
        let trace_id = hex::<16>(&bytes[3..35]).ok_or_else(|| refuse("the trace id is not hex"))?;
        let parent_id =
            hex::<8>(&bytes[36..52]).ok_or_else(|| refuse("the parent id is not hex"))?;
        let flags = hex::<1>(&bytes[53..55]).ok_or_else(|| refuse("the flags are not hex"))?[0];
        if trace_id == [0; 16] {
            return Err(refuse("the trace id is all zeros"));
        }
        if parent_id == [0; 8] {
            return Err(refuse("the parent id is all zeros"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Whether the trace is sampled (flag bit 0).
    #[must_use]
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lowercase hex digits (the `trace_id` field of the spans).
    #[must_use]
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The context of `metadata`'s [`TRACEPARENT`] header, if it has a valid one (an invalid one is
    /// ignored: a trace is never a reason to refuse an event).
    #[must_use]
    pub fn of(metadata: &crate::Metadata) -> Option<Self> {
        metadata
            .headers
            .get(TRACEPARENT)
            .and_then(|value| Self::parse(value).ok())
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

impl std::str::FromStr for TraceContext {
    type Err = TraceContextError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::parse(value)
    }
}

fn hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    fn digit(d: u8) -> Option<u8> {
        match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'a'..=b'f' => Some(d - b'a' + 10),
            _ => None,
        }
    }
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

tokio::task_local! {
    static CURRENT: Option<TraceContext>;
}

/// The trace context to pass on from here: the OpenTelemetry context of the current span when
/// the feature `opentelemetry` is on and the span is traced, else the context the framework is
/// running under ([`scope`]: a consumer's message, a projection's event, a command's metadata).
#[must_use]
pub fn current() -> Option<TraceContext> {
    #[cfg(feature = "opentelemetry")]
    if let Some(context) = otel::current() {
        return Some(context);
    }
    CURRENT.try_with(|current| *current).ok().flatten()
}

/// Runs `work` under `context`: [`current`] returns it inside (where OpenTelemetry does not
/// say otherwise). `None` runs `work` outside any trace.
pub async fn scope<F: Future>(context: Option<TraceContext>, work: F) -> F::Output {
    CURRENT.scope(context, work).await
}

/// Runs `work` under `context` when that changes anything (a context to set, or one to clear),
/// else runs it as it is: the common case of no trace anywhere costs nothing.
pub async fn scope_if_needed<F: Future>(context: Option<TraceContext>, work: F) -> F::Output {
    let current = CURRENT.try_with(|current| *current).ok().flatten();
    if context == current {
        work.await
    } else {
        CURRENT.scope(context, work).await
    }
}

/// Makes `span` (not yet entered) continue `context` from elsewhere (a message, a request): its
/// parent with the feature `opentelemetry`, and its `trace_id` field ([`record`]).
pub fn follow(span: &tracing::Span, context: &TraceContext) {
    if span.is_disabled() {
        return;
    }
    record(span, context);
    #[cfg(feature = "opentelemetry")]
    otel::set_parent(span, context);
}

/// Records `context`'s trace id in `span`'s `trace_id` field, if it has one.
pub fn record(span: &tracing::Span, context: &TraceContext) {
    if !span.is_disabled() {
        span.record("trace_id", context.trace_id_hex());
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    pub(super) fn current() -> Option<TraceContext> {
        let context = tracing::Span::current().context();
        let span = context.span();
        let span = span.span_context();
        span.is_valid().then(|| TraceContext {
            trace_id: span.trace_id().to_bytes(),
            parent_id: span.span_id().to_bytes(),
            flags: span.trace_flags().to_u8(),
        })
    }

    pub(super) fn set_parent(span: &tracing::Span, context: &TraceContext) {
        let remote = SpanContext::new(
            TraceId::from_bytes(context.trace_id),
            SpanId::from_bytes(context.parent_id),
            TraceFlags::new(context.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let context = TraceContext::parse(VALUE).unwrap();
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(context.sampled());
        assert_eq!(context.to_string(), VALUE);
    }

    #[test]
    fn reads_a_later_version_and_refuses_what_is_wrong() {
        let later = format!("cc{}-what-comes-later", &VALUE[2..]);
        assert_eq!(
            TraceContext::parse(&later).unwrap().trace_id_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for (value, reason) in [
            ("", "too short"),
            (&format!("ff{}", &VALUE[2..]), "version ff is invalid"),
            (
                &format!("{VALUE}-x"),
                "unexpected characters after the flags",
            ),
            (&VALUE.to_uppercase(), "the trace id is not hex"),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "the trace id is all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "the parent id is all zeros",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "the fields are not separated by `-`",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                "the flags are not hex",
            ),
        ] {
            let error = TraceContext::parse(value).unwrap_err();
            assert_eq!(error.reason, reason, "{value}");
            assert!(error.to_string().contains("expected `00-"), "{error}");
        }
    }

    #[test]
    fn metadata_with_a_broken_traceparent_has_no_trace() {
        let metadata = crate::Metadata::default().with_header(TRACEPARENT, "nonsense");
        assert_eq!(TraceContext::of(&metadata), None);
        let metadata = crate::Metadata::default().with_header(TRACEPARENT, VALUE);
        assert!(TraceContext::of(&metadata).is_some());
    }

    #[tokio::test]
    async fn scope_sets_the_current_context() {
        let context = TraceContext::parse(VALUE).unwrap();
        assert_eq!(current(), None);
        let inside = scope(Some(context), async { current() }).await;
        assert_eq!(inside, Some(context));
        // Cleared inside a scope when the work has no trace; set when it has one.
        let cleared = scope(Some(context), scope_if_needed(None, async { current() })).await;
        assert_eq!(cleared, None);
        let set = scope_if_needed(Some(context), async { current() }).await;
        assert_eq!(set, Some(context));
        assert_eq!(scope_if_needed(None, async { current() }).await, None);
    }
}
