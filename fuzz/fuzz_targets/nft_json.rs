//! `nft -j list table ip flannel-ipv4` output (`parse_nft_json`): nft's
//! JSON typed by the `nftables` crate, normalised to flannel's table.
//!
//! Asserts: a listing that parses, listed again (table, chains, rules and
//! the other objects, as nft would print them) parses to the same table
//! (round trip); planning against it never panics, and plans nothing only
//! when it equals the desired table.
#![no_main]

use std::borrow::Cow;

use flannel_core::lease::IpFamily;
use flannel_core::rules::{
    nft_desired, nft_plan, parse_nft_json, FamilyNets, NftActual, NftPlan, NftTable, RuleOptions,
};
use libfuzzer_sys::fuzz_target;
use nftables::schema::{NfListObject, NfObject, Nftables};

fn listing(t: &NftTable) -> String {
    let mut objects = vec![NfObject::ListObject(NfListObject::Table(t.table.clone()))];
    for c in &t.chains {
        objects.push(NfObject::ListObject(NfListObject::Chain(c.chain.clone())));
    }
    for c in &t.chains {
        for r in &c.rules {
            objects.push(NfObject::ListObject(NfListObject::Rule(r.clone())));
        }
    }
    objects.extend(t.other.iter().cloned().map(NfObject::ListObject));
    serde_json::to_string(&Nftables {
        objects: Cow::Owned(objects),
    })
    .expect("a listing serialises")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = parse_nft_json(text) else {
        return;
    };
    let again = listing(&table);
    let back = parse_nft_json(&again).unwrap_or_else(|e| panic!("{text}\n-> {again}: {e}"));
    assert_eq!(back, table, "{text}\n-> {again}");

    let nets = FamilyNets::v4(
        "10.244.0.0/16".parse().unwrap(),
        "10.244.1.0/24".parse().unwrap(),
    )
    .unwrap();
    let options = RuleOptions {
        masquerade: true,
        fully_random: true,
        forward: true,
        encap_port: Some(8472),
    };
    let want = nft_desired(IpFamily::V4, Some(nets), options).expect("rules wanted");
    let plan = nft_plan(IpFamily::V4, Some(&want), &NftActual::Listed(table.clone()));
    assert_eq!(plan == NftPlan::InLine, table == want);
    if let NftPlan::Rules(batch) = plan {
        serde_json::to_string(&batch).expect("the batch serialises");
    }
    assert!(matches!(
        nft_plan(IpFamily::V4, None, &NftActual::Listed(table)),
        NftPlan::Delete(_)
    ));
});
