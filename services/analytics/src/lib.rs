//! analytics: folds membership changes, delivery outcomes and inbound events into live counters and per-minute rollups, and pushes segment counts to watchers.
#![forbid(unsafe_code)]

use hibiki_runtime::app::{Skeleton, SkeletonSpec};
use hibiki_runtime::{Needs, ServiceDefaults};

/// Name and default ports (gRPC 50055, metrics 9105).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "analytics",
    grpc_port: 50055,
    metrics_port: 9105,
};

/// The service's migrations (`migrations/`), applied into its own schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What analytics is made of until its RPCs land.
pub struct Spec;

impl SkeletonSpec for Spec {
    const DEFAULTS: ServiceDefaults = DEFAULTS;
    const NEEDS: Needs = Needs {
        postgres: Some(("analytics", &MIGRATOR)),
        redis: true,
    };
}

/// The analytics service, built and ready to run: health, reflection and
/// metrics, reporting on its stores.
pub type Application = Skeleton<Spec>;
