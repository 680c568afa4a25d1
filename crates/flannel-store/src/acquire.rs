//! Acquiring and renewing this node's lease, for every [`Store`].
//!
//! The choice of subnet is `flannel_core::alloc::plan_acquisition` (upstream's
//! order: our own lease, the previous subnet, a random free one); this module
//! turns the plan into store writes and retries when another node wins a race.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flannel_core::alloc::{self, AllocError, Plan, PublicIps};
use flannel_core::config::NetConfig;
use flannel_core::lease::{Lease, LeaseAttrs, LeaseKey};
use rand::Rng;

use crate::{LeaseSnapshot, Store, StoreError};

/// How many times acquisition re-plans after losing a race before giving up.
pub const MAX_ACQUIRE_ATTEMPTS: u32 = 50;

/// Why no lease could be acquired.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Every subnet of the range is held (or another planning failure).
    #[error("cannot acquire a subnet lease (net-conf.json Network/SubnetMin/SubnetMax): {0}")]
    Plan(#[from] AllocError),
    /// The attributes name no public address to own a lease by.
    #[error("lease attributes have neither PublicIP nor PublicIPv6: set --public-ip or --iface so the node has an address")]
    NoPublicIp,
    /// Other nodes kept taking the chosen subnet.
    #[error("lost the race for a free subnet {attempts} times in a row (other nodes keep taking them); retry later")]
    TooManyRaces { attempts: u32 },
    #[error("store error while acquiring a lease: {0}")]
    Store(#[from] StoreError),
    /// Kubernetes mode: the Node's podCIDR cannot be our subnet.
    #[error(transparent)]
    Kube(crate::kube::KubeStoreError),
}

/// Acquires this node's lease (upstream's order): list, plan, then reuse our
/// lease (a reservation stays a reservation) or create a new one with `ttl`.
/// A create that loses a race, or a reuse whose lease vanished meanwhile,
/// re-lists and re-plans, up to [`MAX_ACQUIRE_ATTEMPTS`] times with a small
/// random pause so that racing nodes spread out.
pub async fn acquire_lease<S: Store>(
    store: &S,
    cfg: &NetConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseKey>,
    ttl: Duration,
) -> Result<Lease, AcquireError> {
    acquire_lease_from(store, cfg, attrs, previous, ttl, None).await
}

/// [`acquire_lease`], planning the first attempt on `first` (a list the
/// caller just read, so that a store of thousands of leases is not read
/// twice in a row); later attempts list again.
pub async fn acquire_lease_from<S: Store>(
    store: &S,
    cfg: &NetConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseKey>,
    ttl: Duration,
    mut first: Option<LeaseSnapshot>,
) -> Result<Lease, AcquireError> {
    let own = PublicIps {
        v4: attrs.public_ip,
        v6: attrs.public_ipv6,
    };
    if own.v4.is_none() && own.v6.is_none() {
        return Err(AcquireError::NoPublicIp);
    }
    for attempt in 1..=MAX_ACQUIRE_ATTEMPTS {
        let mut snapshot = match first.take() {
            Some(s) => s,
            None => store.list_leases().await?,
        };
        if attempt == 1 {
            // As upstream: our own leases that the config no longer accepts
            // (another Network or SubnetLen) go before we acquire.
            let stale = alloc::stale_own_leases(cfg, &snapshot.leases, own, SystemTime::now());
            if !stale.is_empty() {
                for key in &stale {
                    tracing::info!(subnet = %key, "deleting our lease that the config no longer accepts");
                    store.delete_lease(key).await?;
                }
                snapshot = store.list_leases().await?;
            }
        }
        // The rng is not Send: keep it inside this block, away from awaits.
        let plan = {
            let mut rng = rand::rng();
            alloc::plan_acquisition(
                cfg,
                &snapshot.leases,
                own,
                previous,
                SystemTime::now(),
                &mut rng,
            )?
        };
        match plan {
            Plan::Reuse(held) => {
                let ttl = held.expiration.map(|_| ttl);
                let lease = Lease {
                    key: held.key,
                    attrs: attrs.clone(),
                    expiration: None,
                };
                match store.update_lease(&lease, ttl).await {
                    Ok(stored) => {
                        tracing::info!(subnet = %stored.key, reservation = stored.expiration.is_none(),
                            "reusing this node's lease");
                        return Ok(stored);
                    }
                    Err(StoreError::NotFound { .. }) => {
                        tracing::debug!(subnet = %held.key, attempt, "own lease vanished while reusing it; planning again");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Plan::Create(key) => {
                let lease = Lease {
                    key,
                    attrs: attrs.clone(),
                    expiration: None,
                };
                if let Some(stored) = store.create_lease(&lease, Some(ttl)).await? {
                    tracing::info!(subnet = %stored.key, "acquired a new lease");
                    return Ok(stored);
                }
                tracing::debug!(subnet = %key, attempt, "subnet taken by another node meanwhile; planning again");
            }
        }
        // Random, and wider after each loss: racers that keep colliding
        // (stores whose create also fails on any concurrent change) spread out.
        let max_ms = 10 * u64::from(attempt.min(10));
        let pause = Duration::from_millis(rand::rng().random_range(1..=max_ms));
        tokio::time::sleep(pause).await;
    }
    Err(AcquireError::TooManyRaces {
        attempts: MAX_ACQUIRE_ATTEMPTS,
    })
}

/// When to renew `lease`: `margin` before it expires (upstream's
/// `--subnet-lease-renew-margin`), or `None` for a reservation, which never
/// expires. A margin longer than the remaining lifetime means "now".
pub fn renew_at(lease: &Lease, margin: Duration) -> Option<SystemTime> {
    lease
        .expiration
        .map(|exp| exp.checked_sub(margin).unwrap_or(UNIX_EPOCH))
}

/// Renews `lease` for another `ttl` (a reservation is rewritten as a
/// reservation). [`StoreError::NotFound`] means the lease was revoked under
/// us (upstream logs "Lease has been revoked" and exits);
/// [`StoreError::Conflict`] that another node holds the subnet now.
pub async fn renew_lease<S: Store>(
    store: &S,
    lease: &Lease,
    ttl: Duration,
) -> Result<Lease, StoreError> {
    let ttl = lease.expiration.map(|_| ttl);
    let stored = store.update_lease(lease, ttl).await?;
    tracing::debug!(subnet = %stored.key, "lease renewed");
    Ok(stored)
}
