//! The CNI plugin's network configuration on stdin (`NetConf::parse`), the
//! bridge config rendered from it (`render_delegate`, `BridgeConf`), a
//! conflist as installers check it (`parse_conflist`), and VERSION.
//!
//! Asserts: the input either parses or gives an error whose CNI spec code is
//! one the spec defines for configuration problems (1 incompatible version,
//! 6 decoding failure, 7 invalid config), printed as the spec's error
//! object; a parsed config has a supported version and a network name that
//! cannot leave the IPAM directory; the rendered bridge config is read back
//! or refused with code 7, and its ranges lie in subnet.env's subnet;
//! VERSION always answers with a supported version.
#![no_main]

use std::path::Path;

use flannel_cni::config::{parse_conflist, BridgeConf, ConfigError, NetConf};
use flannel_cni::spec::{self, code, CniError, Version};
use flannel_cni::verbs;
use flannel_core::subnet_env::SubnetEnv;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

fn config_error(e: ConfigError) {
    let e = CniError::from(e);
    assert!(
        [
            code::INCOMPATIBLE_VERSION,
            code::DECODING_FAILURE,
            code::INVALID_CONFIG
        ]
        .contains(&e.code),
        "config error with code {}: {}",
        e.code,
        e.msg
    );
    assert!(!e.msg.is_empty());
    let json = e.to_json(spec::LATEST_VERSION);
    assert_eq!(json["code"].as_u64(), Some(u64::from(e.code)));
    assert!(json["msg"].is_string());
}

fn name_stays_below(base: &Path, name: &str) {
    let dir = base.join(name);
    assert!(
        dir.starts_with(base) && dir.parent() == Some(base),
        "{name:?} leaves {}",
        base.display()
    );
    assert!(!name.is_empty() && name != "." && name != ".." && !name.contains('/'));
}

fuzz_target!(|data: &[u8]| {
    let v = verbs::run("VERSION", data)
        .expect("VERSION never fails")
        .expect("VERSION answers");
    let answered = v["cniVersion"].as_str().expect("cniVersion");
    assert!(Version::parse(answered).is_some_and(|v| v.is_supported()));

    match NetConf::parse(data) {
        Err(e) => config_error(e),
        Ok(conf) => {
            assert!(conf.version.is_supported());
            assert_eq!(Version::parse(&conf.cni_version), Some(conf.version));
            if let Ok(dir) = conf.ipam_network_dir() {
                name_stays_below(
                    dir.parent().expect("a network dir has a parent"),
                    &conf.name,
                );
            }
            let env = SubnetEnv::parse(ENV).expect("sample subnet.env");
            match conf.render_delegate(&env) {
                Err(e) => config_error(e),
                Ok(rendered) => match BridgeConf::from_rendered(&rendered) {
                    Err(e) => {
                        let e = CniError::from(e);
                        assert_eq!(e.code, code::INVALID_CONFIG, "{}", e.msg);
                    }
                    Ok(b) => {
                        assert_eq!(b.name, conf.name);
                        assert!(
                            !b.bridge.is_empty() && b.bridge.len() <= 15 && !b.bridge.contains('/')
                        );
                        name_stays_below(b.ipam.network_dir.parent().expect("parent"), &b.name);
                        for r in b.ipam.range_sets.iter().flatten() {
                            assert!(
                                r.subnet.contains(&r.range_start)
                                    && r.subnet.contains(&r.range_end)
                            );
                            assert!(r.subnet.contains(&r.gateway) && r.range_start <= r.range_end);
                        }
                        // Saved and read back (DEL reads the saved config).
                        let saved: Value =
                            serde_json::from_slice(&serde_json::to_vec(&rendered).unwrap())
                                .unwrap();
                        assert_eq!(BridgeConf::from_rendered(&saved).ok(), Some(b));
                    }
                },
            }
        }
    }

    match parse_conflist(data) {
        Err(e) => config_error(e),
        Ok(list) => {
            assert_eq!(list.plugin_types[list.flannel_index], "flannel");
            assert_eq!(list.flannel.name, list.name);
        }
    }
});
