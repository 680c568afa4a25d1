//! The chaos soak, short: a seeded one-minute run of `lab chaos` on a small
//! vxlan lab (two workers, the local store). Needs root and `cargo build
//! --workspace --bins` first; the lab (named `t<pid>n<counter>`) is taken
//! down by a guard on success, failure and panic.

mod common;

use std::time::Instant;

use common::*;
use flannelctl::lab::chaos::{FaultKind, ALL_KINDS};
use flannelctl::lab::{self, ChaosOptions, LabOptions};

#[test]
fn a_seeded_minute_of_chaos_loses_no_ping_it_must_not_and_repairs_everything() {
    let t0 = Instant::now();
    let mut lab = up_with(LabOptions {
        nodes: 2,
        ..LabOptions::default()
    });
    let name = lab.name().to_string();
    let mut printed = String::new();
    let report = lab
        .chaos(
            &ChaosOptions {
                minutes: 1.0,
                seed: Some(12),
            },
            &mut |line| {
                print!("{line}");
                printed.push_str(line);
            },
        )
        .unwrap_or_else(|e| panic!("lab chaos: {e}\n{printed}"));
    print!("{}", report.summary());
    // Every kind of fault ran at least once in the minute.
    let mut kinds: Vec<FaultKind> = report.plan.iter().map(|f| f.kind()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds, ALL_KINDS.to_vec(), "{printed}");
    // One line per fault and one for the baseline, each judged.
    assert_eq!(report.windows.len(), report.plan.len() + 1);
    assert!(report.windows.iter().all(|w| w.tally.sent > 0), "{printed}");
    assert!(report.ok(), "chaos failed:\n{}", report.render());
    // The lab is whole afterwards: a full matrix, every daemon healthy.
    let status = lab.status();
    assert!(status.healthy(), "{}", status.render());
    let m = lab.check().unwrap();
    assert!(m.all_ok(), "{}", m.render());
    drop(lab);
    assert!(
        lab::lab_namespaces(&name).is_empty(),
        "namespaces left: {:?}",
        lab::lab_namespaces(&name)
    );
    println!("chaos test took {:.1} s", t0.elapsed().as_secs_f64());
}
