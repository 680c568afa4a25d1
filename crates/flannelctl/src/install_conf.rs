//! `install-conf SRC DEST`: upstream's installer of the DaemonSet's
//! `install-cni` init container, same interface. Copies SRC to DEST
//! atomically (a temporary file `.<name>.tmp` beside DEST, fsync, the
//! source's permission bits, rename; see `flannelctl::install`). Exactly two
//! arguments, else the usage on stderr and exit 1; a failure is one line on
//! stderr and exit 1. No async runtime, no validation of the content (that
//! is `flannelctl install-cni`).

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use flannelctl::install::{install_file, Mode};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let [_, src, dest] = args.as_slice() else {
        let argv0 = args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_else(|| "install-conf".into());
        eprintln!("usage: {argv0} <src> <dest>");
        return ExitCode::FAILURE;
    };
    match install_file(Path::new(src), Path::new(dest), Mode::FromSource) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error installing {:?}: {e}", Path::new(src));
            ExitCode::FAILURE
        }
    }
}
