//! Files written whole or not at all: through a temporary sibling (`.tmp-…`) that is synced,
//! then renamed over the final name. The one home of that pattern for the store's records and
//! manifests, the appliance's cache records, and anything else builder writes in place.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

/// Write `bytes` to `path` through a temporary sibling that is synced, then renamed: readers
/// see the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // tempfile's own errors name the path; the rest goes through fs-err, whose errors do too.
    let (file, tmp) = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)?
        .into_parts();
    let mut file = fs_err::File::from_parts(file, &*tmp);
    file.write_all(bytes)?;
    file.sync_all()?;
    fs_err::rename(&tmp, path)?;
    // Renamed: nothing is left under the temporary name to remove.
    let _ = tmp.keep();
    Ok(())
}

/// Write `value` as pretty JSON, with a final newline, through [`write_atomic`].
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    #[expect(
        clippy::expect_used,
        reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
    )]
    let mut json = serde_json::to_vec_pretty(value).expect("plain data always serializes");
    json.push(b'\n');
    write_atomic(path, &json)
}
