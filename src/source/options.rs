//! How a checkpoint is opened: [`SourceOptions`], and [`IoMode`] with the file system
//! check that resolves its automatic choice.

use std::path::{Path, PathBuf};

use super::header::DEFAULT_MAX_HEADER_BYTES;

/// How a checkpoint is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// The largest safetensors header accepted, in bytes (default
    /// [`DEFAULT_MAX_HEADER_BYTES`]).
    pub max_header_bytes: u64,
    /// The Hugging Face cache that hub ids resolve in (default: `HF_HUB_CACHE`,
    /// `HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub hub_cache: Option<PathBuf>,
    /// How shard data is read (default: auto).
    pub io: IoMode,
    /// Open a pre-quantized checkpoint for writing its tensors as stored: a scheme
    /// that does not match its tensors, or tensors of no declared scheme, are then
    /// not refused (default false).
    pub keep_quantized: bool,
    /// A file holding the Hugging Face token for `hf://` inputs (default: `HF_TOKEN`,
    /// else the token file `huggingface_hub` writes).
    pub token_file: Option<PathBuf>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            hub_cache: None,
            io: IoMode::Auto,
            keep_quantized: false,
            token_file: None,
        }
    }
}

/// How shard bytes are read (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// Memory-map on local file systems, positioned reads on network and FUSE file
    /// systems (NFS, SMB, Lustre, Ceph, FUSE/s3fs...), where page faults on a mapping
    /// are reported 30–50× slower.
    #[default]
    Auto,
    /// Memory-map every shard.
    Mmap,
    /// Positioned reads into buffers, a piece of a row at a time.
    Read,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "mmap" => Ok(IoMode::Mmap),
            "read" => Ok(IoMode::Read),
            o => Err(format!(
                "unknown I/O mode `{o}` (expected auto, mmap or read)"
            )),
        }
    }
}

impl IoMode {
    /// `Mmap` or `Read` for the file at `path`.
    pub(super) fn resolve(self, path: &Path) -> IoMode {
        match self {
            IoMode::Auto if is_network_fs(path) => IoMode::Read,
            IoMode::Auto => IoMode::Mmap,
            m => m,
        }
    }
}

/// True when `path` is on a network or FUSE file system, from `/proc/self/mountinfo`
/// (the mount with the longest matching mount point). False when it cannot tell.
fn is_network_fs(path: &Path) -> bool {
    let Ok(path) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let mut best: Option<(usize, &str)> = None;
    for line in info.lines() {
        // `id parent major:minor root mount-point options ... - fstype source options`
        let mut fields = line.split(' ');
        let Some(mount) = fields.nth(4) else { continue };
        let Some(fstype) = line.split(" - ").nth(1).and_then(|r| r.split(' ').next()) else {
            continue;
        };
        let mount = mount.replace("\\040", " ");
        if path.starts_with(&mount) && best.is_none_or(|(n, _)| mount.len() >= n) {
            best = Some((mount.len(), fstype));
        }
    }
    best.is_some_and(|(_, t)| {
        let t = t.to_ascii_lowercase();
        t.starts_with("nfs")
            || t.starts_with("fuse")
            || matches!(
                t.as_str(),
                "cifs"
                    | "smb3"
                    | "smbfs"
                    | "lustre"
                    | "ceph"
                    | "9p"
                    | "glusterfs"
                    | "gpfs"
                    | "beegfs"
                    | "afs"
                    | "davfs"
                    | "virtiofs"
            )
    })
}
