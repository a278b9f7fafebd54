//! delivery: every outbound call to the LINE Messaging API, through per-channel Redis queues with rate limits, coalescing, retries with backoff, and dead letters.
#![forbid(unsafe_code)]

use hibiki_runtime::app::{Skeleton, SkeletonSpec};
use hibiki_runtime::{Needs, ServiceDefaults};

/// Name and default ports (gRPC 50054, metrics 9104).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "delivery",
    grpc_port: 50054,
    metrics_port: 9104,
};

/// The service's migrations (`migrations/`), applied into its own schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What delivery is made of until its RPCs land.
pub struct Spec;

impl SkeletonSpec for Spec {
    const DEFAULTS: ServiceDefaults = DEFAULTS;
    const NEEDS: Needs = Needs {
        postgres: Some(("delivery", &MIGRATOR)),
        redis: true,
    };
}

/// The delivery service, built and ready to run: health, reflection and
/// metrics, reporting on its stores.
pub type Application = Skeleton<Spec>;
