//! The probe's pmem backing files: a fresh file per probe VM, made the way
//! `--backing` asks, in a scratch directory that is removed afterwards.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

const EXT4_SUPER_MAGIC: i64 = 0xef53;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// What kind of file backs the probe's pmem region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackingKind {
    /// A file on ext4 with every block written (zeros) and synced: a
    /// disk image that exists. Its pages are in the page cache, clean.
    Ext4,
    /// A sparse file on tmpfs (shmem): no disk behind it.
    Tmpfs,
    /// A sparse file (all holes) on the scratch directory's filesystem.
    Sparse,
}

impl BackingKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Tmpfs => "tmpfs",
            Self::Sparse => "sparse",
        }
    }

    /// Where the scratch directory goes when the user names none.
    fn default_parent(self) -> PathBuf {
        match self {
            Self::Tmpfs => PathBuf::from("/dev/shm"),
            Self::Ext4 | Self::Sparse => std::env::temp_dir(),
        }
    }
}

impl FromStr for BackingKind {
    type Err = BackingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ext4" => Ok(Self::Ext4),
            "tmpfs" => Ok(Self::Tmpfs),
            "sparse" => Ok(Self::Sparse),
            _ => Err(BackingError::UnknownKind(s.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("--backing {0}: expected ext4, tmpfs or sparse")]
    UnknownKind(String),
    #[error("--backing {kind}: {} is on a filesystem with magic {magic:#x}, not {kind}; pick a directory on {kind} with --dir", .dir.display())]
    WrongFilesystem {
        kind: &'static str,
        dir: PathBuf,
        magic: i64,
    },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackingError {
    let path = path.to_path_buf();
    move |source| BackingError::Io { what, path, source }
}

/// The filesystem magic of `dir` (statfs f_type).
pub fn filesystem_magic(dir: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` has room for a statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the struct.
    Ok(unsafe { st.assume_init() }.f_type)
}

/// A scratch directory for backing files, removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    kind: BackingKind,
    next: u32,
}

impl ScratchDir {
    /// Creates `pmemvm-probe-PID-N` under `parent` (or the kind's default)
    /// after checking that the filesystem fits the kind.
    pub fn new(kind: BackingKind, parent: Option<&Path>) -> Result<Self, BackingError> {
        let parent = parent.map_or_else(|| kind.default_parent(), Path::to_path_buf);
        let magic = filesystem_magic(&parent).map_err(io_err("cannot stat", &parent))?;
        let want = match kind {
            BackingKind::Ext4 => Some(EXT4_SUPER_MAGIC),
            BackingKind::Tmpfs => Some(TMPFS_MAGIC),
            BackingKind::Sparse => None,
        };
        if want.is_some_and(|w| w != magic) {
            return Err(BackingError::WrongFilesystem {
                kind: kind.name(),
                dir: parent,
                magic,
            });
        }
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = parent.join(format!("pmemvm-probe-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(io_err("cannot create", &path))?;
        Ok(Self {
            path,
            kind,
            next: 0,
        })
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path in the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A new backing file of `size` bytes, made as the kind says.
    pub fn create_file(&mut self, size: u64) -> Result<PathBuf, BackingError> {
        let path = self.path.join(format!("pmem{}.img", self.next));
        self.next += 1;
        create_backing_file(&path, self.kind, size)?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Creates (or replaces) `path` as a backing file of `size` bytes.
pub fn create_backing_file(path: &Path, kind: BackingKind, size: u64) -> Result<(), BackingError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("cannot create", path))?;
    match kind {
        BackingKind::Sparse | BackingKind::Tmpfs => {
            file.set_len(size).map_err(io_err("cannot size", path))?;
        }
        BackingKind::Ext4 => {
            write_zeros(&mut file, size).map_err(io_err("cannot fill", path))?;
            file.sync_all().map_err(io_err("cannot sync", path))?;
        }
    }
    Ok(())
}

fn write_zeros(file: &mut File, size: u64) -> io::Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn parses_kinds() {
        assert_eq!("ext4".parse::<BackingKind>().unwrap(), BackingKind::Ext4);
        assert_eq!("tmpfs".parse::<BackingKind>().unwrap(), BackingKind::Tmpfs);
        assert_eq!(
            "sparse".parse::<BackingKind>().unwrap(),
            BackingKind::Sparse
        );
        assert!("xfs".parse::<BackingKind>().is_err());
    }

    #[test]
    fn sparse_files_have_no_blocks_and_scratch_is_removed() {
        let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
        let path = dir.create_file(4 << 20).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 4 << 20);
        assert_eq!(meta.blocks(), 0);
        let root = dir.path().to_path_buf();
        drop(dir);
        assert!(!root.exists());
    }

    #[test]
    fn tmpfs_dir_must_be_tmpfs() {
        let tmp = std::env::temp_dir();
        if filesystem_magic(&tmp).unwrap() != TMPFS_MAGIC {
            assert!(matches!(
                ScratchDir::new(BackingKind::Tmpfs, Some(&tmp)),
                Err(BackingError::WrongFilesystem { .. })
            ));
        }
    }
}
