//! `flannelctl lab down`: everything of a lab removed, whatever state a
//! failed `up` or an earlier `down` left it in.

use std::time::Duration;

use flannel_netlink::netns::NetNs;

use super::{
    absent_ok, lab_dir, lab_namespaces, lab_processes, pods, procs, require_root, store,
    validate_name, Lab, LabError, LabState, Result, CNI_BINARY,
};

/// `flannelctl lab down`: stops the daemons (checking each pid is this lab's
/// flanneld), runs CNI DEL for the pods, deletes every namespace of the lab
/// and its directory. Safe to run twice and after a half-failed `up`; keeps
/// going after errors and reports them all at the end.
pub fn down(name: &str) -> Result<()> {
    require_root()?;
    validate_name(name)?;
    let dir = lab_dir(name);
    let mut errors = Vec::new();
    let state = match LabState::load(name) {
        Ok(s) => Some(s),
        Err(LabError::NotFound { .. }) => None,
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };

    // 1. Daemons: by their pid files, then any flanneld still running with
    //    this labdir on its command line (e.g. started before its pid file
    //    was written).
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if let Some(pid) = procs::read_pid(&e.path().join(procs::PID_FILE)) {
                if let Err(err) = procs::stop_flanneld(pid, &dir, Duration::from_secs(5)) {
                    errors.push(err.to_string());
                }
            }
        }
    }
    for pid in lab_processes(name) {
        if procs::is_lab_flanneld(pid, &dir) {
            if let Err(err) = procs::stop_flanneld(pid, &dir, Duration::from_secs(5)) {
                errors.push(err.to_string());
            }
        }
    }

    // 1b. The store's servers (the lab's etcd).
    store::stop_servers(name, &dir, &mut errors);

    // 2. CNI DEL for every pod whose node still exists.
    if let Some(state) = &state {
        let lab = Lab {
            state: state.clone(),
        };
        for pod in &state.pods {
            let Some(node) = state.node(&pod.node) else {
                continue;
            };
            let Ok(node_ns) = NetNs::open(&node.netns) else {
                continue;
            };
            // Without the node's directory or the plugin binary (moved or
            // rebuilt elsewhere since `up`) DEL cannot run; that is harmless:
            // all the plugin created lives in the node and pod namespaces and
            // in the labdir, which are removed below.
            if !lab.node_dir(&node.name).exists() || !state.bin_dir.join(CNI_BINARY).is_file() {
                continue;
            }
            let config = pods::cni_config(&lab.node_dir(&node.name), &lab.subnet_file(&node.name));
            if let Err(e) = pods::invoke("DEL", &node_ns, &state.bin_dir, pod, &node.name, &config)
            {
                errors.push(e.to_string());
            }
        }
    }

    // 3. Namespaces: pods first, then nodes, then the switch.
    let mut namespaces = lab_namespaces(name);
    namespaces.sort_by_key(|n| {
        if n.contains("-ubuntu-") {
            0
        } else if n.ends_with("-underlay")
            || n.ends_with("-underlay2")
            || n.ends_with("-router")
            || n.ends_with("-outside")
        {
            2
        } else {
            1
        }
    });
    for ns in namespaces {
        if let Err(e) = NetNs::delete(&ns) {
            errors.push(format!("deleting namespace {ns}: {e}"));
        }
    }

    // 4. The lab directory, after the read-only mount of a store outage
    //    (`lab chaos` on --store local) that an interrupted run left.
    if let Err(e) = store::unmount_store(&dir.join("store")) {
        errors.push(format!("umount {}: {e}", dir.join("store").display()));
    }
    if let Err(e) = absent_ok(std::fs::remove_dir_all(&dir)) {
        errors.push(format!("removing {}: {e}", dir.display()));
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown {
            name: name.to_string(),
            errors,
        })
    }
}
