//! deploy/kube-flannel.yml and deploy/Containerfile against what the
//! binaries accept: flanneld's own clap flags and environment, the CNI
//! plugin's conflist parser, flannel-core's net-conf parser, the health
//! endpoint's paths, and the files the image provides. No root needed.
//!
//! Here in flannelctl because it is the one crate that sees all of them:
//! flanneld's `Flags`, the CNI plugin's parser (flannel-cni's library) and
//! the installers (`install-conf`, `install-cni`) the manifest's init
//! containers run.
//!
//! [`check`] collects every problem instead of stopping at the first, and
//! the tests that edit a copy of the manifest show each check can fail.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use common::TempDir;
use flannel_core::wire;
use flanneld::flags::{Flags, KubeEnv};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let p = repo_root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The `[[bin]]` names of every workspace crate (what `cargo build --bins` produces).
fn workspace_bins() -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    for entry in std::fs::read_dir(repo_root().join("crates")).unwrap() {
        let toml = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&toml) else {
            continue;
        };
        let mut in_bin = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if let (true, Some(v)) = (in_bin, line.strip_prefix("name = ")) {
                bins.insert(v.trim_matches('"').to_string());
            }
        }
    }
    bins
}

/// What the runtime stage of the Containerfile provides: destination path
/// to the binary copied there (`COPY --from=builder /out/BIN DEST`), the
/// binaries the builder stage copies to /out, the Debian packages installed
/// in the last stage, and the ENTRYPOINT.
#[derive(Debug, Default)]
struct Image {
    files: BTreeMap<String, String>,
    built: BTreeSet<String>,
    packages: BTreeSet<String>,
    entrypoint: Option<Vec<String>>,
}

fn parse_containerfile(text: &str) -> Image {
    let mut img = Image::default();
    // Continuation lines joined, comments dropped.
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    for l in &logical {
        let words: Vec<&str> = l.split_whitespace().collect();
        match words.first().copied() {
            // Only the last stage's packages are in the image.
            Some("FROM") => img.packages.clear(),
            Some("COPY") if words.get(1) == Some(&"--from=builder") && words.len() == 4 => {
                if let Some(bin) = words[2].strip_prefix("/out/") {
                    img.files.insert(words[3].to_string(), bin.to_string());
                }
            }
            Some("RUN") => {
                if let Some(at) = l.find("for b in ") {
                    let list = &l[at + "for b in ".len()..];
                    let list = &list[..list.find(';').unwrap_or(list.len())];
                    img.built.extend(list.split_whitespace().map(String::from));
                }
                if let Some(at) = l.find("apt-get install") {
                    let rest = &l[at..];
                    let rest = &rest[..rest.find("&&").unwrap_or(rest.len())];
                    img.packages.extend(
                        rest.split_whitespace()
                            .skip(2)
                            .filter(|w| !w.starts_with('-'))
                            .map(String::from),
                    );
                }
            }
            Some("ENTRYPOINT") => {
                let json = l["ENTRYPOINT".len()..].trim();
                img.entrypoint = serde_json::from_str(json).ok();
            }
            _ => {}
        }
    }
    img
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| s(x).to_string()).collect())
        .unwrap_or_default()
}

fn first_line(e: &clap::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Every environment variable flanneld's clap flags read (`FLANNELD_*`).
fn clap_env_vars() -> BTreeSet<String> {
    Flags::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// The mount path of volume `name` in `container`.
fn mount_of(container: &Value, name: &str) -> Option<String> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| s(&m["name"]) == name)
        .map(|m| s(&m["mountPath"]).to_string())
}

/// Whether `path` lies in a volume mounted into `container`; the volume's name.
fn mounted_volume(container: &Value, path: &str) -> Option<String> {
    container["volumeMounts"].as_array()?.iter().find_map(|m| {
        let mp = s(&m["mountPath"]).trim_end_matches('/');
        (Path::new(path).starts_with(mp) && !mp.is_empty()).then(|| s(&m["name"]).to_string())
    })
}

/// Every problem of `manifest` against the binaries and `containerfile`.
fn check(manifest: &str, containerfile: &str) -> Vec<String> {
    let mut p = Vec::new();
    let docs: Vec<Value> = match serde_saphyr::from_multiple(manifest) {
        Ok(d) => d,
        Err(e) => return vec![format!("the manifest is not YAML: {e}")],
    };
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| s(&d["kind"]) == kind && s(&d["metadata"]["name"]) == name)
    };
    let img = parse_containerfile(containerfile);
    let bins = workspace_bins();

    // The image: every copied binary is one the workspace builds and the builder copies out.
    for (dest, bin) in &img.files {
        if !bins.contains(bin) {
            p.push(format!(
                "Containerfile copies {bin} to {dest}, which no crate builds"
            ));
        }
        if !img.built.contains(bin) {
            p.push(format!(
                "Containerfile copies /out/{bin}, which the builder stage does not put there"
            ));
        }
    }
    let provides = |path: &str, bin: &str| img.files.get(path).map(String::as_str) == Some(bin);
    for (path, bin) in [
        ("/opt/bin/flanneld", "flanneld"),
        ("/opt/bin/install-conf", "install-conf"),
        (wire::IMAGE_CNI_PLUGIN, wire::CNI_PLUGIN_TYPE),
    ] {
        if !provides(path, bin) {
            p.push(format!("Containerfile does not put {bin} at {path}"));
        }
    }
    if img.entrypoint.as_deref() != Some(&["/opt/bin/flanneld".to_string()][..]) {
        p.push(format!(
            "Containerfile ENTRYPOINT is {:?}, not [\"/opt/bin/flanneld\"]",
            img.entrypoint
        ));
    }
    // flanneld runs iptables-save/-restore, ip6tables-save/-restore and nft.
    for pkg in ["iptables", "nftables"] {
        if !img.packages.contains(pkg) {
            p.push(format!(
                "Containerfile's runtime stage does not install {pkg}"
            ));
        }
    }

    // RBAC: exactly what the Kubernetes store needs.
    match find("ClusterRole", "flannel") {
        None => p.push("no ClusterRole flannel".into()),
        Some(role) => {
            let mut got = BTreeSet::new();
            for rule in role["rules"].as_array().into_iter().flatten() {
                for g in strings(&rule["apiGroups"]) {
                    for r in strings(&rule["resources"]) {
                        for v in strings(&rule["verbs"]) {
                            got.insert(format!("{g}/{r}:{v}"));
                        }
                    }
                }
            }
            let want: BTreeSet<String> = [
                "/pods:get",
                "/nodes:get",
                "/nodes:list",
                "/nodes:watch",
                "/nodes/status:patch",
            ]
            .into_iter()
            .map(String::from)
            .collect();
            if got != want {
                p.push(format!(
                    "ClusterRole flannel grants {got:?}, expected exactly {want:?}"
                ));
            }
        }
    }
    match find("ClusterRoleBinding", "flannel") {
        Some(b)
            if s(&b["roleRef"]["name"]) == "flannel"
                && b["subjects"].as_array().is_some_and(|a| {
                    a.iter().any(|x| {
                        s(&x["kind"]) == "ServiceAccount"
                            && s(&x["name"]) == "flannel"
                            && s(&x["namespace"]) == "kube-flannel"
                    })
                }) => {}
        _ => p.push("no ClusterRoleBinding flannel of ServiceAccount kube-flannel/flannel".into()),
    }
    if find("ServiceAccount", "flannel").is_none() || find("Namespace", "kube-flannel").is_none() {
        p.push("no Namespace kube-flannel or ServiceAccount flannel".into());
    }

    // The ConfigMap: what flanneld and the CNI plugin parse.
    let cm = find("ConfigMap", "kube-flannel-cfg");
    let cm_keys: BTreeSet<String> = cm
        .and_then(|c| c["data"].as_object())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    match cm.map(|c| &c["data"]) {
        None => p.push("no ConfigMap kube-flannel-cfg".into()),
        Some(data) => {
            if let Err(e) = flannel_core::config::parse(s(&data["net-conf.json"])) {
                p.push(format!("ConfigMap net-conf.json: {e}"));
            }
            match flannel_cni::config::parse_conflist(s(&data["cni-conf.json"]).as_bytes()) {
                Err(e) => p.push(format!("ConfigMap cni-conf.json: {e}")),
                Ok(l) if l.flannel_index != 0 => p.push(format!(
                    "ConfigMap cni-conf.json: the first plugin is {:?}, not flannel",
                    l.plugin_types[0]
                )),
                Ok(_) => {}
            }
        }
    }

    // The DaemonSet.
    let Some(ds) = find("DaemonSet", "kube-flannel-ds") else {
        p.push("no DaemonSet kube-flannel-ds".into());
        return p;
    };
    let pod = &ds["spec"]["template"]["spec"];
    if s(&pod["serviceAccountName"]) != "flannel" || pod["hostNetwork"] != Value::Bool(true) {
        p.push("the DaemonSet's pods must run as ServiceAccount flannel with hostNetwork".into());
    }
    let volume_host_path = |name: &str| {
        pod["volumes"].as_array().and_then(|vs| {
            vs.iter()
                .find(|v| s(&v["name"]) == name)
                .map(|v| s(&v["hostPath"]["path"]).to_string())
        })
    };
    let by_name = |list: &Value, name: &str| -> Option<Value> {
        list.as_array()?
            .iter()
            .find(|c| s(&c["name"]) == name)
            .cloned()
    };
    let image_path = |cmd: &str, who: &str, p: &mut Vec<String>| {
        if cmd.starts_with('/') && !img.files.contains_key(cmd) {
            p.push(format!(
                "{who} runs {cmd}, which the Containerfile does not provide"
            ));
        }
    };

    // Init container install-cni-plugin: cp -f /flannel <cni-plugin mount>/flannel.
    match by_name(&pod["initContainers"], "install-cni-plugin") {
        None => p.push("no init container install-cni-plugin".into()),
        Some(c) => {
            let cmd = [strings(&c["command"]), strings(&c["args"])].concat();
            let dir = mount_of(&c, "cni-plugin").unwrap_or_default();
            let want = [
                "cp",
                "-f",
                wire::IMAGE_CNI_PLUGIN,
                &format!("{}/flannel", dir.trim_end_matches('/')),
            ];
            if cmd != want {
                p.push(format!(
                    "install-cni-plugin runs {cmd:?}, expected {want:?}"
                ));
            }
            if volume_host_path("cni-plugin").as_deref() != Some(wire::CNI_BIN_DIR)
                || dir != wire::CNI_BIN_DIR
            {
                p.push(format!(
                    "install-cni-plugin must copy into the host's {}",
                    wire::CNI_BIN_DIR
                ));
            }
            image_path(wire::IMAGE_CNI_PLUGIN, "install-cni-plugin", &mut p);
        }
    }
    // Init container install-cni: /opt/bin/install-conf SRC DEST.
    match by_name(&pod["initContainers"], "install-cni") {
        None => p.push("no init container install-cni".into()),
        Some(c) => {
            let cmd = strings(&c["command"]);
            let args = strings(&c["args"]);
            if cmd != ["/opt/bin/install-conf"] || args.len() != 2 {
                p.push(format!(
                    "install-cni runs {cmd:?} {args:?}, expected /opt/bin/install-conf SRC DEST"
                ));
            } else {
                image_path(&cmd[0], "install-cni", &mut p);
                let src_key = Path::new(&args[0])
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if mounted_volume(&c, &args[0]).as_deref() != Some("flannel-cfg")
                    || !cm_keys.contains(&src_key)
                {
                    p.push(format!(
                        "install-cni's source {} is not a key of the mounted ConfigMap",
                        args[0]
                    ));
                }
                let dest_dir = Path::new(&args[1])
                    .parent()
                    .map(|d| d.display().to_string());
                if mounted_volume(&c, &args[1]).as_deref() != Some("cni")
                    || volume_host_path("cni") != dest_dir
                    || args[1] != wire::CNI_CONFLIST
                {
                    p.push(format!(
                        "install-cni's destination {} is not the host's {}",
                        args[1],
                        wire::CNI_CONFLIST
                    ));
                }
            }
        }
    }

    // The daemon.
    let Some(c) = by_name(&pod["containers"], "kube-flannel") else {
        p.push("no container kube-flannel".into());
        return p;
    };
    let cmd = strings(&c["command"]);
    if cmd != ["/opt/bin/flanneld"] {
        p.push(format!(
            "kube-flannel runs {cmd:?}, expected /opt/bin/flanneld"
        ));
    } else {
        image_path(&cmd[0], "kube-flannel", &mut p);
    }
    let args = strings(&c["args"]);
    let flags = match Flags::try_parse_from(
        std::iter::once("flanneld".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(f) => Some(f),
        Err(e) => {
            p.push(format!(
                "flanneld refuses the manifest's args {args:?}: {}",
                first_line(&e)
            ));
            None
        }
    };
    let known = clap_env_vars();
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = s(&e["name"]).to_string();
        if !known.contains(&name) && !wire::KUBE_ENV_VARS.contains(&name.as_str()) {
            p.push(format!(
                "kube-flannel sets env {name}, which flanneld does not read"
            ));
        }
        // A fieldRef's value is known only in the cluster; any non-empty one will do.
        let value = match &e["value"] {
            Value::String(v) => v.clone(),
            Value::Null => format!("<{}>", s(&e["valueFrom"]["fieldRef"]["fieldPath"])),
            other => other.to_string(),
        };
        env.insert(name, value);
    }
    match KubeEnv::from_lookup(|k| env.get(k).cloned()) {
        Err(e) => p.push(format!("kube-flannel's environment: {e}")),
        Ok(k) => {
            if let Err(e) = k.node() {
                p.push(format!("kube-flannel's environment: {e}"));
            }
        }
    }
    for (name, value) in &env {
        // clap reads FLANNELD_* itself; the value is checked through its flag.
        let cmd = Flags::command();
        let Some(long) = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .and_then(|a| a.get_long())
        else {
            continue;
        };
        if let Err(e) = Flags::try_parse_from(["flanneld".to_string(), format!("--{long}={value}")])
        {
            p.push(format!(
                "kube-flannel's {name}={value:?}: {}",
                first_line(&e)
            ));
        }
    }
    if let Some(f) = &flags {
        // Health probes on flanneld's endpoint.
        let port_of = |v: &Value| -> Option<u64> {
            match v {
                Value::Number(n) => n.as_u64(),
                Value::String(name) => c["ports"]
                    .as_array()?
                    .iter()
                    .find(|p| s(&p["name"]) == name)?["containerPort"]
                    .as_u64(),
                _ => None,
            }
        };
        if f.healthz_port == 0 {
            p.push("kube-flannel runs without --healthz-port, but has probes".into());
        }
        for (probe, path) in [
            ("livenessProbe", wire::HEALTHZ_PATH),
            ("readinessProbe", wire::READYZ_PATH),
        ] {
            let get = &c[probe]["httpGet"];
            if s(&get["path"]) != path || port_of(&get["port"]) != Some(u64::from(f.healthz_port)) {
                p.push(format!(
                    "{probe} asks {:?} on port {:?}; flanneld serves {path} on --healthz-port {}",
                    get["path"], get["port"], f.healthz_port
                ));
            }
        }
        // flanneld's files are where the volumes are.
        if mounted_volume(&c, &f.subnet_file.display().to_string()).as_deref() != Some("run") {
            p.push(format!(
                "{} is not on the run volume",
                f.subnet_file.display()
            ));
        }
        let conf = f.net_config_path.display().to_string();
        let conf_key = f
            .net_config_path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if mounted_volume(&c, &conf).as_deref() != Some("flannel-cfg")
            || !cm_keys.contains(&conf_key)
        {
            p.push(format!(
                "flanneld's --net-config-path {conf} is not a key of the mounted ConfigMap"
            ));
        }
    }
    let caps = strings(&c["securityContext"]["capabilities"]["add"]);
    for cap in ["NET_ADMIN", "NET_RAW"] {
        if !caps.iter().any(|x| x == cap) {
            p.push(format!("kube-flannel lacks capability {cap}"));
        }
    }
    if mount_of(&c, "xtables-lock").as_deref() != Some("/run/xtables.lock") {
        p.push("kube-flannel does not mount the host's /run/xtables.lock".into());
    }
    // Every container runs our one image.
    let images: BTreeSet<String> = pod["initContainers"]
        .as_array()
        .into_iter()
        .chain(pod["containers"].as_array())
        .flatten()
        .map(|c| s(&c["image"]).to_string())
        .collect();
    if images.len() != 1 || images.iter().any(|i| i.contains("flannel-io/")) {
        p.push(format!(
            "the containers run {images:?}, expected flannel-rs's one image"
        ));
    }
    p
}

fn manifest() -> String {
    read("deploy/kube-flannel.yml")
}

fn containerfile() -> String {
    read("deploy/Containerfile")
}

#[test]
fn the_manifest_matches_the_binaries_and_the_image() {
    let problems = check(&manifest(), &containerfile());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_image_holds_what_the_manifest_runs() {
    let img = parse_containerfile(&containerfile());
    let want: BTreeMap<String, String> = [
        ("/opt/bin/flanneld", "flanneld"),
        ("/opt/bin/install-conf", "install-conf"),
        ("/opt/bin/flannelctl", "flannelctl"),
        ("/flannel", "flannel"),
    ]
    .into_iter()
    .map(|(d, b)| (d.to_string(), b.to_string()))
    .collect();
    assert_eq!(img.files, want);
    let bins = workspace_bins();
    assert!(want.values().all(|b| bins.contains(b)), "{bins:?}");
}

/// Edits of a copy of the manifest (or the Containerfile) that each break
/// one thing: the check must name it, so it cannot pass vacuously.
#[test]
fn a_broken_copy_fails_the_check() {
    let m = manifest();
    let cf = containerfile();
    let cases: &[(&str, &str, &str, &str)] = &[
        // (what, replace this, with this, expected problem)
        ("unknown flag", "- --healthz-port=8081", "- --healthz-port=8081\n        - --no-such-flag", "--no-such-flag"),
        ("flag value", "- --healthz-port=8081", "- --healthz-port=eighty", "refuses the manifest's args"),
        (
            "unknown env var",
            "        - name: EVENT_QUEUE_DEPTH\n",
            "        - name: FLANNELD_NO_SUCH_FLAG\n          value: \"1\"\n        - name: EVENT_QUEUE_DEPTH\n",
            "env FLANNELD_NO_SUCH_FLAG",
        ),
        ("unknown env var", "        - name: POD_NAME\n", "        - name: FLANNEL_POD\n          value: x\n        - name: POD_NAME\n", "env FLANNEL_POD"),
        ("bad knob", "value: \"5000\"", "value: \"lots\"", "EVENT_QUEUE_DEPTH=\"lots\""),
        (
            "no node identity",
            "        - name: POD_NAMESPACE\n",
            "        - name: FLANNELD_IP_MASQ\n",
            "POD_NAME and POD_NAMESPACE must be set",
        ),
        ("bad FLANNELD_ value", "        - name: POD_NAME\n", "        - name: FLANNELD_IPTABLES_RESYNC\n          value: soon\n        - name: POD_NAME\n", "FLANNELD_IPTABLES_RESYNC=\"soon\""),
        ("readiness path", "path: /readyz", "path: /ready", "readinessProbe"),
        ("probe port", "--healthz-port=8081", "--healthz-port=8082", "livenessProbe"),
        ("extra verb", "  - patch\n", "  - patch\n  - update\n", "ClusterRole flannel grants"),
        ("install-conf args", "        - /etc/cni/net.d/10-flannel.conflist\n", "        - /etc/cni/net.d/10-flannel.conflist\n        - extra\n", "install-cni runs"),
        ("plugin copy", "- /flannel\n", "- /flannel-cni\n", "install-cni-plugin runs"),
        ("conflist type", "\"type\": \"flannel\",", "\"type\": \"flanel\",", "cni-conf.json"),
        ("net-conf", "\"Network\": \"10.244.0.0/16\"", "\"Network\": \"10.244.0.0/33\"", "net-conf.json"),
        ("capability", "add: [\"NET_ADMIN\", \"NET_RAW\"]", "add: [\"NET_ADMIN\"]", "NET_RAW"),
        ("image", "image: ghcr.io/flannel-rs/flannel-rs:v0.1.0\n        command:\n        - cp", "image: ghcr.io/flannel-io/flannel-cni-plugin:v1.9.1-flannel3\n        command:\n        - cp", "flannel-rs's one image"),
        ("not YAML", "kind: Namespace", "kind: [Namespace", "not YAML"),
    ];
    for (what, from, to, want) in cases {
        assert!(m.contains(from), "{what}: {from:?} is not in the manifest");
        let problems = check(&m.replacen(from, to, 1), &cf);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{what}: expected a problem containing {want:?}, got {problems:#?}"
        );
    }
    // flannel second in the conflist.
    let swapped = m
        .replacen("\"type\": \"flannel\",", "\"type\": \"tuning\",", 1)
        .replacen("\"type\": \"portmap\",", "\"type\": \"flannel\",", 1);
    let problems = check(&swapped, &cf);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("the first plugin is \"tuning\", not flannel")),
        "{problems:#?}"
    );
    let cf_cases: &[(&str, &str, &str, &str)] = &[
        (
            "no /flannel",
            "COPY --from=builder /out/flannel /flannel\n",
            "",
            "does not put flannel at /flannel",
        ),
        (
            "wrong binary",
            "/out/install-conf /opt/bin/install-conf",
            "/out/flannelctl /opt/bin/install-conf",
            "does not put install-conf at /opt/bin/install-conf",
        ),
        (
            "not built",
            "for b in flanneld flannel flannelctl install-conf;",
            "for b in flanneld flannel flannelctl;",
            "does not put there",
        ),
        (
            "no such crate binary",
            "/out/flannelctl /opt/bin/flannelctl",
            "/out/flannelctl2 /opt/bin/flannelctl",
            "which no crate builds",
        ),
        (
            "entrypoint",
            "ENTRYPOINT [\"/opt/bin/flanneld\"]",
            "ENTRYPOINT [\"/bin/sh\"]",
            "ENTRYPOINT",
        ),
        (
            "no nft",
            "iptables nftables ca-certificates",
            "iptables ca-certificates",
            "does not install nftables",
        ),
    ];
    for (what, from, to, want) in cf_cases {
        assert!(
            cf.contains(from),
            "{what}: {from:?} is not in the Containerfile"
        );
        let problems = check(&m, &cf.replacen(from, to, 1));
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{what}: expected a problem containing {want:?}, got {problems:#?}"
        );
    }
}

/// The manifest's init container commands work with our installers: run
/// install-conf with the manifest's arguments, moved into a temporary root.
#[test]
fn install_conf_runs_with_the_manifests_arguments() {
    let docs: Vec<Value> = serde_saphyr::from_multiple(&manifest()).unwrap();
    let ds = docs.iter().find(|d| s(&d["kind"]) == "DaemonSet").unwrap();
    let init = &ds["spec"]["template"]["spec"]["initContainers"];
    let c = init
        .as_array()
        .unwrap()
        .iter()
        .find(|c| s(&c["name"]) == "install-cni")
        .unwrap();
    let args = strings(&c["args"]);
    let cm = docs.iter().find(|d| s(&d["kind"]) == "ConfigMap").unwrap();
    let root = TempDir::new("flannelctl-deploy");
    let in_root = |p: &str| root.join(p.trim_start_matches('/'));
    let (src, dest) = (in_root(&args[0]), in_root(&args[1]));
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&src, s(&cm["data"]["cni-conf.json"])).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_install-conf"))
        .arg(&src)
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = std::fs::read(&dest).unwrap();
    let l = flannel_cni::config::parse_conflist(&installed).unwrap();
    assert_eq!(l.plugin_types, vec!["flannel", "portmap"]);
}
