//! W3C trace context in `ce-traceparent`: the one place that parses and
//! formats it and ties it to `tracing` spans.
//!
//! An event carries the context of the span that appended it, so whoever
//! handles the event (a worker, a projection, a saga step) opens its span as a
//! child of that one and one trace covers the whole flow. When no
//! OpenTelemetry layer is installed (no exporter configured) every function
//! here is a cheap no-op: spans have no OpenTelemetry context to give or take.

use std::fmt;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A parsed W3C `traceparent` (version `00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (never all zeros).
    pub trace_id: u128,
    /// The parent span id (never all zeros).
    pub span_id: u64,
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` for anything malformed, so a bad
    /// value from a client is dropped rather than propagated.
    ///
    /// Follows the W3C rules: lowercase hex only, version `ff` is invalid,
    /// all-zero trace or span ids are invalid, and a future version may add
    /// fields after the four known ones (version `00` may not).
    pub fn parse(value: &str) -> Option<Self> {
        let v = value.as_bytes();
        // 2 + 1 + 32 + 1 + 16 + 1 + 2
        const LEN: usize = 55;
        if v.len() < LEN || [2, 35, 52].iter().any(|&i| v[i] != b'-') {
            return None;
        }
        let version = hex_u8(&value[0..2])?;
        match version {
            0xff => return None,
            0 if v.len() != LEN => return None,
            0 => {}
            _ if v.len() > LEN && v[LEN] != b'-' => return None,
            _ => {}
        }
        let trace_id = u128::from_str_radix(lower_hex(&value[3..35])?, 16).ok()?;
        let span_id = u64::from_str_radix(lower_hex(&value[36..52])?, 16).ok()?;
        let flags = hex_u8(&value[53..55])?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id as 32 lowercase hex digits (how tools display it).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::NONE,
        )
    }

    fn from_span_context(sc: &SpanContext) -> Option<Self> {
        if !sc.is_valid() {
            return None;
        }
        Some(Self {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn lower_hex(s: &str) -> Option<&str> {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        .then_some(s)
}

fn hex_u8(s: &str) -> Option<u8> {
    u8::from_str_radix(lower_hex(s)?, 16).ok()
}

/// The current span's context as a `traceparent`, or `None` when there is
/// no OpenTelemetry context (no exporter, or outside any span).
pub fn current() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    TraceParent::from_span_context(span.span_context()).map(|tp| tp.to_string())
}

/// Makes `span` a child of the context in `traceparent` (typically an
/// event's `ce-traceparent`). Call it before the span is first entered.
/// A missing or malformed value leaves `span` where it is (a new trace or
/// the child of the current span).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.and_then(TraceParent::parse) else {
        return;
    };
    let cx = opentelemetry::Context::new().with_remote_span_context(tp.span_context());
    // Fails only without an OpenTelemetry layer (nothing to continue) or
    // once the span has started (a caller's mistake, not worth a failure).
    if let Err(e) = span.set_parent(cx) {
        tracing::trace!(error = %e, "trace context not continued");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let tp = TraceParent::parse(GOOD).unwrap();
        assert_eq!(tp.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(tp.span_id, 0xb7ad6b7169203331);
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), GOOD);
        assert_eq!(tp.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert_eq!(TraceParent::parse(unsampled).unwrap().flags, 0);
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "00",
            "00-xyz",
            // version ff is forbidden
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            // all-zero trace id / span id
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            // wrong lengths
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "00-0af7651916cd43dd8448eb211c80319c00-b7ad6b7169203331-01",
            // version 00 has exactly four fields
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            // uppercase and non-hex
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "0x-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            // wrong separators
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            // a future version must separate its extra fields with a dash
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            // multi-byte characters where hex belongs
            "00-0af7651916cd43dd8448eb211c8031é-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_future_version_is_read_as_version_00() {
        let v = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-next";
        let tp = TraceParent::parse(v).unwrap();
        assert_eq!(tp.to_string(), GOOD, "we speak version 00 onward");
    }

    #[test]
    fn a_span_continues_the_context_it_is_given_and_hands_on_its_own() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = TraceParent::parse(GOOD).unwrap();
            let span = tracing::info_span!("child");
            set_parent(&span, Some(GOOD));
            let own = span
                .in_scope(current)
                .map(|s| TraceParent::parse(&s).unwrap());
            let own = own.expect("a span with a parent has a context to hand on");
            assert_eq!(own.trace_id, parent.trace_id, "same trace");
            assert_ne!(own.span_id, parent.span_id, "its own span id");
            assert_eq!(own.flags & 1, 1, "the caller sampled it, so do we");

            // Without a (valid) parent the span starts a trace of its own.
            for tp in [None, Some("00-xyz")] {
                let root = tracing::info_span!("root");
                set_parent(&root, tp);
                let ctx = root.in_scope(current).and_then(|s| TraceParent::parse(&s));
                let ctx = ctx.expect("a root span has a context too");
                assert_ne!(ctx.trace_id, parent.trace_id);
            }
        });
    }

    #[test]
    fn without_an_opentelemetry_layer_there_is_nothing_to_carry() {
        let span = tracing::info_span!("no-layer");
        set_parent(&span, Some(GOOD));
        let _g = span.enter();
        assert_eq!(current(), None);
    }
}
