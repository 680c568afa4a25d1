//! Pods: the real `flannel` CNI plugin, invoked the way a container runtime
//! does (CNI_* environment + network config on stdin), from inside the node's
//! namespace.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use flannel_netlink::netns::NetNs;
use ipnet::{Ipv4Net, Ipv6Net};

use super::{ns_err, Lab, LabError, PodState, Result, CNI_BINARY, CNI_NETWORK_NAME};

/// The network config a runtime hands the plugin for upstream's manifest
/// conflist (`cbr0`, type flannel, delegate hairpinMode + isDefaultGateway),
/// with the node's subnet.env and the CNI state kept in the node's directory.
pub(crate) fn cni_config(node_dir: &Path, subnet_file: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.3.1",
        "name": CNI_NETWORK_NAME,
        "type": "flannel",
        "delegate": { "hairpinMode": true, "isDefaultGateway": true },
        "subnetFile": subnet_file,
        "dataDir": node_dir.join("cni"),
        "ipam": { "dataDir": node_dir.join("ipam") },
    })
    .to_string()
}

/// Runs `flannel` with CNI_COMMAND=`command` for `pod`, inside `node_ns`.
/// Returns the plugin's stdout; a non-zero exit is an error carrying the
/// plugin's CNI error message.
pub(crate) fn invoke(
    command: &'static str,
    node_ns: &NetNs,
    bin_dir: &Path,
    pod: &PodState,
    node: &str,
    config: &str,
) -> Result<String> {
    let cni_err = |detail: String| LabError::Cni {
        command,
        pod: pod.name.clone(),
        node: node.to_string(),
        detail,
    };
    let plugin = bin_dir.join(CNI_BINARY);
    let netns_path = Path::new("/run/netns").join(&pod.netns);
    let output = node_ns
        .run(|| -> std::io::Result<std::process::Output> {
            let mut child = Command::new(&plugin)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", &pod.container_id)
                .env("CNI_NETNS", &netns_path)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", bin_dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin.write_all(config.as_bytes())?;
            drop(stdin);
            child.wait_with_output()
        })
        .map_err(ns_err(format!(
            "entering {} to run the CNI plugin",
            node_ns.name
        )))?
        .map_err(|e| cni_err(format!("running {}: {e}", plugin.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let msg = serde_json::from_str::<serde_json::Value>(&stdout)
            .ok()
            .map(|v| {
                let msg = v["msg"].as_str().unwrap_or("").to_string();
                let details = v["details"].as_str().unwrap_or("");
                let code = &v["code"];
                if details.is_empty() {
                    format!("code {code}: {msg}")
                } else {
                    format!("code {code}: {msg}: {details}")
                }
            })
            .unwrap_or_else(|| stdout.trim().to_string());
        return Err(cni_err(format!(
            "{} ({}){}",
            msg,
            output.status,
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!("; stderr: {}", stderr.trim())
            }
        )));
    }
    Ok(stdout)
}

/// What a CNI ADD gave a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attached {
    pub ipv4: Option<Ipv4Net>,
    /// The IPv4 gateway (the node's cni0 address).
    pub gateway: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Net>,
}

/// The pod's addresses (and IPv4 gateway) from a CNI 0.3.x/0.4.0/1.x result
/// (`ips[].address`, `ips[].gateway`) or a 0.2.0 result (`ip4`, `ip6`).
pub(crate) fn parse_add_result(stdout: &str) -> std::result::Result<Attached, String> {
    let v: serde_json::Value = serde_json::from_str(stdout)
        .map_err(|e| format!("result is not JSON ({e}): {stdout:?}"))?;
    let mut a = Attached {
        ipv4: None,
        gateway: None,
        ipv6: None,
    };
    let mut take = |addr: &serde_json::Value, gw: &serde_json::Value| {
        let Some(s) = addr.as_str() else { return };
        if let Ok(n) = s.parse::<Ipv4Net>() {
            if a.ipv4.is_none() {
                a.ipv4 = Some(n);
                a.gateway = gw.as_str().and_then(|g| g.parse().ok());
            }
        } else if let Ok(n) = s.parse::<Ipv6Net>() {
            if a.ipv6.is_none() {
                a.ipv6 = Some(n);
            }
        }
    };
    if let Some(ips) = v["ips"].as_array() {
        for ip in ips {
            take(&ip["address"], &ip["gateway"]);
        }
    }
    take(&v["ip4"]["ip"], &v["ip4"]["gateway"]);
    take(&v["ip6"]["ip"], &v["ip6"]["gateway"]);
    if a.ipv4.is_none() && a.ipv6.is_none() {
        return Err(format!("result holds no address: {stdout}"));
    }
    Ok(a)
}

impl Lab {
    pub(super) fn attach_pod(&self, i: usize) -> Result<Attached> {
        let pod = &self.state.pods[i];
        let node = self.node(&pod.node)?;
        NetNs::add(&pod.netns)
            .map_err(ns_err(format!("creating the namespace of {}", pod.name)))?;
        let node_ns =
            NetNs::open(&node.netns).map_err(ns_err(format!("opening {}", node.netns)))?;
        let config = cni_config(&self.node_dir(&node.name), &self.subnet_file(&node.name));
        let out = invoke(
            "ADD",
            &node_ns,
            &self.state.bin_dir,
            pod,
            &node.name,
            &config,
        )?;
        parse_add_result(&out).map_err(|detail| LabError::Cni {
            command: "ADD",
            pod: pod.name.clone(),
            node: node.name.clone(),
            detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_the_manifests_plus_lab_paths() {
        let c = cni_config(
            Path::new("/run/flannel-lab/x/k8s-node1"),
            Path::new("/s.env"),
        );
        let v: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["name"], "cbr0");
        assert_eq!(v["type"], "flannel");
        assert_eq!(v["delegate"]["hairpinMode"], true);
        assert_eq!(v["delegate"]["isDefaultGateway"], true);
        assert_eq!(v["subnetFile"], "/s.env");
        assert_eq!(v["dataDir"], "/run/flannel-lab/x/k8s-node1/cni");
        assert_eq!(v["ipam"]["dataDir"], "/run/flannel-lab/x/k8s-node1/ipam");
    }

    #[test]
    fn results_of_each_shape_parse() {
        let r031 = r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.244.1.96/24","gateway":"10.244.1.1","interface":0}],"dns":{}}"#;
        let a = parse_add_result(r031).unwrap();
        assert_eq!(a.ipv4.unwrap().to_string(), "10.244.1.96/24");
        assert_eq!(a.gateway, Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(a.ipv6, None);
        let dual = r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00:10:244:1::2/64","gateway":"fd00:10:244:1::1"},{"address":"10.244.1.2/24","gateway":"10.244.1.1"}]}"#;
        let a = parse_add_result(dual).unwrap();
        assert_eq!(a.ipv4.unwrap().to_string(), "10.244.1.2/24");
        assert_eq!(a.ipv6.unwrap().to_string(), "fd00:10:244:1::2/64");
        let r020 = r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.244.2.66/24","gateway":"10.244.2.1"}}"#;
        assert_eq!(
            parse_add_result(r020).unwrap().ipv4.unwrap().to_string(),
            "10.244.2.66/24"
        );
        assert!(parse_add_result(r#"{"ips":[]}"#).is_err());
        assert!(parse_add_result("nope").is_err());
    }
}
