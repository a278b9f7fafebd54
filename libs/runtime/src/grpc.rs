//! The gRPC server every hibiki service runs, and the client side of the
//! mesh's calls.
//!
//! Server: [`GrpcRoutes`] collects a service's RPC services and adds health
//! and reflection; [`serve`] runs them behind one tower stack (see
//! [`serve`] for the order and why). Client: [`channel`] plus
//! [`ClientInterceptor`], which sends the service token and the current trace
//! context with every call.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::auth::{AuthLayer, Authenticator};
use crate::config::{Secret, ServerConfig};
use crate::telemetry;

/// The RPC services of one server, plus health and reflection.
pub struct GrpcRoutes {
    builder: RoutesBuilder,
    names: Vec<&'static str>,
}

impl Default for GrpcRoutes {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcRoutes {
    /// No services yet.
    pub fn new() -> Self {
        Self {
            builder: RoutesBuilder::default(),
            names: Vec::new(),
        }
    }

    /// Adds an RPC service (a generated `...Server`).
    pub fn add<S>(&mut self, svc: S) -> &mut Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.builder.add_service(svc);
        self
    }

    /// The fully-qualified names of the RPC services added so far.
    pub fn service_names(&self) -> &[&'static str] {
        &self.names
    }

    /// The routes with health and reflection added. Reflection advertises
    /// exactly the services served here, described from hibiki's descriptor
    /// set.
    pub fn finish(
        mut self,
        health: tonic_health::pb::health_server::HealthServer<
            impl tonic_health::pb::health_server::Health,
        >,
    ) -> Routes {
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hibiki_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection");
        for name in &self.names {
            reflection = reflection.with_service_name(*name);
        }
        let reflection = reflection
            .build_v1()
            .expect("hibiki's descriptor set is valid: it was built by protox");
        self.builder.add_service(health);
        self.builder.add_service(reflection);
        self.builder.routes()
    }
}

/// Serves `routes` on `listener` until `shutdown` completes, then stops
/// accepting and lets in-flight calls finish.
///
/// The stack, outermost first:
/// 1. **deadline** ([`DeadlineLayer`]): bounds every call by the
///    caller's `grpc-timeout` or the server's limit, whichever is shorter;
///    answers DEADLINE_EXCEEDED. Client-streaming calls (an import streaming
///    a million rows) are bounded by the caller's deadline only.
/// 2. **telemetry**: a `grpc.server` span continuing the caller's trace, and
///    per-method counts and latency. Outside the others so that shed and
///    rejected calls are seen too.
/// 3. **readiness** ([`Readiness`]): until the service's schema migrations
///    are applied, its RPCs answer UNAVAILABLE ("starting") instead of
///    failing on tables that do not exist yet; health and reflection answer
///    throughout.
/// 4. **auth**: rejects calls without a valid token before they take a
///    concurrency slot, so unauthenticated traffic cannot crowd out real
///    work.
/// 5. **load shed + concurrency limit**: at most `concurrency_limit` calls
///    run at once in this process; one more is refused at once with
///    RESOURCE_EXHAUSTED instead of queueing, so overload shows up as fast
///    errors the caller can back off from, never as growing latency.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    config: &ServerConfig,
    authenticator: Authenticator,
    service: &'static str,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let stack = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::new(config.request_timeout))
        .layer(TelemetryLayer { service })
        .layer(readiness)
        .layer(AuthLayer::new(authenticator))
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
            Arc::new(Semaphore::new(config.concurrency_limit)),
        ))
        .into_inner();
    tonic::transport::Server::builder()
        .layer(stack)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Whether a service may answer its RPCs yet: not until its schema
/// migrations are applied. As a tower layer, it answers the others'
/// calls UNAVAILABLE ("starting") meanwhile, so a caller retries instead
/// of seeing a database error; health and reflection always pass.
#[derive(Debug, Clone)]
pub struct Readiness(tokio::sync::watch::Receiver<bool>);

impl Readiness {
    /// Ready from the start (a service without migrations).
    pub fn now() -> Self {
        Self(tokio::sync::watch::channel(true).1)
    }

    /// Ready once `ready` holds true.
    pub fn when(ready: tokio::sync::watch::Receiver<bool>) -> Self {
        Self(ready)
    }
}

impl<S> tower::Layer<S> for Readiness {
    type Service = ReadinessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadinessService {
            inner,
            ready: self.0.clone(),
        }
    }
}

/// The service [`Readiness`] produces.
#[derive(Debug, Clone)]
pub struct ReadinessService<S> {
    inner: S,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<S, B> tower::Service<http::Request<B>> for ReadinessService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<Self::Response, Self::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if *self.ready.borrow() || crate::auth::OPEN_PATHS.iter().any(|p| path.starts_with(p)) {
            return futures::future::Either::Right(self.inner.call(request));
        }
        let status = tonic::Status::unavailable(
            "starting: the service's database migrations are not applied yet; retry shortly",
        );
        futures::future::Either::Left(futures::future::ready(Ok(status.into_http())))
    }
}

/// The gRPC methods of hibiki's contracts whose requests stream from the
/// client: they run as long as the upload does, so only the caller's own
/// deadline bounds them.
fn client_streaming_methods() -> &'static std::collections::HashSet<String> {
    static METHODS: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    METHODS.get_or_init(|| {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(hibiki_proto::FILE_DESCRIPTOR_SET)
            .expect("hibiki's descriptor set decodes");
        let mut methods = std::collections::HashSet::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    if method.client_streaming() {
                        methods.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        methods
    })
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of
/// H M S m u n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Tower layer: ends a call at its deadline with DEADLINE_EXCEEDED.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    /// Calls run at most `limit` (or the caller's shorter deadline).
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            limit: self.limit,
        }
    }
}

/// The service [`DeadlineLayer`] produces.
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for DeadlineService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let asked = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let server_limit =
            (!client_streaming_methods().contains(request.uri().path())).then_some(self.limit);
        let deadline = match (asked, server_limit) {
            (Some(a), Some(l)) => Some(a.min(l)),
            (a, l) => a.or(l),
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let Some(deadline) = deadline else {
                return future.await;
            };
            match tokio::time::timeout(deadline, future).await {
                Ok(result) => result,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call ran past its deadline of {deadline:?}"
                ))
                .into_http()),
            }
        })
    }
}

/// Tower layer: a server span per call and RPC metrics.
#[derive(Debug, Clone, Copy)]
pub struct TelemetryLayer {
    service: &'static str,
}

impl<S> tower::Layer<S> for TelemetryLayer {
    type Service = TelemetryService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TelemetryService {
            inner,
            service: self.service,
        }
    }
}

/// The service [`TelemetryLayer`] produces.
#[derive(Debug, Clone)]
pub struct TelemetryService<S> {
    inner: S,
    service: &'static str,
}

/// Keeps metric labels bounded: only hibiki's and gRPC's own methods are
/// named; anything else a scanner may send is counted as `other`.
fn method_label(path: &str) -> String {
    if path.starts_with("/hibiki.") || path.starts_with("/grpc.") {
        path.to_owned()
    } else {
        "other".to_owned()
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for TelemetryService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            hibiki.service = self.service,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        telemetry::set_parent(&span, telemetry::extract_headers(request.headers()));
        let service = self.service;
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let result = future.await;
                // Errors travel as trailers-only responses, so a failed unary
                // call carries grpc-status in its headers; a response without
                // it is a success (or a stream whose end is still to come).
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32)
                        .unwrap_or(tonic::Code::Ok),
                    // Shed by the concurrency limit (tonic maps it to
                    // RESOURCE_EXHAUSTED further out).
                    Err(_) => tonic::Code::ResourceExhausted,
                };
                tracing::Span::current().record("rpc.grpc.status_code", code as i32);
                let code_label = format!("{code:?}");
                metrics::counter!(
                    "hibiki_grpc_server_requests_total",
                    "service" => service, "method" => method.clone(), "code" => code_label
                )
                .increment(1);
                metrics::histogram!(
                    "hibiki_grpc_server_duration_seconds",
                    "service" => service, "method" => method
                )
                .record(started.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

/// Calls a process has in flight on one channel at most; more wait their
/// turn in the channel. Half the server's default limit
/// (`HIBIKI_GRPC_CONCURRENCY`, 1024), so that a storm's caller (scenario
/// walking thousands of runs at once) queues its calls instead of having
/// them shed with RESOURCE_EXHAUSTED, and two such callers still fit.
pub const CLIENT_CONCURRENCY: usize = 512;

/// A channel to another hibiki service at `url` (e.g.
/// `http://127.0.0.1:50052`). It connects lazily and reconnects by itself,
/// so a caller starts while the callee is down, and keeps at most
/// [`CLIENT_CONCURRENCY`] calls in flight.
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .concurrency_limit(CLIENT_CONCURRENCY)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Adds the bearer token and the current trace context to every outgoing
/// call. Use with a generated client's `with_interceptor`.
#[derive(Clone)]
pub struct ClientInterceptor {
    authorization: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl std::fmt::Debug for ClientInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientInterceptor([redacted])")
    }
}

impl ClientInterceptor {
    /// Sends `token` as `authorization: Bearer <token>`. Fails when the token
    /// holds characters a header cannot carry.
    pub fn new(token: &Secret) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        let mut authorization: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {}", token.expose()).parse()?;
        authorization.set_sensitive(true);
        Ok(Self { authorization })
    }
}

impl tonic::service::Interceptor for ClientInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        telemetry::inject_metadata(request.metadata_mut());
        Ok(request)
    }
}

/// Asks a server's health service about `service` ("" for the whole
/// server). Any failure to get an answer is an error.
pub async fn health_status(
    url: &str,
    service: &str,
) -> Result<tonic_health::ServingStatus, tonic::Status> {
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    let channel = channel(url).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner();
    Ok(match Wire::try_from(response.status) {
        Ok(Wire::Serving) => tonic_health::ServingStatus::Serving,
        Ok(Wire::NotServing) => tonic_health::ServingStatus::NotServing,
        _ => tonic_health::ServingStatus::Unknown,
    })
}

/// Polls `url`'s overall health until it is `want` or `timeout` passes.
/// Returns the last status seen (or the last error) on timeout.
pub async fn wait_for_health(
    url: &str,
    want: tonic_health::ServingStatus,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match health_status(url, "").await {
            Ok(s) if s == want => return Ok(()),
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("{}: {}", e.code(), e.message()),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{url} did not report {want:?} within {timeout:?} (last: {last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The service behind the gate: answers every call with OK.
    #[derive(Clone)]
    struct Ok200;

    impl tower::Service<http::Request<()>> for Ok200 {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = futures::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            futures::future::ready(Ok(http::Response::new(tonic::body::Body::empty())))
        }
    }

    async fn status_of(gate: &mut ReadinessService<Ok200>, path: &str) -> Option<String> {
        use tower::{Service, ServiceExt};
        let request = http::Request::builder().uri(path).body(()).unwrap();
        let response = gate.ready().await.unwrap().call(request).await.unwrap();
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn rpcs_answer_unavailable_until_the_service_is_ready() {
        use tower::Layer;
        let (ready, watch) = tokio::sync::watch::channel(false);
        let mut gate = Readiness::when(watch).layer(Ok200);
        let rpc = "/hibiki.contacts.v1.TenantService/WatchChannels";
        // 14 is UNAVAILABLE; health answers meanwhile.
        assert_eq!(status_of(&mut gate, rpc).await.as_deref(), Some("14"));
        assert_eq!(
            status_of(&mut gate, "/grpc.health.v1.Health/Check").await,
            None
        );
        ready.send_replace(true);
        assert_eq!(status_of(&mut gate, rpc).await, None);
        let mut always = Readiness::now().layer(Ok200);
        assert_eq!(status_of(&mut always, rpc).await, None);
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn the_import_is_a_client_streaming_method() {
        assert!(
            client_streaming_methods()
                .contains("/hibiki.contacts.v1.ContactService/ImportContacts")
        );
        assert!(
            !client_streaming_methods().contains("/hibiki.contacts.v1.ContactService/ApplyEvents")
        );
    }
}
