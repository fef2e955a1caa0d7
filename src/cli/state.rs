//! Resume state for tus uploads: one small JSON file per (tus endpoint, absolute path, size,
//! mtime), holding the upload URL. Re-running the same command finds it and continues; a file
//! that changed (other size or mtime) gets a new state and so a new upload.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{CliError, Kind, LocalFile};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// The tus endpoint the upload was created at.
    pub endpoint: String,
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u128,
    pub upload_url: String,
}

/// The state directory: `--state-dir`, else `$XDG_STATE_HOME/s3-upload-proxy`, else
/// `~/.local/state/s3-upload-proxy`.
pub fn default_dir() -> Option<PathBuf> {
    let nonempty = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    nonempty("XDG_STATE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| nonempty("HOME").map(|h| h.join(".local/state")))
        .map(|d| d.join("s3-upload-proxy"))
}

/// Where one file's state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    endpoint: String,
}

impl StateFile {
    pub fn new(dir: &Path, endpoint: &str, file: &LocalFile) -> Self {
        let mut h = Sha256::new();
        for field in [
            endpoint.as_bytes(),
            file.absolute.as_os_str().as_encoded_bytes(),
            file.size.to_string().as_bytes(),
            file.mtime_ns.to_string().as_bytes(),
        ] {
            // Length-prefixed, so no two tuples hash the same input.
            h.update((field.len() as u64).to_be_bytes());
            h.update(field);
        }
        let digest = h.finalize();
        let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            path: dir.join(format!("tus-{name}.json")),
            endpoint: endpoint.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The remembered upload URL, if there is a state for exactly this file. An unreadable or
    /// foreign state is ignored (and later overwritten): at worst the upload starts over.
    pub fn load(&self, file: &LocalFile) -> Option<String> {
        let text = std::fs::read(&self.path).ok()?;
        let st: UploadState = serde_json::from_slice(&text).ok()?;
        let same = st.endpoint == self.endpoint
            && st.path == file.absolute
            && st.size == file.size
            && st.mtime_ns == file.mtime_ns;
        same.then_some(st.upload_url)
    }

    /// Writes the state atomically (temporary file, then rename), readable by the owner only.
    pub fn save(&self, file: &LocalFile, upload_url: &str) -> Result<(), CliError> {
        let st = UploadState {
            endpoint: self.endpoint.clone(),
            path: file.absolute.clone(),
            size: file.size,
            mtime_ns: file.mtime_ns,
            upload_url: upload_url.to_owned(),
        };
        let fail = |e: std::io::Error| {
            CliError::new(
                Kind::Usage,
                format!("cannot write the resume state {}: {e}", self.path.display()),
            )
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir).map_err(fail)?;
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        let body = serde_json::to_vec_pretty(&st).map_err(|e| fail(std::io::Error::other(e)))?;
        write_private(&tmp, &body).map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        })
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(body)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, mtime_ns: u128) -> LocalFile {
        LocalFile {
            path: path.into(),
            absolute: path.into(),
            name: "x".into(),
            size,
            mtime_ns,
            content_type: "application/octet-stream".into(),
        }
    }

    #[test]
    fn state_round_trips_and_is_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let f = file("/data/a.bin", 10, 1);
        let s = StateFile::new(dir.path(), "http://h/files/", &f);
        assert_eq!(s.load(&f), None);
        s.save(&f, "http://h/files/abc").unwrap();
        assert_eq!(s.load(&f).as_deref(), Some("http://h/files/abc"));

        // Another size, mtime, path or endpoint is another state file.
        for other in [
            StateFile::new(dir.path(), "http://h/files/", &file("/data/a.bin", 11, 1)),
            StateFile::new(dir.path(), "http://h/files/", &file("/data/a.bin", 10, 2)),
            StateFile::new(dir.path(), "http://h/files/", &file("/data/b.bin", 10, 1)),
            StateFile::new(dir.path(), "http://g/files/", &f),
        ] {
            assert_ne!(other.path(), s.path());
        }
        // A state whose contents do not match the file is not used.
        let changed = file("/data/a.bin", 10, 1);
        let mut st: UploadState =
            serde_json::from_slice(&std::fs::read(s.path()).unwrap()).unwrap();
        st.size = 99;
        std::fs::write(s.path(), serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(s.load(&changed), None);

        s.remove();
        assert!(!s.path().exists());
        // Only the state remains in the directory: no temporary files left behind.
        s.save(&f, "u").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "state readable by others: {mode:o}");
    }

    #[test]
    fn garbage_state_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let f = file("/data/a.bin", 10, 1);
        let s = StateFile::new(dir.path(), "http://h/files/", &f);
        std::fs::write(s.path(), b"{not json").unwrap();
        assert_eq!(s.load(&f), None);
        s.save(&f, "u2").unwrap();
        assert_eq!(s.load(&f).as_deref(), Some("u2"));
    }
}
