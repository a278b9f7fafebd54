//! What the servers of batch RPCs share (contacts' `EditBatch`, delivery's
//! `SubmitBatch`): a batch holds 1 to `max` items, each is done as its own
//! RPC would do it, in a span named after that RPC and continuing the
//! item's trace, and each is answered with its result or a `BatchError`.

use std::future::Future;

use hibiki_proto::common::v1::{BatchError, TraceContext};
use tonic::Status;
use tracing::Instrument;

use crate::error::ServiceError;
use crate::telemetry;

/// INVALID_ARGUMENT for the whole batch unless it holds 1 to `max` items,
/// each with its request (`requests` names the kinds it may be).
pub fn check<T>(
    items: &[T],
    max: usize,
    has_request: impl Fn(&T) -> bool,
    requests: &str,
) -> Result<(), Status> {
    if items.is_empty() || items.len() > max {
        return Err(ServiceError::invalid(
            "items",
            format!("must hold 1 to {max} items, got {}", items.len()),
        )
        .into());
    }
    if let Some(k) = items.iter().position(|i| !has_request(i)) {
        return Err(ServiceError::invalid(
            format!("items[{k}].request"),
            format!("one of {requests} must be set"),
        )
        .into());
    }
    Ok(())
}

/// Does one item: `work` in a span named as the gRPC layer names `method`'s
/// own RPC (`/package.Service/Method`), a child of the item's `trace` when
/// it carries one (else of the batch call's span). An error is recorded on
/// the span as the RPC's status code would be.
pub async fn item<T>(
    service: &'static str,
    method: &'static str,
    trace: Option<&TraceContext>,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = method,
        rpc.system = "grpc",
        hibiki.service = service,
        hibiki.batch = true,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if let Some(trace) = trace.filter(|t| !t.traceparent.is_empty()) {
        telemetry::set_parent(&span, telemetry::context_from_payload(trace));
    }
    let answer = work.instrument(span.clone()).await;
    if let Err(status) = &answer {
        span.record("rpc.grpc.status_code", status.code() as i32);
    }
    answer
}

/// An item's error as its batch answers it.
pub fn error(status: &Status) -> BatchError {
    BatchError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_one_to_max_items_each_with_its_request() {
        let has = |i: &Option<u8>| i.is_some();
        assert!(check(&[Some(1), Some(2)], 2, has, "a or b").is_ok());
        let none = check::<Option<u8>>(&[], 2, has, "a or b").unwrap_err();
        assert_eq!(none.code(), tonic::Code::InvalidArgument);
        assert_eq!(none.message(), "items: must hold 1 to 2 items, got 0");
        let many = check(&[Some(1), Some(2), Some(3)], 2, has, "a or b").unwrap_err();
        assert_eq!(many.message(), "items: must hold 1 to 2 items, got 3");
        let empty = check(&[Some(1), None], 2, has, "a or b").unwrap_err();
        assert_eq!(
            empty.message(),
            "items[1].request: one of a or b must be set"
        );
    }
}
