//! Lease stores: the [`Store`] abstraction every subnet manager implements,
//! and its implementations.
//!
//! - [`local`]: [`LocalStore`], leases as files in a directory shared by the
//!   daemons of one machine (flock + atomic rename, inotify watch).
//! - [`etcd`]: upstream's etcd v3 layout.
//! - [`kube`]: the Kubernetes API (`--kube-subnet-mgr`): a node's subnet is
//!   its Node's podCIDR, the rest of the lease its annotations.
//! - [`acquire`]: store-generic [`acquire_lease`] (upstream's order, retried
//!   on lost races), [`renew_at`] and [`renew_lease`].
//!
//! A store only moves leases in and out; the decisions (which subnet to take,
//! what a lease means for the kernel) live in `flannel-core`.

pub mod acquire;
pub mod etcd;
pub mod kube;
pub mod local;
#[cfg(feature = "test-support")]
pub mod testsupport;

pub use acquire::{acquire_lease, acquire_lease_from, renew_at, renew_lease, AcquireError};
pub use local::LocalStore;

use std::future::Future;
use std::time::Duration;

use flannel_core::config::NetConfig;
use flannel_core::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseKey};
use tokio::sync::mpsc;

/// Errors of a store, with the key or path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lease {key} is invalid: {detail}")]
    InvalidLease { key: String, detail: String },
    #[error("lease {key} not found")]
    NotFound { key: String },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The key exists but belongs to another node (update refused).
    #[error("lease {key} is held by another node: {detail}")]
    Conflict { key: String, detail: String },
    /// The store cannot do this at all (e.g. delete a lease in Kubernetes mode).
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// All leases at one point of the store's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSnapshot {
    pub leases: Vec<Lease>,
    /// Store revision the snapshot was read at (etcd revision; a counter for the local store).
    pub revision: u64,
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The complete set of leases: replaces whatever the watcher knew. Sent
    /// first, and again whenever the store cannot prove that no event was lost
    /// (reconnect, compaction).
    Snapshot(LeaseSnapshot),
    /// Changes since the previous message. Expired leases arrive as `Removed`.
    Events {
        events: Vec<LeaseEvent>,
        revision: u64,
    },
}

/// A subnet lease store (upstream's subnet manager backends).
///
/// Methods return `Send` futures so the daemon can run them on any tokio worker.
pub trait Store: Send + Sync + 'static {
    /// The net-conf JSON held by the store (`<prefix>/config` in etcd);
    /// `Ok(None)` for stores whose config comes from `--net-config-path`.
    fn get_network_config(&self) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Every lease currently held, expired ones excluded.
    fn list_leases(&self) -> impl Future<Output = Result<LeaseSnapshot>> + Send;

    /// Creates `lease` only if its key does not exist (a create-if-absent
    /// transaction). `ttl: None` writes a reservation. Returns the stored lease
    /// with its expiration, or `Ok(None)` when the key was taken meanwhile.
    fn create_lease(
        &self,
        lease: &Lease,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Option<Lease>>> + Send;

    /// Overwrites an existing lease held by this node (new attributes or
    /// renewal). `ttl: None` keeps it a reservation. Returns the stored lease.
    fn update_lease(
        &self,
        lease: &Lease,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Lease>> + Send;

    /// Deletes a lease; absent is success.
    fn delete_lease(&self, key: &LeaseKey) -> impl Future<Output = Result<()>> + Send;

    /// Starts watching every lease: first a [`WatchEvent::Snapshot`], then
    /// [`WatchEvent::Events`]. The channel closes only when the store is dropped
    /// or the receiver is.
    fn watch_leases(&self) -> impl Future<Output = Result<mpsc::Receiver<WatchEvent>>> + Send;

    /// Acquires this node's lease with `attrs`. The default is upstream's
    /// order over [`Store::list_leases`] and [`Store::create_lease`]
    /// ([`acquire_lease_from`], planning first on `listed` when the caller
    /// has just read the leases); the Kubernetes store takes the Node's
    /// podCIDR instead and publishes `attrs` as annotations.
    fn acquire(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<LeaseKey>,
        ttl: Duration,
        listed: Option<LeaseSnapshot>,
    ) -> impl Future<Output = Result<Lease, AcquireError>> + Send
    where
        Self: Sized,
    {
        acquire_lease_from(self, cfg, attrs, previous, ttl, listed)
    }

    /// What this node published before, for stores that know the node by
    /// identity rather than by public address (Kubernetes: its Node's own
    /// annotations, whatever its address is now). `Ok(None)`: look among
    /// [`Store::list_leases`] for the lease with our public address.
    fn own_published_attrs(&self) -> impl Future<Output = Result<Option<LeaseAttrs>>> + Send {
        async { Ok(None) }
    }

    /// Called once the lease is held, the datapath programmed and subnet.env
    /// written (upstream's `CompleteLease`; Kubernetes: the Node's
    /// `NetworkUnavailable=False` condition). Default: nothing.
    fn complete_lease(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send {
        let _ = lease;
        async { Ok(()) }
    }
}
