//! A minimal gRPC service for exercising the server stack itself (auth,
//! shedding, timeouts) and for measuring its cost: `hibiki.test.v1.Probe/Check`
//! takes a `TenantRef` and answers with it, after the check every hibiki
//! handler makes (may the caller act on this tenant?).
//!
//! Calls about the tenant `"hold"` wait for a permit from the probe's gate,
//! so a test can keep calls in flight for as long as it likes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hibiki_proto::common::v1::TenantRef;
use hibiki_runtime::Caller;
use hibiki_runtime::config::Secret;
use hibiki_runtime::grpc::{self, ClientInterceptor};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

/// The probe's one method.
pub const PATH: &str = "/hibiki.test.v1.Probe/Check";

/// The tenant whose calls wait at the gate.
pub const HOLD: &str = "hold";

/// The probe service.
#[derive(Clone)]
pub struct Probe {
    gate: Arc<Semaphore>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    authorize: bool,
}

impl Probe {
    /// A probe that authorizes the caller for the tenant asked about, as a
    /// hibiki handler does (needs the server's auth layer).
    pub fn new() -> Self {
        Self {
            gate: Arc::new(Semaphore::new(0)),
            held: Arc::default(),
            authorize: true,
        }
    }

    /// A probe that skips the caller check: for a bare server without
    /// hibiki's stack (the benchmark's baseline).
    pub fn without_authorization() -> Self {
        Self {
            authorize: false,
            ..Self::new()
        }
    }

    /// Lets `n` held calls finish.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Calls waiting at the gate now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl NamedService for Probe {
    const NAME: &'static str = "hibiki.test.v1.Probe";
}

struct Check {
    gate: Arc<Semaphore>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    authorize: bool,
}

impl tonic::server::UnaryService<TenantRef> for Check {
    type Response = TenantRef;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TenantRef>, Status>> + Send>>;

    fn call(&mut self, request: Request<TenantRef>) -> Self::Future {
        let (gate, held) = (self.gate.clone(), self.held.clone());
        let authorize = self.authorize;
        Box::pin(async move {
            if authorize {
                Caller::of(&request)?.authorize_tenant(&request.get_ref().tenant_id)?;
            }
            if request.get_ref().tenant_id == HOLD {
                use std::sync::atomic::Ordering::SeqCst;
                held.fetch_add(1, SeqCst);
                let _permit = gate.acquire().await.expect("the gate is never closed");
                held.fetch_sub(1, SeqCst);
            }
            Ok(Response::new(request.into_inner()))
        })
    }
}

impl tower::Service<http::Request<Body>> for Probe {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let check = Check {
            gate: self.gate.clone(),
            held: self.held.clone(),
            authorize: self.authorize,
        };
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<TenantRef, TenantRef>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(check, request).await)
        })
    }
}

/// A client of the probe on one channel (calls multiplex over it).
#[derive(Clone)]
pub struct ProbeClient {
    inner: tonic::client::Grpc<tonic::transport::Channel>,
    interceptor: Option<ClientInterceptor>,
}

impl ProbeClient {
    /// A client of the probe at `url`, presenting `token` (none when `None`)
    /// with the mesh's [`ClientInterceptor`], which also sends the trace
    /// context.
    pub fn new(url: &str, token: Option<&str>) -> Self {
        let channel = grpc::channel(url).expect("a valid URL");
        Self {
            inner: tonic::client::Grpc::new(channel),
            interceptor: token
                .map(|t| ClientInterceptor::new(&Secret::new(t)).expect("an ASCII token")),
        }
    }

    /// Calls `Check` about `tenant`.
    pub async fn check(&mut self, tenant: &str) -> Result<TenantRef, Status> {
        let mut request = Request::new(());
        if let Some(interceptor) = &mut self.interceptor {
            request = tonic::service::Interceptor::call(interceptor, request)?;
        }
        let (metadata, extensions, ()) = request.into_parts();
        let request = Request::from_parts(
            metadata,
            extensions,
            TenantRef {
                tenant_id: tenant.to_owned(),
            },
        );
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<TenantRef, TenantRef>::default();
        let response = self
            .inner
            .unary(request, PathAndQuery::from_static(PATH), codec)
            .await?;
        Ok(response.into_inner())
    }
}
