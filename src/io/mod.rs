//! The support layer for I/O, under `source`, `read` and `write`: temp files beside
//! their targets and the registry that removes them on an interrupt ([`temp`]), URL
//! parsing ([`url`]), mapped reads ([`map`]), and with the `remote` feature the HTTP
//! client with its retry policy ([`http`]) and object storage by prefix ([`store`]). It
//! knows nothing of checkpoints or weight files.

#[cfg(feature = "remote")]
pub(crate) mod http;
pub(crate) mod map;
#[cfg(feature = "remote")]
pub(crate) mod store;
pub(crate) mod temp;
pub(crate) mod url;

use std::fs::File;

use crate::error::{Error, Result};

/// A file or object listed in a directory or below a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    /// Its size in bytes.
    pub(crate) size: u64,
    /// Its ETag, for an object.
    pub(crate) e_tag: Option<String>,
}

/// An XXH3-128 digest as the manifest writes it: 32 lowercase hex digits.
pub(crate) fn hex128(v: u128) -> String {
    format!("{v:032x}")
}

/// XXH3-128 of a whole file, as [`hex128`].
///
/// # Errors
///
/// `Io` naming the file.
pub(crate) fn file_hash(path: &std::path::Path) -> Result<(u64, String)> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| Error::io("read", path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex128(h.digest128())))
}
