//! Receiving spans over OTLP/gRPC: what `hibiki trace collect` and the
//! tests' in-process receiver share. A request's spans are flattened into
//! [`Span`]s (ids in hex, times in Unix nanoseconds, the service that made
//! them) and handed to a [`SpanSink`].

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// One received span, flattened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Span {
    /// The span's name.
    pub name: String,
    /// Trace id, 32 hex digits.
    pub trace_id: String,
    /// Span id, 16 hex digits.
    pub span_id: String,
    /// Parent span id, 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// The service that recorded it: the span's `hibiki.service` attribute
    /// (gRPC server spans carry one, which matters when `hibiki dev` runs
    /// every service in one process), else the resource's `service.name`.
    pub service_name: String,
    /// Start, Unix nanoseconds.
    pub start_ns: u64,
    /// End, Unix nanoseconds.
    pub end_ns: u64,
}

impl Span {
    /// How long it ran, in nanoseconds.
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// Where received spans go.
pub trait SpanSink: Send + Sync + 'static {
    /// Takes one export request's spans.
    fn accept(&self, spans: Vec<Span>);
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

/// The spans of one export request.
pub fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let resource_service = resource_spans
            .resource
            .as_ref()
            .and_then(|r| string_attribute(&r.attributes, "service.name"))
            .unwrap_or_default()
            .to_owned();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                let service_name = string_attribute(&span.attributes, "hibiki.service")
                    .map(str::to_owned)
                    .unwrap_or_else(|| resource_service.clone());
                out.push(Span {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    service_name,
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    name: span.name,
                });
            }
        }
    }
    out
}

struct Receiver<S>(S);

#[tonic::async_trait]
impl<S: SpanSink> TraceService for Receiver<S> {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.accept(flatten(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The OTLP trace service, handing what it receives to `sink`. Mount it on
/// a tonic server.
pub fn trace_service<S: SpanSink>(sink: S) -> TraceServiceServer<impl TraceService> {
    // Batches of a busy mesh exceed tonic's 4 MiB default.
    TraceServiceServer::new(Receiver(sink)).max_decoding_message_size(64 * 1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::AnyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan};

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn flattening_takes_ids_times_and_the_span_s_own_service() {
        let span = |name: &str, attributes: Vec<KeyValue>| OtlpSpan {
            name: name.into(),
            trace_id: vec![0xab; 16],
            span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: vec![],
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 4_500,
            attributes,
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "hibiki-dev")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span("webhook", vec![]),
                        span("grpc.server", vec![kv("hibiki.service", "contacts")]),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let spans = flatten(request);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].trace_id, "ab".repeat(16));
        assert_eq!(spans[0].span_id, "0102030405060708");
        assert_eq!(spans[0].parent_span_id, "");
        assert_eq!(spans[0].service_name, "hibiki-dev");
        assert_eq!(spans[0].duration_ns(), 3_500);
        assert_eq!(spans[1].service_name, "contacts");
    }
}
