//! subnet.env on disk: written atomically so the CNI plugin, which may read
//! it at any moment, sees either the old or the new file, never a torn one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of reading or writing subnet.env, with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SubnetFileError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SubnetFileError + 'a {
    move |source| SubnetFileError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` atomically: the parent directory is created,
/// the data goes to a temporary file in the same directory (same filesystem,
/// so `rename(2)` is atomic), is fsynced, renamed over `path`, and the
/// directory is fsynced so the rename survives a crash. Mode 0644, as upstream.
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), SubnetFileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "subnet.env".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(contents.as_bytes())
            .map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename into place", path))?;
        // Best effort: some filesystems refuse fsync on a directory handle.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads the file; `Ok(None)` when it does not exist.
pub fn read(path: &Path) -> Result<Option<String>, SubnetFileError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "flanneld-subnet-file-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn creates_directories_and_replaces_content() {
        let t = TempDir::new();
        let p = t.0.join("run/flannel/subnet.env");
        assert_eq!(read(&p).unwrap(), None);
        write_atomic(&p, "A=1\n").unwrap();
        assert_eq!(read(&p).unwrap().as_deref(), Some("A=1\n"));
        write_atomic(&p, "A=2\n").unwrap();
        assert_eq!(read(&p).unwrap().as_deref(), Some("A=2\n"));
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["subnet.env"]);
    }

    #[test]
    fn error_names_the_path() {
        let t = TempDir::new();
        fs::create_dir_all(&t.0).unwrap();
        // A directory where the file should go: rename must fail.
        let p = t.0.join("subnet.env");
        fs::create_dir_all(p.join("x")).unwrap();
        let e = write_atomic(&p, "A=1\n").unwrap_err().to_string();
        assert!(e.contains("subnet.env"), "{e}");
        let names: Vec<_> = fs::read_dir(&t.0).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary file removed after failure");
    }
}
