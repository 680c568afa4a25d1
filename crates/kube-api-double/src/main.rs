//! `kube-api-double`: a Kubernetes API server double started with
//! kube-apiserver's flags. Logs to stderr; SIGTERM or SIGINT stop it
//! (exit 0).

use clap::Parser;
use kube_api_double::cli::{version_line, Cli, Command};
use kube_api_double::Double;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let opts = match cli.into_command()? {
        Command::Version => {
            println!("{}", version_line());
            return Ok(());
        }
        Command::Run(opts) => *opts,
    };
    if opts.tls.is_none() {
        tracing::warn!(
            "no --tls-cert-file/--tls-private-key-file: serving plain HTTP (kube-apiserver would not)"
        );
    }
    let storage = match &opts.etcd {
        Some(e) => format!("etcd {} prefix {}", e.endpoints.join(","), e.prefix),
        None => "memory".to_string(),
    };
    let handle = Double::start(opts).await?;
    tracing::info!(url = %handle.url(), %storage, "kube-api-double serving on {}", handle.url());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    handle.shutdown();
    Ok(())
}
