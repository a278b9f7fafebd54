//! hibiki's gRPC contracts as Rust: prost messages, tonic clients and servers
//! for every package under `proto/`, and the encoded descriptor set that
//! services register for gRPC reflection.
#![forbid(unsafe_code)]
// Generated code: its doc comments come from the .proto files.
#![allow(clippy::all, clippy::pedantic)]

/// The encoded `FileDescriptorSet` of every hibiki contract, for
/// `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hibiki_descriptor.bin"));

/// `hibiki.common.v1`: references, pagination, trace context, inbound events.
pub mod common {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/hibiki.common.v1.rs"));
    }
}

/// `hibiki.contacts.v1`: tenants, channels, contacts, segments, import.
pub mod contacts {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/hibiki.contacts.v1.rs"));
    }
}

/// `hibiki.scenario.v1`: scenario definitions, versions, runs.
pub mod scenario {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/hibiki.scenario.v1.rs"));
    }
}

/// `hibiki.delivery.v1`: outbound LINE calls, jobs, dead letters.
pub mod delivery {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/hibiki.delivery.v1.rs"));
    }
}

/// `hibiki.analytics.v1`: live counts, rates, funnels.
pub mod analytics {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/hibiki.analytics.v1.rs"));
    }
}
