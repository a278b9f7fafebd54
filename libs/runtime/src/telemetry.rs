//! Logs and traces.
//!
//! [`init`] installs one global `tracing` subscriber: human-readable logs in a
//! terminal, JSON lines in a cluster, and an OpenTelemetry layer so that every
//! span has a W3C trace context. Spans are exported over OTLP/gRPC only when
//! `HIBIKI_OTLP_ENDPOINT` is set; without it trace context still flows from
//! hop to hop, so a collector added later sees whole traces.
//!
//! The propagation helpers move that context across the two kinds of hop in
//! the mesh: gRPC metadata (RPCs) and [`TraceContext`] fields inside protobuf
//! payloads (the event log and the retry queues).

use std::collections::HashMap;
use std::io::IsTerminal;

use hibiki_proto::common::v1::TraceContext;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TelemetryConfig};

/// Telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("HIBIKI_OTLP_ENDPOINT: cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was installed before.
    #[error("telemetry was initialised twice")]
    AlreadyInitialised,
}

/// Keeps the trace pipeline alive; [`TelemetryGuard::shutdown`] flushes
/// spans still buffered. Dropping the guard flushes too.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes buffered spans and stops the exporter.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            // Telemetry is going away: stderr is the only place left to say so.
            eprintln!("hibiki: flushing traces failed: {e}");
        }
    }
}

/// Builds the tracer provider: ParentBased sampling (a continued trace keeps
/// its caller's decision; a new one is sampled at `sample_ratio`), and a
/// batching OTLP exporter when an endpoint is configured.
fn tracer_provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The OpenTelemetry layer, as every hibiki process and the tests use it.
///
/// No per-span source location, target, thread or busy/idle-time
/// attributes: they cost clock reads and allocations on every span of the
/// hot paths, and the span names and fields already say where a span comes
/// from. No context activation either: entering a span (every poll of an
/// instrumented future) would attach its OpenTelemetry context to the
/// thread, 3-4 % of the storm's CPU (perf, 2026-12-02), and hibiki reads
/// trace context from the tracing span ([`inject_metadata`],
/// [`current_trace_context`]), never from the thread's current context.
fn otel_layer<S>(
    tracer: opentelemetry_sdk::trace::Tracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_target(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
}

/// Installs the global subscriber and propagator. Call first in `main`.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider(config)?;
    // Spans at info and above always reach the OpenTelemetry layer, whatever
    // HIBIKI_LOG says: trace context must flow from hop to hop even when the
    // logs are turned down to warnings. HIBIKI_LOG filters the logs only.
    let otel = otel_layer(provider.tracer("hibiki"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialised)?;
    Ok(TelemetryGuard { provider })
}

/// A subscriber with only the OpenTelemetry layer, sampling every trace and
/// exporting nothing: lets a test check trace context without a global
/// subscriber (`tracing::subscriber::with_default`).
pub fn test_subscriber() -> impl tracing::Subscriber + Send + Sync {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOn)
        .build();
    tracing_subscriber::registry().with(otel_layer(provider.tracer("hibiki-test")))
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's trace context into outgoing gRPC metadata
/// (`traceparent`, `tracestate`). Client side.
pub fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata));
    });
}

/// Reads a caller's trace context from incoming HTTP/gRPC headers. Server
/// side: set it as the parent of the request's span with
/// `span.set_parent(cx)`.
pub fn extract_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Reads a caller's trace context from incoming gRPC metadata.
pub fn extract_metadata(metadata: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    extract_headers(metadata.as_ref())
}

/// The current span's trace context, for a queue payload: the W3C
/// `traceparent` (and `tracestate`) a propagator would write, formatted
/// directly (this runs once per inbound event).
pub fn current_trace_context() -> TraceContext {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return TraceContext::default();
    }
    TraceContext {
        traceparent: format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
        tracestate: sc.trace_state().header(),
    }
}

/// The context a queue payload carried, to become the parent of the span
/// that processes it.
pub fn context_from_payload(trace: &TraceContext) -> opentelemetry::Context {
    let mut carrier: HashMap<String, String> = HashMap::new();
    if !trace.traceparent.is_empty() {
        carrier.insert("traceparent".into(), trace.traceparent.clone());
    }
    if !trace.tracestate.is_empty() {
        carrier.insert("tracestate".into(), trace.tracestate.clone());
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

/// The trace id of a context as 32 hex digits, or `None` when it has none.
pub fn trace_id(cx: &opentelemetry::Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes `parent` the parent of `span`. Returns false when the span has
/// already started recording (its parent can no longer change).
pub fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) -> bool {
    span.set_parent(parent).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_through_grpc_metadata() {
        tracing::subscriber::with_default(test_subscriber(), || {
            let span = tracing::info_span!("client.call");
            let _g = span.enter();
            let sent = trace_id(&span.context()).expect("the span has a trace id");

            let mut metadata = tonic::metadata::MetadataMap::new();
            inject_metadata(&mut metadata);
            let traceparent = metadata.get("traceparent").unwrap().to_str().unwrap();
            assert!(traceparent.contains(&sent), "{traceparent}");

            let received = extract_metadata(&metadata);
            assert_eq!(trace_id(&received).as_deref(), Some(sent.as_str()));
        });
    }

    #[test]
    fn trace_context_round_trips_through_a_queue_payload() {
        tracing::subscriber::with_default(test_subscriber(), || {
            let producer = tracing::info_span!("queue.produce");
            let payload = producer.in_scope(current_trace_context);
            let sent = trace_id(&producer.context()).unwrap();
            assert!(payload.traceparent.starts_with("00-"), "{payload:?}");
            // Exactly what the W3C propagator writes into gRPC metadata.
            let mut metadata = tonic::metadata::MetadataMap::new();
            producer.in_scope(|| inject_metadata(&mut metadata));
            assert_eq!(
                metadata.get("traceparent").unwrap().to_str().unwrap(),
                payload.traceparent
            );

            // The consumer's span becomes a child in the same trace.
            let consumer = tracing::info_span!("queue.consume");
            assert!(set_parent(&consumer, context_from_payload(&payload)));
            assert_eq!(
                trace_id(&consumer.context()).as_deref(),
                Some(sent.as_str())
            );
        });
    }

    #[test]
    fn an_empty_payload_context_starts_a_new_trace() {
        tracing::subscriber::with_default(test_subscriber(), || {
            let cx = context_from_payload(&TraceContext::default());
            assert_eq!(trace_id(&cx), None);
        });
    }
}
