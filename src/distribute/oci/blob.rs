//! What a blob is made of before it is uploaded: byte strings and file ranges laid end to
//! end. A blob can be read from any offset again, so an upload resumes where the registry
//! says it stopped, and a containerDisk's tar layer is never written out: its headers are a
//! few bytes here, its body is the stored disk itself.

use fs_err::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One piece of a blob.
#[derive(Debug, Clone)]
enum Segment {
    Bytes(Vec<u8>),
    File { path: PathBuf, len: u64 },
}

impl Segment {
    fn len(&self) -> u64 {
        match self {
            Segment::Bytes(b) => b.len() as u64,
            Segment::File { len, .. } => *len,
        }
    }
}

/// A blob's content, readable from any offset.
#[derive(Debug, Clone, Default)]
pub(super) struct BlobSource {
    segments: Vec<Segment>,
}

impl BlobSource {
    pub fn bytes(data: Vec<u8>) -> Self {
        Self {
            segments: vec![Segment::Bytes(data)],
        }
    }

    /// The whole file at `path` (its size is taken now; a file that changes size later makes
    /// the read fail rather than send a mix).
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let len = fs_err::metadata(path)?.len();
        Ok(Self {
            segments: vec![Segment::File {
                path: path.to_path_buf(),
                len,
            }],
        })
    }

    /// A tar layer (uncompressed, ustar) holding `disk/` and `disk/<file name>`, both owned by
    /// uid/gid 107 (the `qemu` user KubeVirt runs as), the file with mode 0440: the
    /// containerDisk convention (`ADD --chown=107:107 disk.qcow2 /disk/`). `mtime` is fixed by
    /// the caller so the same disk always gives the same layer digest.
    pub fn container_disk(disk: &Path, file_name: &str, mtime: u64) -> std::io::Result<Self> {
        let len = fs_err::metadata(disk)?.len();
        let header = |path: &str, kind: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(107);
            h.set_gid(107);
            h.set_mtime(mtime);
            h.set_size(size);
            h.set_path(path)?;
            h.set_cksum();
            Ok::<_, std::io::Error>(h.as_bytes().to_vec())
        };
        let mut head = header("disk/", tar::EntryType::Directory, 0o555, 0)?;
        head.extend(header(
            &format!("disk/{file_name}"),
            tar::EntryType::Regular,
            0o440,
            len,
        )?);
        // Pad the body to a 512-byte block, then the end-of-archive marker (two zero blocks).
        let pad = (512 - len % 512) % 512;
        let tail = vec![0u8; pad as usize + 1024];
        Ok(Self {
            segments: vec![
                Segment::Bytes(head),
                Segment::File {
                    path: disk.to_path_buf(),
                    len,
                },
                Segment::Bytes(tail),
            ],
        })
    }

    pub fn len(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }

    /// Up to `max` bytes from `offset` (fewer only at the end). Blocking.
    pub fn read_at(&self, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(max.min(self.len().saturating_sub(offset) as usize));
        let mut start = 0u64;
        for seg in &self.segments {
            let end = start + seg.len();
            let want = max - out.len();
            if want == 0 {
                break;
            }
            if offset + (out.len() as u64) < end {
                let from = offset + out.len() as u64 - start;
                let n = (seg.len() - from).min(want as u64) as usize;
                match seg {
                    Segment::Bytes(b) => {
                        out.extend_from_slice(&b[from as usize..from as usize + n]);
                    }
                    Segment::File { path, .. } => {
                        let mut f = File::open(path)?;
                        f.seek(SeekFrom::Start(from))?;
                        let old = out.len();
                        out.resize(old + n, 0);
                        f.read_exact(&mut out[old..])?;
                    }
                }
            }
            start = end;
        }
        Ok(out)
    }

    /// sha256 of the first `len` bytes. Blocking.
    pub fn hash_prefix(&self, len: u64) -> std::io::Result<Sha256> {
        let mut h = Sha256::new();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(8 << 20) as usize;
            let chunk = self.read_at(done, n)?;
            if chunk.is_empty() {
                break;
            }
            h.update(&chunk);
            done += chunk.len() as u64;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_across_segments_from_any_offset() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        fs_err::write(&path, b"0123456789").expect("write");
        let src = BlobSource {
            segments: vec![
                Segment::Bytes(b"ab".to_vec()),
                Segment::File {
                    path: path.clone(),
                    len: 10,
                },
                Segment::Bytes(b"yz".to_vec()),
            ],
        };
        assert_eq!(src.len(), 14);
        assert_eq!(src.read_at(0, 100).expect("read"), b"ab0123456789yz");
        assert_eq!(src.read_at(1, 3).expect("read"), b"b01");
        assert_eq!(src.read_at(11, 100).expect("read"), b"9yz");
        assert_eq!(src.read_at(14, 100).expect("read"), b"");
        let whole = Sha256::digest(b"ab0123456789yz");
        assert_eq!(src.hash_prefix(14).expect("hash").finalize(), whole);
    }

    #[test]
    fn a_container_disk_layer_is_a_tar_with_the_kubevirt_owner_and_mode() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("d.qcow2");
        fs_err::write(&path, vec![7u8; 1000]).expect("write");
        let src = BlobSource::container_disk(&path, "web.qcow2", 1_700_000_000).expect("tar");
        assert_eq!(src.len() % 512, 0);
        let bytes = src.read_at(0, src.len() as usize).expect("read");
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let h = entry.header().clone();
            let path = entry.path().expect("path").display().to_string();
            let mut body = Vec::new();
            entry.read_to_end(&mut body).expect("body");
            seen.push((
                path,
                h.uid().expect("uid"),
                h.gid().expect("gid"),
                h.mode().expect("mode"),
                body.len(),
            ));
        }
        assert_eq!(
            seen,
            vec![
                ("disk/".to_string(), 107, 107, 0o555, 0),
                ("disk/web.qcow2".to_string(), 107, 107, 0o440, 1000),
            ]
        );
    }
}
