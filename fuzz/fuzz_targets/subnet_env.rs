//! /run/flannel/subnet.env, as the CNI plugin reads it: `SubnetEnv::parse`.
//!
//! Asserts: a file that parses renders to a file that parses to the same
//! value (round trip), whose rendering is the same text; each family has
//! both variables and its subnet lies inside its network; the lease key it
//! names holds the subnet.
#![no_main]

use flannel_core::subnet_env::SubnetEnv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(env) = SubnetEnv::parse(text) else {
        return;
    };
    let rendered = env.render();
    let back =
        SubnetEnv::parse(&rendered).unwrap_or_else(|e| panic!("{text:?} -> {rendered:?}: {e}"));
    assert_eq!(back, env, "{text:?} -> {rendered:?}");
    assert_eq!(back.render(), rendered);
    assert!(env.mtu > 0);
    assert_eq!(env.network.is_some(), env.subnet.is_some());
    assert_eq!(env.ipv6_network.is_some(), env.ipv6_subnet.is_some());
    assert!(env.network.is_some() || env.ipv6_network.is_some());
    if let (Some(n), Some(s)) = (env.network, env.subnet) {
        assert!(n.contains(&s), "{text:?}");
    }
    if let (Some(n), Some(s)) = (env.ipv6_network, env.ipv6_subnet) {
        assert!(n.contains(&s), "{text:?}");
    }
    let key = env.lease_key().expect("a parsed subnet.env names a subnet");
    if let (Some(k), Some(s)) = (key.ipv4, env.subnet) {
        assert!(k.contains(&s.addr()) && k.prefix_len() == s.prefix_len());
    }
    if let (Some(k), Some(s)) = (key.ipv6, env.ipv6_subnet) {
        assert!(k.contains(&s.addr()) && k.prefix_len() == s.prefix_len());
    }
});
