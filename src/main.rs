//! The staps daemon: everything is in the library; `run.rs` wires it.

fn main() -> std::process::ExitCode {
    staps::run()
}
