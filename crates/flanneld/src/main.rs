//! `flanneld`: parse flags, set up logging, run the daemon.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    flanneld::mem::limit_arenas();
    let flags = flanneld::flags::Flags::parse();
    // RUST_LOG, when set, wins over --log-level. kube-rs's request layer
    // logs every failed attempt at ERROR (each retry of the watch while the
    // API server is away); flanneld says so itself, once per outage.
    let level = if flags.log_level.contains("kube_client") {
        flags.log_level.clone()
    } else {
        format!("{},kube_client::client::builder=off", flags.log_level)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|e| {
            eprintln!(
                "flanneld: --log-level {:?} is invalid ({e}); using info",
                flags.log_level
            );
            EnvFilter::new("info")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never in journald or log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match flanneld::daemon::run(flags) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, on stderr like the log, whatever --log-level says.
            eprintln!("flanneld: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
