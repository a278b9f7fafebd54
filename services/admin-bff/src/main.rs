//! The hibiki-admin-bff binary: configuration from `HIBIKI_*` variables,
//! then the dashboard until SIGTERM.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    hibiki_runtime::app::main::<hibiki_admin_bff::Application>()
}
