//! scenario: consumes the event log, matches tenants' scenario triggers, and runs their steps (tags, attributes, rich menu switches, messages, waits, branches) idempotently under (run, step), with durable timers in PostgreSQL.
#![forbid(unsafe_code)]

pub mod definition;

use hibiki_runtime::app::{Skeleton, SkeletonSpec};
use hibiki_runtime::{Needs, ServiceDefaults};

/// Name and default ports (gRPC 50053, metrics 9103).
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "scenario",
    grpc_port: 50053,
    metrics_port: 9103,
};

/// The service's migrations (`migrations/`), applied into its own schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What scenario is made of until its RPCs land.
pub struct Spec;

impl SkeletonSpec for Spec {
    const DEFAULTS: ServiceDefaults = DEFAULTS;
    const NEEDS: Needs = Needs {
        postgres: Some(("scenario", &MIGRATOR)),
        redis: true,
    };
}

/// The scenario service, built and ready to run: health, reflection and
/// metrics, reporting on its stores.
pub type Application = Skeleton<Spec>;
