//! The lab's Kubernetes API (`lab up --store kube`): the lab's etcd and a
//! kube-apiserver inside the master's namespace, listening on the master's
//! underlay address (`https://172.16.1.8:6443`) where every node's flanneld
//! reaches it with a kubeconfig, as in a kubeadm cluster.
//!
//! The lab plays kubeadm and kube-controller-manager: it makes the CA and
//! serving certificate, the service-account key, a static token file (an
//! admin in `system:masters`, and flanneld's user
//! `system:serviceaccount:kube-flannel:flannel`), upstream's ClusterRole
//! `flannel` and its binding, and one Node object per node with its podCIDR.
//! Everything lives in `<labdir>/kube/`.
//!
//! Which binary runs is never guessed: `--kube-apiserver PATH`, else
//! `$KUBE_APISERVER`, else `kube-apiserver` in `PATH`. Each gets the same
//! command line; the tests point `--kube-apiserver` at flannel-rs's
//! Kubernetes API double (crate `kube-api-double`) when no real
//! kube-apiserver is available, and at the real one when `KUBE_APISERVER`
//! names it.
//!
//! As with etcd, the root namespace cannot reach the master's address: every
//! request of flannelctl runs on a thread inside the master's namespace.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rand::RngCore;

use super::{io_err, ns_err, procs, write_atomic, LabError, Result};

/// The environment variable naming a kube-apiserver binary.
pub const KUBE_APISERVER_ENV: &str = "KUBE_APISERVER";
/// The binary looked up in `PATH`.
pub const KUBE_APISERVER_BINARY: &str = "kube-apiserver";
/// kube-apiserver's secure port, as kubeadm sets it.
pub const KUBE_API_PORT: u16 = 6443;
/// Services' range (must not overlap the pod network).
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/12";
/// flanneld's user: kube-flannel.yml's ServiceAccount.
pub const FLANNEL_USER: &str = "system:serviceaccount:kube-flannel:flannel";
/// The groups a service account's token carries.
pub const FLANNEL_GROUPS: &str = "system:serviceaccounts,system:serviceaccounts:kube-flannel";
/// flannelctl's own user (creates Nodes, RBAC): a cluster admin.
pub const ADMIN_USER: &str = "flannel-lab-admin";
/// The annotation a kubelet puts on every Node it registers (upstream
/// v0.20.2 panics on a Node without any annotation).
pub const KUBELET_ANNOTATION: (&str, &str) = (
    "volumes.kubernetes.io/controller-managed-attach-detach",
    "true",
);

/// `<labdir>/kube`.
pub(crate) const KUBE_DIR: &str = "kube";
const PID_FILE: &str = "kube-apiserver.pid";
const LOG_FILE: &str = "kube-apiserver.log";
/// Audit log of flanneld's requests (Metadata level): the tests count them.
pub const AUDIT_LOG_FILE: &str = "audit.log";
const AUDIT_POLICY_FILE: &str = "audit-policy.yaml";
const TOKENS_FILE: &str = "tokens.csv";
const CA_FILE: &str = "ca.crt";
const CERT_FILE: &str = "apiserver.crt";
const KEY_FILE: &str = "apiserver.key";
const SA_KEY_FILE: &str = "sa.key";
const SA_PUB_FILE: &str = "sa.pub";
/// The kubeconfig every flanneld of the lab is given.
pub const FLANNEL_KUBECONFIG: &str = "flannel.kubeconfig";
/// The admin's kubeconfig (for `kubectl --kubeconfig`, and flannelctl).
pub const ADMIN_KUBECONFIG: &str = "admin.kubeconfig";

/// The kube-apiserver binary: `explicit`, else `$KUBE_APISERVER`, else
/// `kube-apiserver` in `PATH`; an error saying where it looked.
pub fn apiserver_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let found = |p: PathBuf, origin: String| {
        if p.is_file() {
            Ok(p)
        } else {
            Err(LabError::KubeApiserverMissing {
                looked: format!("{origin} = {} (not a file)", p.display()),
            })
        }
    };
    if let Some(p) = explicit {
        return found(p.to_path_buf(), "--kube-apiserver".into());
    }
    if let Some(p) = std::env::var_os(KUBE_APISERVER_ENV).filter(|p| !p.is_empty()) {
        return found(PathBuf::from(p), format!("${KUBE_APISERVER_ENV}"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(KUBE_APISERVER_BINARY))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::KubeApiserverMissing {
            looked: format!(
                "${KUBE_APISERVER_ENV} is not set and there is no {KUBE_APISERVER_BINARY} in PATH ({})",
                path.to_string_lossy()
            ),
        })
}

/// The URL every flanneld of the lab is given.
pub fn api_url(master: Ipv4Addr) -> String {
    format!("https://{master}:{KUBE_API_PORT}")
}

/// The files of the lab's Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubeDir {
    pub dir: PathBuf,
}

impl KubeDir {
    pub fn new(lab_dir: &Path) -> KubeDir {
        KubeDir {
            dir: lab_dir.join(KUBE_DIR),
        }
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
    /// The flanneld kubeconfig (`--kubeconfig-file`).
    pub fn flannel_kubeconfig(&self) -> PathBuf {
        self.path(FLANNEL_KUBECONFIG)
    }
    /// The admin's kubeconfig.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.path(ADMIN_KUBECONFIG)
    }
    /// The audit log (flanneld's requests).
    pub fn audit_log(&self) -> PathBuf {
        self.path(AUDIT_LOG_FILE)
    }
    /// The API server's log.
    pub fn log(&self) -> PathBuf {
        self.path(LOG_FILE)
    }
    /// The API server's pid.
    pub fn pid(&self) -> Option<u32> {
        procs::read_pid(&self.path(PID_FILE))
    }
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> LabError + '_ {
    move |e| LabError::Kube {
        detail: format!("making the {what}: {e}"),
    }
}

/// Writes `data` with mode 0600 (keys and tokens).
fn write_secret(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    write_atomic(path, data)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod 600 {}", path.display())))
}

/// What kubeadm would make: a CA, the API server's certificate for the
/// master's address, the service-account key, the token file, an audit
/// policy (flanneld's requests at Metadata level) and two kubeconfigs.
pub(crate) fn prepare(kd: &KubeDir, master: Ipv4Addr) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(&kd.dir).map_err(io_err(format!("creating {}", kd.dir.display())))?;
    let ca_key = KeyPair::generate().map_err(cert_err("CA key"))?;
    let mut ca = CertificateParams::new(Vec::new()).map_err(cert_err("CA"))?;
    ca.distinguished_name
        .push(DnType::CommonName, "flannel-lab-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_err("CA"))?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(cert_err("API server key"))?;
    let mut server = CertificateParams::new(vec![
        master.to_string(),
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "10.96.0.1".to_string(),
    ])
    .map_err(cert_err("API server certificate"))?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server
        .signed_by(&key, &issuer)
        .map_err(cert_err("API server certificate"))?;
    let sa = KeyPair::generate().map_err(cert_err("service-account key"))?;
    write_atomic(&kd.path(CA_FILE), ca_cert.pem().as_bytes())?;
    write_atomic(&kd.path(CERT_FILE), server_cert.pem().as_bytes())?;
    write_secret(&kd.path(KEY_FILE), key.serialize_pem().as_bytes())?;
    write_secret(&kd.path(SA_KEY_FILE), sa.serialize_pem().as_bytes())?;
    write_atomic(&kd.path(SA_PUB_FILE), sa.public_key_pem().as_bytes())?;

    let (admin, flannel) = (random_token(), random_token());
    write_secret(
        &kd.path(TOKENS_FILE),
        format!(
            "{admin},{ADMIN_USER},uid-{ADMIN_USER},\"system:masters\"\n{flannel},{FLANNEL_USER},uid-flannel,\"{FLANNEL_GROUPS}\"\n"
        )
        .as_bytes(),
    )?;
    // Only flanneld's requests, without the RequestReceived stage: one
    // line per request (two for a watch: started, complete).
    write_atomic(
        &kd.path(AUDIT_POLICY_FILE),
        format!(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\nrules:\n- level: Metadata\n  users: [\"{FLANNEL_USER}\"]\n- level: None\n"
        )
        .as_bytes(),
    )?;
    let ca_path = kd.path(CA_FILE);
    for (file, user, token) in [
        (FLANNEL_KUBECONFIG, "flannel", &flannel),
        (ADMIN_KUBECONFIG, "admin", &admin),
    ] {
        write_secret(
            &kd.path(file),
            kubeconfig(&api_url(master), &ca_path, user, token).as_bytes(),
        )?;
    }
    Ok(())
}

/// A kubeconfig for `server` with a bearer token.
fn kubeconfig(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {user}@lab\n  context:\n    cluster: lab\n    user: {user}\ncurrent-context: {user}@lab\n",
        ca = ca.display()
    )
}

/// kube-apiserver's command line, the same for the real server and for the
/// double: serving on the master's address, RBAC, the static tokens, the
/// lab's etcd, the audit log.
pub(crate) fn apiserver_args(kd: &KubeDir, master: Ipv4Addr, etcd_url: &str) -> Vec<OsString> {
    let p = |f: &str| kd.path(f).into_os_string();
    let mut a: Vec<OsString> = Vec::new();
    // `--flag VALUE`, two words: the lab recognises its processes by an
    // argument that is a path inside its directory.
    let mut flag = |name: &str, value: OsString| {
        a.push(format!("--{name}").into());
        a.push(value);
    };
    flag("bind-address", "0.0.0.0".into());
    flag("advertise-address", master.to_string().into());
    flag("secure-port", KUBE_API_PORT.to_string().into());
    flag("etcd-servers", etcd_url.into());
    flag("tls-cert-file", p(CERT_FILE));
    flag("tls-private-key-file", p(KEY_FILE));
    flag("token-auth-file", p(TOKENS_FILE));
    flag("authorization-mode", "RBAC".into());
    flag("service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE.into());
    flag(
        "service-account-issuer",
        "https://kubernetes.default.svc.cluster.local".into(),
    );
    flag("service-account-key-file", p(SA_PUB_FILE));
    flag("service-account-signing-key-file", p(SA_KEY_FILE));
    flag("audit-policy-file", p(AUDIT_POLICY_FILE));
    flag("audit-log-path", p(AUDIT_LOG_FILE));
    flag("audit-log-format", "json".into());
    flag("cert-dir", kd.dir.clone().into_os_string());
    a
}

/// Starts the API server inside `ns` (detached, log and pid in the kube
/// directory); returns its pid.
pub(crate) fn spawn(
    ns: &NetNs,
    kd: &KubeDir,
    binary: &Path,
    master: Ipv4Addr,
    etcd_url: &str,
) -> Result<u32> {
    let (out, err) = procs::log_output(&kd.log())?;
    let mut cmd = Command::new(binary);
    cmd.args(apiserver_args(kd, master, etcd_url))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    procs::detach(&mut cmd);
    let child = ns
        .run(move || {
            cmd.spawn()
                .map_err(io_err(format!("starting {}", binary.display())))
        })
        .map_err(ns_err(format!(
            "entering {} to start the API server",
            ns.name
        )))??;
    let pid = child.id();
    procs::adopt(child);
    write_atomic(&kd.path(PID_FILE), format!("{pid}\n").as_bytes())?;
    Ok(pid)
}

/// The file name of the API server's binary (to recognise its process).
fn binary_name(binary: &Path) -> String {
    binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| KUBE_APISERVER_BINARY.to_string())
}

/// Whether `pid` is this lab's API server.
pub(crate) fn is_lab_apiserver(pid: u32, lab_dir: &Path, binary: &Path) -> bool {
    procs::is_lab_process(pid, lab_dir, &binary_name(binary))
}

/// Stops this lab's API server (SIGTERM, SIGKILL after `timeout`) after
/// checking its command line; returns whether it was running.
pub(crate) fn stop(pid: u32, lab_dir: &Path, binary: &Path, timeout: Duration) -> Result<bool> {
    procs::stop_process(pid, lab_dir, &binary_name(binary), timeout)
}

/// The admin's client, from a thread inside `ns`, on a current-thread
/// runtime there; requests time out quickly so that a stopped API server
/// fails a lab operation instead of hanging it.
pub(crate) fn with_admin<T, F, Fut>(ns: &NetNs, kd: &KubeDir, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(kube::Client) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    let kubeconfig = kd.admin_kubeconfig();
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err("starting a runtime for the Kubernetes API"))?;
        rt.block_on(async move {
            let kc =
                kube::config::Kubeconfig::read_from(&kubeconfig).map_err(|e| LabError::Kube {
                    detail: format!("{}: {e}", kubeconfig.display()),
                })?;
            let mut config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| LabError::Kube {
                detail: format!("{}: {e}", kubeconfig.display()),
            })?;
            config.connect_timeout = Some(Duration::from_secs(2));
            config.read_timeout = Some(Duration::from_secs(20));
            let client = kube::Client::try_from(config).map_err(|e| LabError::Kube {
                detail: format!("creating a client: {e}"),
            })?;
            f(client).await
        })
    })
    .map_err(ns_err(format!(
        "entering {} to reach the API server",
        ns.name
    )))?
}

/// An API error as a lab error.
pub(crate) fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> LabError {
    let what = what.into();
    move |e| LabError::Kube {
        detail: format!("{what}: {e}"),
    }
}

/// Waits until the API server answers `/readyz` with `ok`.
pub(crate) fn wait_ready(
    ns: &NetNs,
    kd: &KubeDir,
    pid: u32,
    lab_dir: &Path,
    binary: &Path,
    deadline: Instant,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let r = with_admin(ns, kd, |c| async move {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request");
            c.request_text(req).await.map_err(api_err("GET /readyz"))
        });
        match r {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            other => {
                if !is_lab_apiserver(pid, lab_dir, binary) {
                    return Err(LabError::KubeApiserverDied {
                        pid,
                        log: kd.log().display().to_string(),
                        tail: procs::tail(&kd.log(), 20),
                    });
                }
                if Instant::now() >= deadline {
                    let why = match other {
                        Ok(body) => format!("/readyz said {body:?}"),
                        Err(e) => e.to_string(),
                    };
                    return Err(LabError::Timeout {
                        what: format!("the API server (pid {pid}) to be ready: {why}"),
                        secs: start.elapsed().as_secs_f64(),
                    });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// kube-flannel.yml's ClusterRole `flannel` (pods get; nodes get, list,
/// watch; nodes/status patch) and its binding to the ServiceAccount
/// `kube-flannel/flannel`: flanneld runs with exactly upstream's rights.
pub fn flannel_rbac() -> (ClusterRole, ClusterRoleBinding) {
    let rule = |resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec![resource.to_string()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    let meta = || ObjectMeta {
        name: Some("flannel".to_string()),
        labels: Some(BTreeMap::from([(
            "k8s-app".to_string(),
            "flannel".to_string(),
        )])),
        ..ObjectMeta::default()
    };
    let role = ClusterRole {
        metadata: meta(),
        rules: Some(vec![
            rule("pods", &["get"]),
            rule("nodes", &["get", "list", "watch"]),
            rule("nodes/status", &["patch"]),
        ]),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta(),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_string()),
            kind: "ClusterRole".to_string(),
            name: "flannel".to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name: "flannel".to_string(),
            namespace: Some("kube-flannel".to_string()),
            ..Subject::default()
        }]),
    };
    (role, binding)
}

/// Creates `obj` unless it exists.
async fn create_once<K>(api: &Api<K>, obj: &K, what: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(api_err(format!("creating {what}"))(e)),
    }
}

/// Creates the RBAC objects flanneld needs.
pub(crate) fn bootstrap(ns: &NetNs, kd: &KubeDir) -> Result<()> {
    with_admin(ns, kd, |c| async move {
        let (role, binding) = flannel_rbac();
        create_once(&Api::all(c.clone()), &role, "ClusterRole flannel").await?;
        create_once(&Api::all(c), &binding, "ClusterRoleBinding flannel").await
    })
}

/// A Node as a kubelet registers it and kube-controller-manager assigns
/// its podCIDR(s) (`pod_cidrs` empty: not assigned yet): the kubelet's
/// annotation, hostname and os labels, InternalIP and Hostname addresses.
pub fn node_object(name: &str, pod_cidrs: &[String], internal_ips: &[IpAddr]) -> Node {
    let mut addresses: Vec<NodeAddress> = internal_ips
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP".to_string(),
            address: ip.to_string(),
        })
        .collect();
    addresses.push(NodeAddress {
        type_: "Hostname".to_string(),
        address: name.to_string(),
    });
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), name.to_string()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
            ])),
            annotations: Some(BTreeMap::from([(
                KUBELET_ANNOTATION.0.to_string(),
                KUBELET_ANNOTATION.1.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().cloned(),
            pod_cidrs: (!pod_cidrs.is_empty()).then(|| pod_cidrs.to_vec()),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(addresses),
            ..NodeStatus::default()
        }),
    }
}

/// Creates Nodes (a Node that exists already is left as it is).
pub(crate) fn create_nodes(ns: &NetNs, kd: &KubeDir, nodes: Vec<Node>) -> Result<()> {
    with_admin(ns, kd, |c| async move {
        let api: Api<Node> = Api::all(c);
        // A few requests in flight: thousands of Nodes take seconds.
        let results = futures::stream::iter(nodes.into_iter().map(|n| {
            let api = api.clone();
            async move {
                let name = n.metadata.name.clone().unwrap_or_default();
                create_once(&api, &n, &format!("Node {name}")).await
            }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        results.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
    })
}

/// Deletes a Node (absent is success).
pub(crate) fn delete_node(ns: &NetNs, kd: &KubeDir, name: &str) -> Result<()> {
    let name = name.to_string();
    with_admin(ns, kd, |c| async move {
        match Api::<Node>::all(c)
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_err(format!("deleting Node {name}"))(e)),
        }
    })
}

/// Reads a Node.
pub(crate) fn get_node(ns: &NetNs, kd: &KubeDir, name: &str) -> Result<Option<Node>> {
    let name = name.to_string();
    with_admin(ns, kd, |c| async move {
        Api::<Node>::all(c)
            .get_opt(&name)
            .await
            .map_err(api_err(format!("reading Node {name}")))
    })
}

/// Every Node.
pub(crate) fn list_nodes(ns: &NetNs, kd: &KubeDir) -> Result<Vec<Node>> {
    with_admin(ns, kd, |c| async move {
        Ok(Api::<Node>::all(c)
            .list(&Default::default())
            .await
            .map_err(api_err("listing Nodes"))?
            .items)
    })
}

/// A strategic-merge patch of a Node (`status`: of its status subresource).
pub(crate) fn patch_node(
    ns: &NetNs,
    kd: &KubeDir,
    name: &str,
    patch: serde_json::Value,
    status: bool,
) -> Result<Node> {
    let name = name.to_string();
    with_admin(ns, kd, |c| async move {
        let api = Api::<Node>::all(c);
        let pp = PatchParams::default();
        let p = Patch::Strategic(&patch);
        let r = if status {
            api.patch_status(&name, &pp, &p).await
        } else {
            api.patch(&name, &pp, &p).await
        };
        r.map_err(api_err(format!("patching Node {name}")))
    })
}

use futures::StreamExt as _;

/// `lab down`'s part: stops the lab's API server by its pid file, then any
/// process still serving this lab's certificate, collecting errors.
pub(crate) fn stop_servers(name: &str, lab_dir: &Path, errors: &mut Vec<String>) {
    let kd = KubeDir::new(lab_dir);
    let cert = kd.path(CERT_FILE);
    let serves_ours = |pid: u32| {
        procs::cmdline(pid).and_then(|args| {
            let ours = args
                .windows(2)
                .any(|w| w[0] == "--tls-cert-file" && Path::new(&w[1]) == cert);
            ours.then(|| PathBuf::from(&args[0]))
        })
    };
    let mut pids: Vec<u32> = kd.pid().into_iter().collect();
    pids.extend(procs::lab_processes(name));
    pids.dedup();
    for pid in pids {
        if let Some(binary) = serves_ours(pid) {
            if let Err(e) = stop(pid, lab_dir, &binary, Duration::from_secs(10)) {
                errors.push(e.to_string());
            }
        }
    }
}

/// The Kubernetes side of a lab with `--store kube`.
impl super::Lab {
    /// `<labdir>/kube`.
    pub fn kube_dir(&self) -> KubeDir {
        KubeDir::new(&self.dir())
    }

    /// The kube-apiserver binary this lab runs.
    pub fn kube_binary(&self) -> Result<PathBuf> {
        self.state
            .kube_apiserver
            .clone()
            .ok_or_else(|| LabError::InvalidOption {
                option: "--store",
                reason: format!(
                    "lab {} uses the {} store, which has no Kubernetes API",
                    self.name(),
                    self.state.store
                ),
            })
    }

    /// Starts the API server (etcd must run) and waits until it is ready.
    pub(crate) fn start_apiserver_until(&self, deadline: Instant) -> Result<u32> {
        let binary = self.kube_binary()?;
        let kd = self.kube_dir();
        if let Some(pid) = kd
            .pid()
            .filter(|p| is_lab_apiserver(*p, &self.dir(), &binary))
        {
            return Err(LabError::InvalidOption {
                option: "start_store",
                reason: format!("the lab's API server is already running (pid {pid})"),
            });
        }
        let master = self.master()?.clone();
        let ns = self.master_netns()?;
        let pid = spawn(
            &ns,
            &kd,
            &binary,
            master.underlay_ip,
            &super::etcd::client_url(master.underlay_ip),
        )?;
        wait_ready(&ns, &kd, pid, &self.dir(), &binary, deadline)?;
        Ok(pid)
    }

    /// Stops the API server (an outage: etcd and the Nodes stay).
    pub(crate) fn stop_apiserver(&self) -> Result<bool> {
        let binary = self.kube_binary()?;
        match self.kube_dir().pid() {
            Some(pid) => stop(pid, &self.dir(), &binary, Duration::from_secs(10)),
            None => Ok(false),
        }
    }

    /// Whether the lab's API server runs.
    pub fn apiserver_alive(&self) -> bool {
        match (self.kube_binary(), self.kube_dir().pid()) {
            (Ok(b), Some(pid)) => is_lab_apiserver(pid, &self.dir(), &b),
            _ => false,
        }
    }

    /// Runs `f` with the admin's client, inside the master's namespace.
    pub fn with_kube<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(kube::Client) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        with_admin(&self.master_netns()?, &self.kube_dir(), f)
    }

    /// Registers `n`'s Node as a kubelet would, with its podCIDR(s) when
    /// `pod_cidr` (as kube-controller-manager assigns them), else without.
    pub fn kube_register_node(&self, n: &super::NodeState, pod_cidr: bool) -> Result<()> {
        let mut ips: Vec<IpAddr> = Vec::new();
        if self.state.family.has_v4() {
            ips.push(n.underlay_ip.into());
        }
        if let Some(v6) = n.underlay_ipv6.filter(|_| self.state.family.has_v6()) {
            ips.push(v6.into());
        }
        let cidrs = if pod_cidr {
            self.pod_cidrs(n)
        } else {
            Vec::new()
        };
        create_nodes(
            &self.master_netns()?,
            &self.kube_dir(),
            vec![node_object(&n.name, &cidrs, &ips)],
        )
    }

    /// The podCIDR(s) the lab assigns to `n`: its planned subnets.
    pub fn pod_cidrs(&self, n: &super::NodeState) -> Vec<String> {
        let key = self.state.lease_key(n);
        key.ipv4
            .map(|v| v.to_string())
            .into_iter()
            .chain(key.ipv6.map(|v| v.to_string()))
            .collect()
    }

    /// Assigns `node`'s podCIDR(s) now (kube-controller-manager's late
    /// allocation).
    pub fn kube_assign_pod_cidr(&self, node: &str) -> Result<()> {
        let n = self.node(node)?;
        let cidrs = self.pod_cidrs(n);
        let patch = serde_json::json!({
            "spec": { "podCIDR": cidrs.first(), "podCIDRs": cidrs }
        });
        patch_node(&self.master_netns()?, &self.kube_dir(), node, patch, false).map(|_| ())
    }

    /// Creates Nodes (e.g. thousands of peers for a scale test).
    pub fn kube_create_nodes(&self, nodes: Vec<Node>) -> Result<()> {
        create_nodes(&self.master_netns()?, &self.kube_dir(), nodes)
    }

    /// A Node, if it exists.
    pub fn kube_node(&self, name: &str) -> Result<Option<Node>> {
        get_node(&self.master_netns()?, &self.kube_dir(), name)
    }

    /// Every Node.
    pub fn kube_nodes(&self) -> Result<Vec<Node>> {
        list_nodes(&self.master_netns()?, &self.kube_dir())
    }

    /// Deletes a Node (`kubectl delete node NAME`).
    pub fn kube_delete_node(&self, name: &str) -> Result<()> {
        delete_node(&self.master_netns()?, &self.kube_dir(), name)
    }

    /// A strategic-merge patch of a Node (`status`: its status subresource),
    /// as the admin.
    pub fn kube_patch_node(
        &self,
        name: &str,
        patch: serde_json::Value,
        status: bool,
    ) -> Result<Node> {
        patch_node(&self.master_netns()?, &self.kube_dir(), name, patch, status)
    }

    /// The audit log of flanneld's requests: one JSON event per line.
    pub fn kube_audit(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.kube_dir().audit_log();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| LabError::Kube {
                    detail: format!("{}: a line is not JSON: {e}", path.display()),
                })
            })
            .collect()
    }

    /// The leases as flanneld reads them off the Nodes.
    pub(crate) fn kube_leases(&self) -> Result<Vec<flannel_core::lease::Lease>> {
        let cfg = flannel_core::config::parse(&self.state.net_conf_json())
            .expect("the lab's net-conf parses");
        let names = flannel_core::kube::AnnotationNames::new(
            flannel_core::wire::DEFAULT_KUBE_ANNOTATION_PREFIX,
        )
        .expect("the default prefix is valid");
        Ok(self
            .kube_nodes()?
            .iter()
            .filter_map(|n| {
                let spec = n.spec.as_ref();
                let empty = BTreeMap::new();
                let view = flannel_core::kube::NodeView {
                    name: n.metadata.name.as_deref().unwrap_or(""),
                    annotations: n.metadata.annotations.as_ref().unwrap_or(&empty),
                    pod_cidr: spec.and_then(|s| s.pod_cidr.as_deref()),
                    pod_cidrs: spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or(&[]),
                };
                view.lease(&names, &cfg).ok().flatten()
            })
            .collect())
    }

    /// Deletes the Node whose podCIDR is `key`'s (its lease disappears).
    pub(crate) fn kube_delete_node_of(&self, key: &flannel_core::lease::LeaseKey) -> Result<()> {
        let want = key.ipv4.map(|n| n.to_string());
        let node = self
            .kube_nodes()?
            .into_iter()
            .find(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.clone()) == want);
        match node.and_then(|n| n.metadata.name) {
            Some(name) => self.kube_delete_node(&name),
            None => Ok(()),
        }
    }
}

impl super::Lab {
    /// Creates `namespace` and its ServiceAccount `flannel` (if needed, as
    /// kube-flannel.yml does) and a pod `name` running as `flannel`,
    /// scheduled on `node` (`spec.nodeName`), as the DaemonSet controller
    /// and scheduler would for kube-flannel-ds: what flanneld finds its Node
    /// through when only POD_NAME and POD_NAMESPACE are set.
    pub fn kube_create_pod(&self, namespace: &str, name: &str, node: &str) -> Result<()> {
        use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
        let (namespace, name, node) = (namespace.to_string(), name.to_string(), node.to_string());
        self.with_kube(|c| async move {
            let ns = Namespace {
                metadata: ObjectMeta {
                    name: Some(namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            };
            create_once(&Api::all(c.clone()), &ns, &format!("namespace {namespace}")).await?;
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("flannel".into()),
                    namespace: Some(namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            };
            create_once(
                &Api::namespaced(c.clone(), &namespace),
                &sa,
                &format!("service account {namespace}/flannel"),
            )
            .await?;
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(PodSpec {
                    node_name: Some(node),
                    service_account_name: Some("flannel".into()),
                    host_network: Some(true),
                    containers: vec![Container {
                        name: "kube-flannel".into(),
                        image: Some("ghcr.io/flannel-rs/flannel-rs:v0.1.0".into()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
                ..Pod::default()
            };
            create_once(
                &Api::namespaced(c, &namespace),
                &pod,
                &format!("pod {namespace}/{name}"),
            )
            .await
        })
    }

    /// flanneld's bearer token and the cluster CA, as a service account's
    /// mounted secret holds them (`token`, `ca.crt`).
    pub fn kube_service_account_files(&self) -> Result<(String, String)> {
        let kd = self.kube_dir();
        let tokens = std::fs::read_to_string(kd.path(TOKENS_FILE)).map_err(io_err(format!(
            "reading {}",
            kd.path(TOKENS_FILE).display()
        )))?;
        let token = tokens
            .lines()
            .find(|l| l.split(',').nth(1) == Some(FLANNEL_USER))
            .and_then(|l| l.split(',').next())
            .ok_or_else(|| LabError::Kube {
                detail: format!("no token of {FLANNEL_USER} in {TOKENS_FILE}"),
            })?
            .to_string();
        let ca = std::fs::read_to_string(kd.path(CA_FILE))
            .map_err(io_err(format!("reading {}", kd.path(CA_FILE).display())))?;
        Ok((token, ca))
    }
}
