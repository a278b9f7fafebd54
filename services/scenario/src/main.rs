//! The hibiki-scenario binary: configuration from `HIBIKI_*` variables, then the
//! service until SIGTERM.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    hibiki_runtime::app::main::<hibiki_scenario::Application>()
}
