//! `flannelctl lab exec`: a command run inside one of the lab's namespaces.

use std::ffi::OsString;

use super::{io_err, ns_err, require_root, Lab, LabError, Result};

/// `flannelctl lab exec TARGET -- CMD...`: runs CMD inside the namespace of
/// a node, a pod or `underlay` (like `ip netns exec NAME-TARGET CMD`) with
/// the terminal's stdio; returns its exit code (128 + signal when killed).
pub fn exec(name: &str, target: &str, argv: &[OsString]) -> Result<i32> {
    require_root()?;
    let lab = Lab::open(name)?;
    let Some((program, args)) = argv.split_first() else {
        return Err(LabError::InvalidOption {
            option: "CMD",
            reason: "give the command to run after `--`, e.g. `-- ip route`".to_string(),
        });
    };
    let ns = lab.netns(target)?;
    let status = ns
        .run(|| std::process::Command::new(program).args(args).status())
        .map_err(ns_err(format!("entering {target}")))?
        .map_err(io_err(format!("running {}", program.to_string_lossy())))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
