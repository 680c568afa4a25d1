//! The CNI_* environment of a call (`verbs::CniEnv::from_vars`): the input
//! is `VAR=value` lines (the command's variables as a runtime sets them).
//!
//! Asserts: the variables are accepted or refused with the spec code 4
//! (invalid environment variables); an accepted CNI_CONTAINERID and
//! CNI_IFNAME, which name files under the plugin's dataDir and the IPAM
//! directory and a link in the pod, cannot leave those directories and are
//! names the kernel takes (1 to 15 bytes, no '/', ':', blanks, not '.' or
//! '..'); ADD and CHECK have a CNI_NETNS.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use flannel_cni::spec::code;
use flannel_cni::verbs::CniEnv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let command = lines.next().unwrap_or_default();
    let vars: HashMap<String, String> = lines
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for cmd in [command, "ADD", "DEL", "CHECK", "GC"] {
        match CniEnv::from_vars(cmd, |name| vars.get(name).cloned()) {
            Err(e) => assert_eq!(e.code, code::INVALID_ENV, "{cmd}: {}", e.msg),
            Ok(env) => {
                assert_eq!(env.command, cmd);
                if matches!(cmd, "ADD" | "DEL" | "CHECK") {
                    let base = Path::new("/var/lib/cni/flannel");
                    for name in [&env.container_id, &env.ifname] {
                        let p = base.join(name);
                        assert!(
                            p.parent() == Some(base),
                            "{name:?} leaves {}",
                            base.display()
                        );
                        let p = base.join(format!("{}-{}", env.container_id, env.ifname));
                        assert!(p.parent() == Some(base));
                    }
                    let ifn = &env.ifname;
                    assert!(!ifn.is_empty() && ifn.len() <= 15 && ifn != "." && ifn != "..");
                    assert!(
                        !ifn.chars()
                            .any(|c| c == '/' || c == ':' || c.is_whitespace()),
                        "{ifn:?}"
                    );
                    assert!(!env.container_id.is_empty());
                }
                if matches!(cmd, "ADD" | "CHECK") {
                    assert!(!env.netns.is_empty());
                }
            }
        }
    }
});
