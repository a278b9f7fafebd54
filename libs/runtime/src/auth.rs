//! Bearer-token authentication of every RPC.
//!
//! - Service tokens (`HIBIKI_SERVICE_TOKENS`) are the mesh's own services
//!   calling each other: they may act on any tenant.
//! - Operator tokens (`HIBIKI_OPERATOR_TOKENS`) are scoped to one tenant: a
//!   call about another tenant gets PERMISSION_DENIED.
//! - No token, a malformed header or an unknown token gets UNAUTHENTICATED.
//! - Health and reflection stay open, so probes and `grpcurl` work without a
//!   token.
//!
//! The [`AuthLayer`] runs for every request before it reaches a service and
//! stores the [`Caller`] in the request's extensions; a handler then checks
//! the tenant the request is about with [`Caller::authorize_tenant`], since
//! only the handler knows which field names the tenant. Tokens are compared
//! in constant time and never logged.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::config::{AuthConfig, Secret};

/// gRPC paths that need no token (and answer while a service starts).
pub(crate) const OPEN_PATHS: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// One of the mesh's own services.
    Service,
    /// An operator acting on one tenant.
    Operator {
        /// The only tenant this caller may act on.
        tenant_id: String,
    },
    /// A call to an open path (health, reflection); never reaches a hibiki
    /// service.
    Anonymous,
}

impl Caller {
    /// The caller stored by [`AuthLayer`] in a request's extensions.
    /// UNAUTHENTICATED when absent (a server built without the layer).
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))
    }

    /// OK when the caller may act on `tenant_id`; PERMISSION_DENIED otherwise.
    pub fn authorize_tenant(&self, tenant_id: &str) -> Result<(), Status> {
        match self {
            Caller::Service => Ok(()),
            Caller::Operator { tenant_id: own } if own == tenant_id => Ok(()),
            Caller::Operator { .. } => Err(Status::permission_denied(format!(
                "tenant_id: this token may not act on tenant {tenant_id:?}"
            ))),
            Caller::Anonymous => Err(Status::unauthenticated("missing bearer token")),
        }
    }

    /// OK when the request's caller may act on `tenant_id`, which must be
    /// set (INVALID_ARGUMENT otherwise).
    pub fn authorize_request<T>(
        request: &tonic::Request<T>,
        tenant_id: &str,
    ) -> Result<(), Status> {
        if tenant_id.is_empty() {
            return Err(Status::invalid_argument("tenant_id: must not be empty"));
        }
        Caller::of(request)?.authorize_tenant(tenant_id)
    }

    /// OK for service tokens only (calls that return credentials or span
    /// tenants); PERMISSION_DENIED for operators.
    pub fn require_service(&self) -> Result<(), Status> {
        match self {
            Caller::Service => Ok(()),
            Caller::Operator { .. } => Err(Status::permission_denied(
                "this call is reserved to hibiki's own services",
            )),
            Caller::Anonymous => Err(Status::unauthenticated("missing bearer token")),
        }
    }
}

/// Checks bearer tokens against the configured ones.
#[derive(Clone)]
pub struct Authenticator {
    service_tokens: Arc<Vec<Secret>>,
    operator_tokens: Arc<Vec<(String, Secret)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("service_tokens", &self.service_tokens.len())
            .field("operator_tokens", &self.operator_tokens.len())
            .finish()
    }
}

/// Constant-time equality of a presented token with a configured one. A
/// length mismatch returns early: it reveals the length, not the content.
fn token_eq(presented: &[u8], configured: &Secret) -> bool {
    presented.ct_eq(configured.expose().as_bytes()).into()
}

impl Authenticator {
    /// An authenticator for the configured tokens.
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            service_tokens: Arc::new(config.service_tokens.clone()),
            operator_tokens: Arc::new(config.operator_tokens.clone()),
        }
    }

    /// Who holds `token`. Every configured token is compared, so the time
    /// taken does not tell which one (if any) matched.
    pub fn identify(&self, token: &str) -> Option<Caller> {
        let presented = token.as_bytes();
        let mut found = None;
        for t in self.service_tokens.iter() {
            if token_eq(presented, t) {
                found = Some(Caller::Service);
            }
        }
        for (tenant, t) in self.operator_tokens.iter() {
            if token_eq(presented, t) && found.is_none() {
                found = Some(Caller::Operator {
                    tenant_id: tenant.clone(),
                });
            }
        }
        found
    }

    /// Authenticates a request by its `authorization` header.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Caller, Status> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer <token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("malformed authorization header: expected `Bearer <token>`")
            })?;
        self.identify(token)
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))
    }
}

/// Tower layer that authenticates every request except open paths.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
}

impl AuthLayer {
    /// A layer checking against `authenticator`.
    pub fn new(authenticator: Authenticator) -> Self {
        Self { authenticator }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// The service [`AuthLayer`] produces.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Authenticator,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if OPEN_PATHS.iter().any(|p| path.starts_with(p)) {
            request.extensions_mut().insert(Caller::Anonymous);
            return Either::Right(self.inner.call(request));
        }
        match self.authenticator.authenticate(request.headers()) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(status) => {
                metrics::counter!("hibiki_grpc_auth_rejected_total").increment(1);
                tracing::debug!(
                    path,
                    reason = status.message(),
                    "rpc rejected: not authenticated"
                );
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        Authenticator::new(&AuthConfig {
            service_tokens: vec![Secret::new("service-token-0123456789")],
            operator_tokens: vec![("acme".into(), Secret::new("acme-token-0123456789"))],
        })
    }

    fn headers(value: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(v) = value {
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_call_without_a_token_is_unauthenticated() {
        let err = authenticator().authenticate(&headers(None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn an_unknown_or_malformed_token_is_unauthenticated() {
        for h in [
            "Bearer nope-nope-nope-nope",
            "Basic abc",
            "Bearer ",
            "acme-token-0123456789",
        ] {
            let err = authenticator().authenticate(&headers(Some(h))).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{h}");
            assert!(!err.message().contains("0123456789"), "token echoed: {err}");
        }
    }

    #[test]
    fn a_service_token_may_act_on_any_tenant() {
        let caller = authenticator()
            .authenticate(&headers(Some("Bearer service-token-0123456789")))
            .unwrap();
        assert_eq!(caller, Caller::Service);
        assert!(caller.authorize_tenant("acme").is_ok());
        assert!(caller.authorize_tenant("globex").is_ok());
        assert!(caller.require_service().is_ok());
    }

    #[test]
    fn an_operator_token_acts_only_on_its_tenant() {
        let caller = authenticator()
            .authenticate(&headers(Some("Bearer acme-token-0123456789")))
            .unwrap();
        assert!(caller.authorize_tenant("acme").is_ok());
        let err = caller.authorize_tenant("globex").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            caller.require_service().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn the_authenticator_does_not_print_tokens() {
        let printed = format!("{:?}", authenticator());
        assert!(!printed.contains("0123456789"), "{printed}");
    }
}
