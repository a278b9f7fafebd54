//! The hibiki-delivery binary: configuration from `HIBIKI_*` variables, then the
//! service until SIGTERM.
#![forbid(unsafe_code)]

/// mimalloc: far less time in allocation than glibc's malloc on the hot
/// paths (measured on the gateway, bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    hibiki_runtime::app::main::<hibiki_delivery::Application>()
}
