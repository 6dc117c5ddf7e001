//! sha256 of files, streamed: the one reader for every file builder hashes (parent images,
//! outputs, the store's checks, uploads, copies). Depends on nothing else in the crate.

use std::io::Read;
use std::ops::ControlFlow;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Read in blocks this big: large enough that hashing, not the syscalls, sets the pace.
const BLOCK: usize = 1 << 20;

/// How far hashing one file got, after each block.
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'a> {
    pub path: &'a Path,
    /// Bytes hashed so far.
    pub done: u64,
    /// The file's size when hashing began.
    pub total: u64,
}

/// A file's sha256 and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256: [u8; 32],
    pub size: u64,
}

impl FileDigest {
    /// The digest in lowercase hex, as `sha256sum` prints it.
    pub fn hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Called after each block; [`ControlFlow::Break`] stops the hashing (an `Interrupted`
/// error).
pub type Progress<'p> = &'p mut dyn FnMut(Hashed<'_>) -> ControlFlow<()>;

/// sha256 of the file at `path`, read in 1 MiB blocks (blocking: call it from a blocking
/// thread in async code), with `progress` after each block when given. Every error names
/// the file: fs-err's do, and so does the one for a stop.
pub fn sha256_file(path: &Path, mut progress: Option<Progress<'_>>) -> std::io::Result<FileDigest> {
    let mut file = fs_err::File::open(path)?;
    let total = file.metadata()?.len();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BLOCK];
    let mut done = 0u64;
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buffer[..n]);
        done += n as u64;
        if let Some(progress) = progress.as_mut()
            && progress(Hashed { path, done, total }).is_break()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                format!("hashing `{}` was stopped", path.display()),
            ));
        }
    }
    Ok(FileDigest {
        sha256: hasher.finalize().into(),
        size: done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_as_sha256sum_does_with_progress_and_stops_when_asked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        fs_err::write(&path, vec![b'a'; BLOCK + 5]).expect("write");
        let mut seen = Vec::new();
        let d = sha256_file(
            &path,
            Some(&mut |h: Hashed<'_>| {
                seen.push((h.done, h.total));
                ControlFlow::Continue(())
            }),
        )
        .expect("hashed");
        assert_eq!(d.size, BLOCK as u64 + 5);
        assert_eq!(seen.last(), Some(&(BLOCK as u64 + 5, BLOCK as u64 + 5)));
        fs_err::write(&path, b"abc").expect("write");
        assert_eq!(
            sha256_file(&path, None).expect("hashed").hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let stopped = sha256_file(&path, Some(&mut |_| ControlFlow::Break(())));
        let stopped = stopped.expect_err("stopped");
        assert_eq!(stopped.kind(), std::io::ErrorKind::Interrupted);
        let missing = sha256_file(&dir.path().join("gone"), None).expect_err("missing");
        assert!(missing.to_string().contains("gone"), "{missing}");
    }
}
