//! The binary's command line: kube-apiserver's flags (both `--flag=value`
//! and `--flag value`; booleans as `--flag` or `--flag=false`), so that one
//! argument list starts either the real server or the double.
//!
//! Used: `--bind-address`, `--secure-port`, `--tls-cert-file`,
//! `--tls-private-key-file`, `--token-auth-file`, `--authorization-mode`,
//! `--anonymous-auth`, `--etcd-servers`, `--etcd-prefix`, `--etcd-cafile`,
//! `--etcd-certfile`, `--etcd-keyfile`, `--audit-log-path`, `--version`.
//! Accepted and ignored: the other flags a kube-apiserver command line
//! needs (service accounts, admission plugins, `--v`, ...). The double's
//! own: `--watch-history`, `--bookmark-interval`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::{auth, AuthorizationMode, Error, EtcdOptions, Options, Tls};

/// Go's `strconv.ParseBool`, as pflag parses booleans.
fn go_bool(s: &str) -> Result<bool, String> {
    crate::request::parse_bool(s).ok_or_else(|| format!("invalid boolean {s:?}"))
}

/// The flags.
#[derive(Debug, Parser)]
#[command(
    name = "kube-api-double",
    about = "A Kubernetes API server double for flannel-rs tests, started with kube-apiserver's flags.",
    disable_version_flag = true
)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long = "bind-address", default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Port to serve on (0: a free port, logged at start).
    #[arg(long = "secure-port", default_value_t = 6443)]
    pub secure_port: u16,
    /// Serving certificate (PEM). With --tls-private-key-file: HTTPS; with neither: plain HTTP.
    #[arg(long = "tls-cert-file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key of the serving certificate (PEM).
    #[arg(long = "tls-private-key-file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Static tokens: CSV lines token,user,uid[,"group1,group2"].
    #[arg(long = "token-auth-file")]
    pub token_auth_file: Option<PathBuf>,
    /// AlwaysAllow, AlwaysDeny, or a list containing RBAC (e.g. Node,RBAC).
    #[arg(long = "authorization-mode", default_value = "AlwaysAllow")]
    pub authorization_mode: String,
    /// Requests without a token are system:anonymous (true) or 401 (false).
    #[arg(long = "anonymous-auth", num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub anonymous_auth: bool,
    /// etcd client URLs (comma list): objects persist there. In memory when absent.
    #[arg(long = "etcd-servers", value_delimiter = ',')]
    pub etcd_servers: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long = "etcd-prefix", default_value = "/registry")]
    pub etcd_prefix: String,
    /// CA of etcd's server certificates.
    #[arg(long = "etcd-cafile")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long = "etcd-certfile")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long = "etcd-keyfile")]
    pub etcd_keyfile: Option<PathBuf>,
    /// Audit log (JSON lines, level Metadata).
    #[arg(long = "audit-log-path")]
    pub audit_log_path: Option<PathBuf>,
    /// Print the version and exit.
    #[arg(long = "version", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub version: Option<String>,

    /// Double only: watch events kept per resource for resuming watches.
    #[arg(long = "watch-history", default_value_t = 1000)]
    pub watch_history: usize,
    /// Double only: seconds between watch bookmarks (kube-apiserver: about a minute).
    #[arg(long = "bookmark-interval", default_value_t = 5.0)]
    pub bookmark_interval: f64,

    /// Accepted, ignored.
    #[arg(long = "advertise-address", action = ArgAction::Append)]
    pub advertise_address: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "service-cluster-ip-range", action = ArgAction::Append)]
    pub service_cluster_ip_range: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "service-account-issuer", action = ArgAction::Append)]
    pub service_account_issuer: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "service-account-key-file", action = ArgAction::Append)]
    pub service_account_key_file: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "service-account-signing-key-file", action = ArgAction::Append)]
    pub service_account_signing_key_file: Vec<String>,
    /// Accepted, ignored (the double logs every request at level Metadata).
    #[arg(long = "audit-policy-file", action = ArgAction::Append)]
    pub audit_policy_file: Vec<String>,
    /// Accepted, ignored (always json).
    #[arg(long = "audit-log-format", action = ArgAction::Append)]
    pub audit_log_format: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "audit-log-maxage", action = ArgAction::Append)]
    pub audit_log_maxage: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "allow-privileged", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Append)]
    pub allow_privileged: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "cert-dir", action = ArgAction::Append)]
    pub cert_dir: Vec<String>,
    /// Accepted, ignored (the double always runs NodeTaint and NamespaceLifecycle).
    #[arg(long = "enable-admission-plugins", action = ArgAction::Append)]
    pub enable_admission_plugins: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "disable-admission-plugins", action = ArgAction::Append)]
    pub disable_admission_plugins: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "enable-priority-and-fairness", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Append)]
    pub enable_priority_and_fairness: Vec<String>,
    /// Accepted, ignored (log verbosity).
    #[arg(short = 'v', long = "v", action = ArgAction::Append)]
    pub verbosity: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "api-audiences", action = ArgAction::Append)]
    pub api_audiences: Vec<String>,
    /// Accepted, ignored (no client-certificate authentication).
    #[arg(long = "client-ca-file", action = ArgAction::Append)]
    pub client_ca_file: Vec<String>,
    /// Accepted, ignored.
    #[arg(long = "storage-backend", action = ArgAction::Append)]
    pub storage_backend: Vec<String>,
    /// Accepted, ignored (objects are stored as JSON).
    #[arg(long = "storage-media-type", action = ArgAction::Append)]
    pub storage_media_type: Vec<String>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Options>),
    /// `--version`: print [`version_line`] and exit.
    Version,
}

/// `--version`'s output.
pub fn version_line() -> String {
    format!(
        "Kubernetes {} (flannel-rs kube-api-double)",
        crate::KUBE_VERSION
    )
}

impl Cli {
    /// Turns the flags into options (reads the token file).
    pub fn into_command(self) -> Result<Command, Error> {
        if let Some(v) = &self.version {
            if v != "false" {
                return Ok(Command::Version);
            }
        }
        let tls = match (self.tls_cert_file, self.tls_private_key_file) {
            (Some(cert), Some(key)) => Some(Tls::Files { cert, key }),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "--tls-cert-file and --tls-private-key-file must be given together".into(),
                ))
            }
        };
        let tokens = match &self.token_auth_file {
            Some(p) => auth::read_token_file(p)?,
            None => Vec::new(),
        };
        let authorization = AuthorizationMode::parse(&self.authorization_mode)
            .map_err(|e| Error::Config(format!("--authorization-mode: {e}")))?;
        let etcd_servers: Vec<String> = self
            .etcd_servers
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let etcd = (!etcd_servers.is_empty()).then(|| EtcdOptions {
            endpoints: etcd_servers,
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
        });
        if !(self.bookmark_interval > 0.0 && self.bookmark_interval.is_finite()) {
            return Err(Error::Config(
                "--bookmark-interval must be a positive number of seconds".into(),
            ));
        }
        Ok(Command::Run(Box::new(Options {
            bind_address: self.bind_address,
            port: self.secure_port,
            tls,
            tokens,
            authorization,
            anonymous_auth: self.anonymous_auth,
            etcd,
            audit_log_path: self.audit_log_path,
            watch_history: self.watch_history,
            bookmark_interval: Duration::from_secs_f64(self.bookmark_interval),
            ..Options::default()
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kube-api-double").chain(args.iter().copied()))
    }

    #[test]
    fn both_flag_forms_and_ignored_flags() {
        let cli = parse(&[
            "--bind-address=127.0.0.1",
            "--secure-port",
            "7443",
            "--authorization-mode=Node,RBAC",
            "--etcd-servers=http://127.0.0.1:2379,http://127.0.0.1:2380",
            "--allow-privileged=true",
            "--anonymous-auth=false",
            "--service-account-key-file=/a",
            "--service-account-key-file",
            "/b",
            "--enable-admission-plugins=NodeRestriction",
            "--v=2",
            "--storage-media-type=application/json",
        ])
        .unwrap();
        assert_eq!(cli.secure_port, 7443);
        assert!(!cli.anonymous_auth);
        let Command::Run(opts) = cli.into_command().unwrap() else {
            panic!("not a run");
        };
        assert_eq!(opts.authorization, AuthorizationMode::Rbac);
        assert_eq!(opts.etcd.unwrap().endpoints.len(), 2);
        assert!(opts.tls.is_none());
    }

    #[test]
    fn unknown_flags_and_version() {
        let e = parse(&["--no-such-flag=1"]).unwrap_err();
        assert!(e.to_string().contains("--no-such-flag"), "{e}");
        assert!(parse(&["positional"]).is_err());
        assert!(matches!(
            parse(&["--version"]).unwrap().into_command().unwrap(),
            Command::Version
        ));
        assert!(parse(&["--tls-cert-file=/x"])
            .unwrap()
            .into_command()
            .is_err());
        assert!(parse(&["--authorization-mode=Webhook"])
            .unwrap()
            .into_command()
            .is_err());
    }
}
