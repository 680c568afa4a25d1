//! The lab's lease store: the local directory (`--store local`), the etcd
//! server in the master's namespace (`--store etcd`), or the Kubernetes API
//! (`--store kube`: etcd and a kube-apiserver there, see [`super::kube`]);
//! reading and writing leases, the reservations (Nodes with their podCIDR
//! in Kubernetes) and seeded subnet.env that pin each node's subnet, and the
//! servers' start, stop and etcd's raw keys.
//!
//! This is the one place that dispatches on [`StoreKind`]: a new kind of
//! store adds its arms here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flannel_core::lease::{IpFamily, Lease, LeaseAttrs, LeaseKey, VxlanBackendData};
use flannel_core::mac::MacAddr;
use flannel_core::wireguard;
use flannel_netlink::netns::NetNs;
use ipnet::Ipv4Net;

use super::{
    etcd, io_err, kube, lab_processes, node_name, ns_err, procs, write_atomic, Backend, Lab,
    LabError, NodeState, Result, StoreKind,
};

impl Lab {
    /// The lab's local store directory (`--local-store` of every daemon).
    pub fn store_dir(&self) -> PathBuf {
        self.dir().join("store")
    }

    /// Where the leases are: the local store's directory or etcd's URL.
    pub fn store_description(&self) -> String {
        match self.state.store {
            StoreKind::Local => format!("local {}", self.store_dir().display()),
            StoreKind::Etcd => match self.etcd_endpoint() {
                Ok(url) => format!("etcd {url}"),
                Err(_) => "etcd (no master)".to_string(),
            },
            StoreKind::Kube => match self.master() {
                Ok(m) => format!(
                    "kube {} ({})",
                    kube::api_url(m.underlay_ip),
                    self.state
                        .kube_apiserver
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
                Err(_) => "kube (no master)".to_string(),
            },
        }
    }

    /// `lab up`'s store step: creates the local store's directory, or starts
    /// etcd in the master's namespace and writes the net-conf into it.
    /// Returns what `up` reports of it, if anything.
    pub(super) fn create_store(&self, ready_timeout: Duration) -> Result<Option<String>> {
        match self.state.store {
            StoreKind::Local => {
                std::fs::create_dir_all(self.store_dir())
                    .map_err(io_err("creating the lab store"))?;
                Ok(None)
            }
            StoreKind::Etcd => {
                let pid = self.start_store_within(ready_timeout)?;
                self.put_etcd_config()?;
                Ok(Some(format!(
                    "etcd in {}: pid {pid}, {} (config at {}), data {}",
                    self.master()?.netns,
                    self.etcd_endpoint()?,
                    flannel_core::wire::DEFAULT_ETCD_PREFIX,
                    self.etcd_dir().join("data").display()
                )))
            }
            StoreKind::Kube => {
                let deadline = Instant::now() + ready_timeout.max(Duration::from_secs(60));
                let etcd_pid = self.start_etcd_until(deadline)?;
                let master = self.master()?.clone();
                kube::prepare(&self.kube_dir(), master.underlay_ip)?;
                let pid = self.start_apiserver_until(deadline)?;
                let ns = self.master_netns()?;
                kube::bootstrap(&ns, &self.kube_dir())?;
                Ok(Some(format!(
                    "etcd in {} (pid {etcd_pid}) and {} (pid {pid}) at {}: ClusterRole flannel bound to {}; kubeconfig {}",
                    master.netns,
                    self.kube_binary()?.display(),
                    kube::api_url(master.underlay_ip),
                    kube::FLANNEL_USER,
                    self.kube_dir().flannel_kubeconfig().display()
                )))
            }
        }
    }

    /// Writes the lab's current net-conf where the daemons read it: the
    /// `--net-config-path` file with the local store, etcd's config key with
    /// etcd.
    pub(super) fn publish_net_conf(&self) -> Result<()> {
        match self.state.store {
            // Kubernetes mode reads the file too (kube-flannel.yml's ConfigMap).
            StoreKind::Local | StoreKind::Kube => {
                write_atomic(&self.net_conf_path(), self.state.net_conf_json().as_bytes())
            }
            StoreKind::Etcd => self.put_etcd_config(),
        }
    }

    /// The flags that point a daemon at the lab's store (and, for the local
    /// store, at its net-conf.json).
    pub(super) fn store_args(&self) -> Result<Vec<OsString>> {
        Ok(match self.state.store {
            StoreKind::Local => vec![
                "--local-store".into(),
                self.store_dir().into(),
                "--net-config-path".into(),
                self.net_conf_path().into(),
            ],
            // No --local-store: flanneld uses etcd and reads the config there.
            StoreKind::Etcd => vec!["--etcd-endpoints".into(), self.etcd_endpoint()?.into()],
            StoreKind::Kube => vec![
                "--kube-subnet-mgr".into(),
                "--kubeconfig-file".into(),
                self.kube_dir().flannel_kubeconfig().into(),
                "--net-config-path".into(),
                self.net_conf_path().into(),
            ],
        })
    }

    /// The environment that names a daemon's node to the store: `NODE_NAME`
    /// in Kubernetes mode (what kube-flannel.yml's pod learns through
    /// POD_NAME/POD_NAMESPACE).
    pub(super) fn store_env(&self, n: &NodeState) -> Vec<(OsString, OsString)> {
        match self.state.store {
            StoreKind::Kube => vec![(
                flannel_core::wire::ENV_NODE_NAME.into(),
                n.name.clone().into(),
            )],
            StoreKind::Local | StoreKind::Etcd => Vec::new(),
        }
    }

    /// Runs an async operation on the lab's store: the local directory on a
    /// private runtime, or etcd from a thread inside the master's namespace.
    pub(crate) fn store_block_on<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(AnyStore) -> Fut + Send,
        Fut: std::future::Future<Output = flannel_store::Result<T>>,
    {
        match self.state.store {
            StoreKind::Local => {
                store_block_on(
                    &self.store_dir(),
                    |s| async move { f(AnyStore::Local(s)).await },
                )
            }
            StoreKind::Kube => Err(LabError::InvalidOption {
                option: "--store",
                reason:
                    "a lab with --store kube keeps its leases in Node objects, not in a lease store"
                        .into(),
            }),
            StoreKind::Etcd => {
                let master = self.master()?;
                let ns = NetNs::open(&master.netns)
                    .map_err(ns_err(format!("opening {}", master.netns)))?;
                let path = self.store_description();
                etcd::block_on(
                    &ns,
                    etcd::client_options(master.underlay_ip),
                    |s| async move {
                        f(AnyStore::Etcd(s))
                            .await
                            .map_err(|source| LabError::Store { path, source })
                    },
                )
            }
        }
    }

    /// Every lease in the lab's store (Kubernetes: every managed Node's).
    pub fn leases(&self) -> Result<Vec<Lease>> {
        if self.state.store == StoreKind::Kube {
            return self.kube_leases();
        }
        self.store_block_on(|store| async move { store.list_leases().await })
    }

    /// Deletes a lease from the lab's store (Kubernetes: the Node with that
    /// podCIDR).
    pub fn delete_lease(&self, subnet: Ipv4Net) -> Result<()> {
        let key = LeaseKey {
            ipv4: Some(subnet),
            ipv6: None,
        };
        if self.state.store == StoreKind::Kube {
            return self.kube_delete_node_of(&key);
        }
        self.store_block_on(|store| async move { store.delete_lease(&key).await })
    }

    /// Deletes a node's lease, its reservation included (`etcdctl del
    /// /coreos.com/network/subnets/10.244.I.0-24`, the local store's file;
    /// Kubernetes: `kubectl delete node`).
    pub fn delete_node_lease(&self, n: &NodeState) -> Result<()> {
        let key = self.state.lease_key(n);
        if self.state.store == StoreKind::Kube {
            return self.kube_delete_node_of(&key);
        }
        self.store_block_on(|store| async move { store.delete_lease(&key).await })
    }

    /// The store outage of `--store local`: makes the store's directory
    /// read-only (`mount --bind DIR DIR && mount -o remount,bind,ro DIR`),
    /// or writable again (`umount DIR`). A mode change would not do: the
    /// daemons run as root, which ignores permission bits. The mount lives
    /// below the labdir only; `lab down` undoes it too.
    pub fn set_local_store_read_only(&self, read_only: bool) -> Result<()> {
        use nix::mount::{mount, MsFlags};
        if self.state.store != StoreKind::Local {
            return Err(LabError::InvalidOption {
                option: "set_local_store_read_only",
                reason: format!(
                    "lab {} uses the {} store, not a local directory",
                    self.name(),
                    self.state.store
                ),
            });
        }
        let dir = self.store_dir();
        let fail = |what: &str, e: nix::Error| LabError::Io {
            context: format!("{what} {}", dir.display()),
            source: std::io::Error::from(e),
        };
        if read_only {
            mount(
                Some(&dir),
                &dir,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| fail("mount --bind", e))?;
            let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = mount(None::<&str>, &dir, None::<&str>, ro, None::<&str>) {
                let _ = unmount_store(&dir);
                return Err(fail("mount -o remount,bind,ro", e));
            }
            Ok(())
        } else {
            unmount_store(&dir).map_err(|e| fail("umount", e))
        }
    }

    /// Whether the store answers: a read of every lease (for etcd, from
    /// inside the master's namespace).
    pub fn store_health(&self) -> Result<()> {
        self.leases().map(|_| ())
    }

    fn reservation(&self, n: &NodeState) -> Lease {
        let v4 = self.state.family.has_v4().then_some(n.underlay_ip);
        let v6 = if self.state.family.has_v6() {
            n.underlay_ipv6
        } else {
            None
        };
        Lease {
            key: self.state.lease_key(n),
            attrs: match self.state.backend {
                // As flanneld (and upstream) write it: no BackendType.
                Backend::Udp => LeaseAttrs::new_udp(n.underlay_ip),
                b => LeaseAttrs::new(b.type_name(), v4, v6),
            },
            expiration: None,
        }
    }

    /// Writes the reservation of a node (a lease without expiry naming its
    /// underlay address), unless its key is already taken.
    pub(super) fn write_reservation(&self, n: &NodeState) -> Result<()> {
        if self.state.store == StoreKind::Kube {
            // kube-controller-manager's part: the Node gets its podCIDR.
            return self.kube_register_node(n, true);
        }
        let lease = self.reservation(n);
        self.store_block_on(|store| async move {
            store.create_lease(&lease, None).await?;
            Ok(())
        })
    }

    /// Writes the subnet.env flanneld would have left from an earlier run
    /// with the node's planned subnet: flanneld's acquisition asks for that
    /// subnet first (after a lease naming its own address).
    pub(super) fn seed_subnet_env(&self, n: &NodeState) -> Result<()> {
        let cfg = flannel_core::config::parse(&self.state.net_conf_json())
            .expect("the lab's net-conf parses");
        let key = self.state.lease_key(n);
        let env = flannel_core::subnet_env::SubnetEnv::new(
            &cfg,
            &key,
            self.state.pod_mtu(),
            self.state.ip_masq,
        );
        std::fs::create_dir_all(self.node_dir(&n.name))
            .map_err(io_err(format!("creating the directory of {}", n.name)))?;
        write_atomic(&self.subnet_file(&n.name), env.render().as_bytes())
    }

    /// The VtepMAC a node published in its lease, if any.
    pub fn published_vtep_mac(&self, node: &str) -> Result<Option<MacAddr>> {
        let n = self.node(node)?;
        Ok(self
            .leases()?
            .into_iter()
            .find(|l| l.key == self.state.lease_key(n))
            .and_then(|l| vxlan_data(&l.attrs))
            .map(|d| d.vtep_mac))
    }

    /// Whether `l` is `n`'s lease as its daemon publishes it: the node's
    /// subnet(s), its public address(es), the lab's backend and, for vxlan,
    /// the VtepMAC of each family (for wireguard, the public key).
    pub fn is_published(&self, n: &NodeState, l: &Lease) -> bool {
        let fam = self.state.family;
        l.key == self.state.lease_key(n)
            && (!fam.has_v4() || l.attrs.public_ip == Some(n.underlay_ip))
            && (!fam.has_v6() || l.attrs.public_ipv6 == n.underlay_ipv6)
            && l.attrs.effective_backend_type() == self.state.backend.type_name()
            && (self.state.backend != Backend::Vxlan
                || ((!fam.has_v4() || vxlan_data(&l.attrs).is_some())
                    && (!fam.has_v6() || l.attrs.vxlan_v6_data().is_some())))
            && (self.state.backend != Backend::Wireguard
                || [(fam.has_v4(), IpFamily::V4), (fam.has_v6(), IpFamily::V6)]
                    .into_iter()
                    .all(|(on, f)| !on || wireguard::lease_data(&l.attrs, f).is_some()))
    }

    pub(super) fn master(&self) -> Result<&NodeState> {
        self.node(&node_name(0))
    }

    /// The master's namespace, where the lab's servers run.
    pub(super) fn master_netns(&self) -> Result<NetNs> {
        let master = self.master()?;
        NetNs::open(&master.netns).map_err(ns_err(format!("opening {}", master.netns)))
    }

    /// `http://172.16.1.8:2379`: where the daemons reach the lab's etcd.
    pub fn etcd_endpoint(&self) -> Result<String> {
        Ok(etcd::client_url(self.master()?.underlay_ip))
    }

    /// `<labdir>/etcd`: etcd's data directory, log and pid file.
    pub fn etcd_dir(&self) -> PathBuf {
        self.dir().join(etcd::ETCD_DIR)
    }

    /// The pid in `<labdir>/etcd/etcd.pid`.
    pub fn etcd_pid(&self) -> Option<u32> {
        procs::read_pid(&self.etcd_dir().join(etcd::ETCD_PID_FILE))
    }

    /// For `lab status`: with `--store etcd` or `kube`, etcd's pid and
    /// whether it runs; `None` for a store without a server.
    pub(super) fn etcd_process(&self) -> Option<(Option<u32>, bool)> {
        (self.state.store != StoreKind::Local).then(|| (self.etcd_pid(), self.etcd_alive()))
    }

    /// Whether the lab's etcd runs (pid alive and really this lab's etcd).
    pub fn etcd_alive(&self) -> bool {
        self.etcd_pid()
            .is_some_and(|pid| etcd::is_lab_etcd(pid, &self.dir()))
    }

    /// Stops the lab's store server, keeping its data: the daemons see an
    /// outage. With `--store etcd` etcd (SIGTERM, after checking its command
    /// line); with `--store kube` the API server (etcd behind it keeps
    /// running). Returns whether it was running. Without a server
    /// (`--store local`) an error.
    pub fn stop_store(&self) -> Result<bool> {
        if self.state.store == StoreKind::Kube {
            return self.stop_apiserver();
        }
        self.require_etcd("stop_store")?;
        match self.etcd_pid() {
            Some(pid) => etcd::stop(pid, &self.dir(), Duration::from_secs(10)),
            None => Ok(false),
        }
    }

    /// Starts the lab's store server again (same data, same addresses) and
    /// waits until it answers. Returns its pid.
    pub fn start_store(&self) -> Result<u32> {
        if self.state.store == StoreKind::Kube {
            return self.start_apiserver_until(Instant::now() + Duration::from_secs(60));
        }
        self.start_store_within(Duration::from_secs(30))
    }

    fn start_store_within(&self, timeout: Duration) -> Result<u32> {
        self.require_etcd("start_store")?;
        self.start_etcd_until(Instant::now() + timeout)
    }

    /// Starts the lab's etcd (also the one behind the Kubernetes API).
    fn start_etcd_until(&self, deadline: Instant) -> Result<u32> {
        if let Some(pid) = self.etcd_pid().filter(|_| self.etcd_alive()) {
            return Err(LabError::InvalidOption {
                option: "start_store",
                reason: format!("the lab's etcd is already running (pid {pid})"),
            });
        }
        let master = self.master()?.clone();
        let ns = NetNs::open(&master.netns).map_err(ns_err(format!("opening {}", master.netns)))?;
        let dir = self.etcd_dir();
        let pid = etcd::spawn(&ns, self.name(), &dir, master.underlay_ip)?;
        etcd::wait_ready(
            &ns,
            master.underlay_ip,
            pid,
            &self.dir(),
            &dir.join(etcd::ETCD_LOG_FILE),
            deadline,
        )?;
        Ok(pid)
    }

    pub(super) fn require_etcd(&self, what: &'static str) -> Result<()> {
        if self.state.store == StoreKind::Etcd {
            Ok(())
        } else {
            Err(LabError::InvalidOption {
                option: what,
                reason: format!(
                    "lab {} uses the {} store; only a lab made with `lab up --store etcd` has an etcd to stop or start",
                    self.name(),
                    self.state.store
                ),
            })
        }
    }

    /// Writes the net-conf into etcd (`etcdctl put /coreos.com/network/config
    /// '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}'`), where
    /// flanneld in etcd mode reads it.
    fn put_etcd_config(&self) -> Result<()> {
        let value = self.state.net_conf_json();
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            let key = store.config_key();
            store
                .client()
                .put(key.clone(), value, None)
                .await
                .map(|_| ())
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("put {key}: {e}"),
                })
        })
    }

    /// The raw value of an etcd key (`etcdctl get KEY --print-value-only`),
    /// e.g. `/coreos.com/network/subnets/10.244.1.0-24`; `None` when absent.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        self.require_etcd("etcd_get")?;
        let key = key.to_string();
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            let resp = store
                .client()
                .get(key.clone(), None)
                .await
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("get {key}: {e}"),
                })?;
            Ok(resp
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
    }

    /// Writes a raw value under an etcd key (`etcdctl put KEY VALUE`), without
    /// any check: how a test or an operator puts a bad value into the store.
    pub fn etcd_put(&self, key: &str, value: &str) -> Result<()> {
        self.require_etcd("etcd_put")?;
        let (key, value) = (key.to_string(), value.to_string());
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            store
                .client()
                .put(key.clone(), value, None)
                .await
                .map(|_| ())
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("put {key}: {e}"),
                })
        })
    }

    /// Deletes an etcd key (`etcdctl del KEY`); whether it existed.
    pub fn etcd_delete(&self, key: &str) -> Result<bool> {
        self.require_etcd("etcd_delete")?;
        let key = key.to_string();
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            store
                .client()
                .delete(key.clone(), None)
                .await
                .map(|r| r.deleted() > 0)
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("del {key}: {e}"),
                })
        })
    }

    /// The etcd key of a node's lease: `/coreos.com/network/subnets/10.244.1.0-24`.
    pub fn etcd_lease_key(&self, node: &str) -> Result<String> {
        let key = self.state.lease_key(self.node(node)?);
        Ok(format!(
            "{}/{}/{key}",
            flannel_core::wire::DEFAULT_ETCD_PREFIX,
            flannel_core::wire::ETCD_SUBNETS_DIR
        ))
    }

    fn with_etcd<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(flannel_store::etcd::EtcdStore) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let master = self.master()?;
        let ns = NetNs::open(&master.netns).map_err(ns_err(format!("opening {}", master.netns)))?;
        etcd::block_on(&ns, etcd::client_options(master.underlay_ip), f)
    }
}

/// The store kinds with a server to install: fails early, before anything is
/// built, when etcd is missing for `--store etcd`, or etcd or the
/// kube-apiserver for `--store kube`. Returns the kube-apiserver to run.
pub(super) fn check_installed(
    kind: StoreKind,
    kube_apiserver: Option<&Path>,
) -> Result<Option<PathBuf>> {
    match kind {
        StoreKind::Local => Ok(None),
        StoreKind::Etcd => etcd::etcd_binary().map(|_| None),
        StoreKind::Kube => {
            let apiserver = kube::apiserver_binary(kube_apiserver)?;
            etcd::etcd_binary()?;
            Ok(Some(apiserver))
        }
    }
}

/// `lab down`'s store step: stops the store's servers whether or not
/// `lab.json` names the store, collecting errors.
pub(super) fn stop_servers(name: &str, dir: &Path, errors: &mut Vec<String>) {
    // The API server first (it is etcd's client), by its pid file and by
    // its files in this labdir.
    kube::stop_servers(name, dir, errors);
    // The lab's etcd, by its pid file, then any still running with its
    // data directory in this labdir.
    if let Some(pid) = procs::read_pid(&dir.join(etcd::ETCD_DIR).join(etcd::ETCD_PID_FILE)) {
        if let Err(err) = etcd::stop(pid, dir, Duration::from_secs(10)) {
            errors.push(err.to_string());
        }
    }
    for pid in lab_processes(name) {
        if etcd::is_lab_etcd(pid, dir) {
            if let Err(err) = etcd::stop(pid, dir, Duration::from_secs(10)) {
                errors.push(err.to_string());
            }
        }
    }
}

/// Undoes [`Lab::set_local_store_read_only`] (`umount DIR`); nothing
/// mounted there is no error.
pub(super) fn unmount_store(dir: &Path) -> nix::Result<()> {
    match nix::mount::umount(dir) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn vxlan_data(attrs: &LeaseAttrs) -> Option<VxlanBackendData> {
    attrs.backend_data.as_ref()?.parse()
}

/// The lab's store, whichever it is (the [`flannel_store::Store`] trait is
/// not object-safe).
pub(crate) enum AnyStore {
    Local(flannel_store::LocalStore),
    Etcd(flannel_store::etcd::EtcdStore),
}

impl AnyStore {
    async fn list_leases(&self) -> flannel_store::Result<Vec<Lease>> {
        use flannel_store::Store;
        Ok(match self {
            AnyStore::Local(s) => s.list_leases().await?.leases,
            AnyStore::Etcd(s) => s.list_leases().await?.leases,
        })
    }

    async fn create_lease(
        &self,
        lease: &Lease,
        ttl: Option<Duration>,
    ) -> flannel_store::Result<Option<Lease>> {
        use flannel_store::Store;
        match self {
            AnyStore::Local(s) => s.create_lease(lease, ttl).await,
            AnyStore::Etcd(s) => s.create_lease(lease, ttl).await,
        }
    }

    async fn delete_lease(&self, key: &LeaseKey) -> flannel_store::Result<()> {
        use flannel_store::Store;
        match self {
            AnyStore::Local(s) => s.delete_lease(key).await,
            AnyStore::Etcd(s) => s.delete_lease(key).await,
        }
    }
}

/// Runs an async store operation on a private current-thread runtime (the
/// lab itself is synchronous; only the store API is async).
pub(crate) fn store_block_on<T, F, Fut>(dir: &Path, f: F) -> Result<T>
where
    F: FnOnce(flannel_store::LocalStore) -> Fut,
    Fut: std::future::Future<Output = flannel_store::Result<T>>,
{
    let map = |source| LabError::Store {
        path: dir.display().to_string(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting a runtime for the store"))?;
    rt.block_on(async {
        let store = flannel_store::LocalStore::open(dir).map_err(map)?;
        f(store).await.map_err(map)
    })
}
