//! The `kube-api-double` binary with a kube-apiserver command line: it
//! serves HTTPS with the given certificate and tokens, writes the audit
//! log, refuses unknown flags, prints its version, and stops on SIGTERM
//! with exit status 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, PostParams};

const BIN: &str = env!("CARGO_BIN_EXE_kube-api-double");

/// Kills the double (by its PID) if the test fails before it is stopped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn version_and_unknown_flags() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Kubernetes v1.36.2 (flannel-rs kube-api-double)"
    );
    let out = Command::new(BIN)
        .arg("--oidc-issuer-url=https://x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--oidc-issuer-url"));
    let out = Command::new(BIN)
        .args(["--tls-cert-file", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-private-key-file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_a_kube_apiserver_command_line() {
    let dir = flannel_store::testsupport::TestDir::new("kube-double-bin");
    let pki = Pki::new();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert = write("apiserver.crt", &pki.cert_pem);
    let key = write("apiserver.key", &pki.key_pem);
    let tokens = write(
        "tokens.csv",
        &format!("{ADMIN},admin,uid-admin,\"system:masters\"\n{FLANNEL},{FLANNEL_USER},uid-flannel,\"system:serviceaccounts,system:serviceaccounts:kube-flannel\"\n"),
    );
    let audit = dir.path().join("audit.log");
    let child = Command::new(BIN)
        .args([
            "--advertise-address=127.0.0.1",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--allow-privileged=true",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--service-cluster-ip-range=10.96.0.0/12",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-account-key-file=/dev/null",
            "--service-account-signing-key-file=/dev/null",
            "--audit-policy-file=/dev/null",
            "--audit-log-format=json",
            "--v=2",
        ])
        .arg(format!("--tls-cert-file={}", cert.display()))
        .arg("--tls-private-key-file")
        .arg(&key)
        .arg(format!("--token-auth-file={}", tokens.display()))
        .arg(format!("--audit-log-path={}", audit.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("serving on https://") {
                let url = line[i + "serving on ".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string();
                let _ = tx.send(url);
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the double logs its URL");

    let admin = kube_client(&url, &pki.ca_pem, ADMIN).await;
    let nodes: Api<Node> = Api::all(admin);
    let n: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "k8s-node1"}})).unwrap();
    nodes.create(&PostParams::default(), &n).await.unwrap();
    assert_eq!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let flannel: Api<Node> = Api::all(kube_client(&url, &pki.ca_pem, FLANNEL).await);
    let err = flannel.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403),
        "{err:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log
        .lines()
        .any(|l| l.contains("\"verb\":\"create\"") && l.contains("\"resource\":\"nodes\"")));
}
