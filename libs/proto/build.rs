//! Compiles `proto/` with protox (pure Rust, so no build needs protoc) and
//! generates prost messages plus tonic clients and servers. The encoded
//! descriptor set is written next to the generated code for gRPC reflection:
//! `compile_fds` consumes the set but does not write it.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "hibiki/common/v1/common.proto",
    "hibiki/contacts/v1/contacts.proto",
    "hibiki/scenario/v1/scenario.proto",
    "hibiki/delivery/v1/delivery.proto",
    "hibiki/analytics/v1/analytics.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.display());

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root])?;
    std::fs::write(out_dir.join("hibiki_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
