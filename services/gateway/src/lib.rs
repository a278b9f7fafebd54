//! gateway: the HTTP edge for LINE webhooks. It verifies each webhook's signature with the channel secret (kept in memory from contacts' WatchChannels), dedupes on webhookEventId, and appends every event to the Redis event log before answering 200.
#![forbid(unsafe_code)]

pub mod line;

use hibiki_runtime::app::{Skeleton, SkeletonSpec};
use hibiki_runtime::{Needs, ServiceDefaults};

/// Name and default ports (gRPC 50051, metrics 9101).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "gateway",
    grpc_port: 50051,
    metrics_port: 9101,
};

/// What gateway is made of until its RPCs land.
pub struct Spec;

impl SkeletonSpec for Spec {
    const DEFAULTS: ServiceDefaults = DEFAULTS;
    const NEEDS: Needs = Needs {
        postgres: None,
        redis: true,
    };
}

/// The gateway service, built and ready to run: health, reflection and
/// metrics, reporting on its stores.
pub type Application = Skeleton<Spec>;
