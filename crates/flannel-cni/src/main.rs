//! `flannel`: the flannel CNI plugin. One process per call, no async runtime:
//! the environment (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`) and the network configuration on stdin select a verb; the
//! answer (or a spec error object) goes to stdout.
//!
//! Upstream's plugin renders a bridge + host-local config and execs the
//! reference plugins; we render the same config, save it the same way, and do
//! the work natively in this process (see `flannel_cni::attach` and `flannel_cni::ipam`).
//!
//! Deliberate differences from upstream flannel + bridge + host-local:
//! - The host veth is `veth` + 8 hex digits of a hash of container ID and
//!   interface name (upstream: random), so DEL and GC find it without state.
//! - A failed ADD takes back every step (upstream leaves the veth when IPAM fails).
//! - ADD again for an attachment that holds an address reuses it (host-local
//!   refuses with "duplicate allocation"); an existing pod interface is error 101.
//! - DEL without a saved config still releases the attachment's addresses and
//!   veth, using the input config (upstream does nothing then).
//! - cni0 gets a fixed random MAC when created, so the pods' gateway MAC does
//!   not follow the lowest port MAC as pods come and go.
//! - `ipMasq: true` (flanneld run without `--ip-masq`) writes the reference
//!   plugin's iptables masquerade chain (`flannel_cni::ipmasq`); its nftables backend is
//!   not offered. DEL removes the chain whichever plugin wrote it.
//! - `CNI_PATH` is not required: no other plugin is executed (only
//!   iptables-restore/iptables-save, for `ipMasq`).
//! - `CNI_NETNS` naming the plugin's own namespace (the node's) is refused
//!   (error 4) before anything changes; stdin is read up to 1 MiB.
//! - The IPAM lock is held for the whole ADD/DEL, so bridge setup is
//!   serialised along with allocation.

use std::io::{Read, Write};

use flannel_cni::spec::{self, code, CniError, Version};
use flannel_cni::{config, verbs::env_var, verbs::run};

/// The largest network configuration read from stdin. A real one is a few
/// KiB (prevResult included); without a bound a runaway or hostile writer
/// makes the plugin allocate without limit.
const MAX_STDIN: u64 = 1 << 20;

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                format!("reading the network configuration from stdin: {e}"),
            )
        })
        .and_then(|n| {
            if n as u64 > MAX_STDIN {
                Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("the network configuration on stdin is larger than {MAX_STDIN} bytes; a CNI configuration is a few KiB"),
                ))
            } else {
                Ok(())
            }
        });
    if read.is_err() {
        // Never parse part of a configuration.
        stdin.clear();
    }
    let reply_version = config::peek_version(&stdin)
        .filter(|v| Version::parse(v).is_some_and(|v| v.is_supported()))
        .unwrap_or_else(|| spec::LATEST_VERSION.to_string());
    let outcome = match (env_var("CNI_COMMAND"), read) {
        (_, Err(e)) => Err(e),
        (None, _) => Err(CniError::new(
            code::INVALID_ENV,
            "environment variable CNI_COMMAND is missing; this is a CNI plugin, run by a container runtime",
        )),
        (Some(cmd), Ok(_)) => run(&cmd, &stdin),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&reply_version));
            let _ = out.flush();
            std::process::exit(1);
        }
    }
}
