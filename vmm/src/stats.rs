//! `--stats PATH`: the JSON record of what the devices did, written when the
//! VM ends.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::pmem::{AttachedPmem, DeviceStats};
use crate::vm::VmmError;

#[derive(Serialize)]
struct Stats {
    pmem: Vec<DeviceStats>,
}

/// The stats file, created (and truncated) before the guest starts so that a
/// bad path fails at once.
pub struct StatsFile {
    path: PathBuf,
    file: File,
}

impl StatsFile {
    pub fn create(path: &Path) -> Result<Self, VmmError> {
        let file = File::create(path).map_err(|source| stats_err(path, source))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(mut self, pmem: &[AttachedPmem]) -> Result<(), VmmError> {
        let stats = Stats {
            pmem: pmem.iter().map(AttachedPmem::stats).collect(),
        };
        let mut json = serde_json::to_vec_pretty(&stats).map_err(std::io::Error::other);
        if let Ok(j) = json.as_mut() {
            j.push(b'\n');
        }
        json.and_then(|j| self.file.write_all(&j))
            .and_then(|()| self.file.sync_data())
            .map_err(|source| stats_err(&self.path, source))
    }
}

fn stats_err(path: &Path, source: std::io::Error) -> VmmError {
    VmmError::Stats {
        path: path.display().to_string(),
        source,
    }
}
