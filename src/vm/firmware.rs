//! UEFI firmware chosen from QEMU's firmware descriptors (`/usr/share/qemu/firmware/*.json`,
//! the interop format libvirt uses) instead of hard-coded OVMF paths, which differ between
//! distributions and releases.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::argv::DiskFormat;

pub const DESCRIPTOR_DIRS: &[&str] = &["/etc/qemu/firmware", "/usr/share/qemu/firmware"];

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "no UEFI firmware for x86_64 q35 without Secure Boot was found in {dirs} (install the `ovmf` package)"
    )]
    NoUefi { dirs: String },
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "interface-types", default)]
    interface_types: Vec<String>,
    mapping: Mapping,
    #[serde(default)]
    targets: Vec<Target>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Mapping {
    device: String,
    executable: Option<FlashFile>,
    #[serde(rename = "nvram-template")]
    nvram_template: Option<FlashFile>,
}

#[derive(Debug, Deserialize)]
struct FlashFile {
    filename: PathBuf,
    #[serde(default = "raw")]
    format: String,
}

fn raw() -> String {
    "raw".into()
}

#[derive(Debug, Deserialize)]
struct Target {
    architecture: String,
    #[serde(default)]
    machines: Vec<String>,
}

/// Files of a UEFI firmware: the code (mapped read-only) and the template of the variable
/// store (copied per VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uefi {
    pub code: PathBuf,
    pub code_format: DiskFormat,
    pub vars_template: PathBuf,
    pub vars_format: DiskFormat,
}

fn format(s: &str) -> Option<DiskFormat> {
    match s {
        "raw" => Some(DiskFormat::Raw),
        "qcow2" => Some(DiskFormat::Qcow2),
        _ => None,
    }
}

/// A descriptor usable for plain UEFI on x86_64 q35: pflash, no Secure Boot (that needs SMM
/// and enrolled keys, which a build VM does not ask for), files present.
fn usable(d: &Descriptor) -> Option<Uefi> {
    if !d.interface_types.iter().any(|t| t == "uefi") || d.mapping.device != "flash" {
        return None;
    }
    if d.features
        .iter()
        .any(|f| f == "secure-boot" || f == "requires-smm" || f == "enrolled-keys")
    {
        return None;
    }
    let q35 = d.targets.iter().any(|t| {
        t.architecture == "x86_64"
            && t.machines
                .iter()
                .any(|m| m.starts_with("pc-q35") || m == "q35")
    });
    if !q35 {
        return None;
    }
    let code = d.mapping.executable.as_ref()?;
    let vars = d.mapping.nvram_template.as_ref()?;
    if !code.filename.is_file() || !vars.filename.is_file() {
        return None;
    }
    Some(Uefi {
        code: code.filename.clone(),
        code_format: format(&code.format)?,
        vars_template: vars.filename.clone(),
        vars_format: format(&vars.format)?,
    })
}

/// The first usable descriptor in `dirs`, files sorted by name (the descriptors' own priority
/// order: a lower number wins, and `/etc` overrides `/usr/share` for equal names).
pub fn find_uefi_in(dirs: &[&Path]) -> Result<Uefi, FirmwareError> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for dir in dirs {
        let Ok(entries) = fs_err::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && !files.iter().any(|(n, _)| *n == name) {
                files.push((name, e.path()));
            }
        }
    }
    files.sort();
    files
        .iter()
        .filter_map(|(_, p)| fs_err::read(p).ok())
        .filter_map(|bytes| serde_json::from_slice::<Descriptor>(&bytes).ok())
        .find_map(|d| usable(&d))
        .ok_or_else(|| FirmwareError::NoUefi {
            dirs: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

pub fn find_uefi() -> Result<Uefi, FirmwareError> {
    let dirs: Vec<&Path> = DESCRIPTOR_DIRS.iter().map(Path::new).collect();
    find_uefi_in(&dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_plain_uefi_over_secure_boot_and_skips_junk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let code = dir.path().join("CODE.fd");
        let vars = dir.path().join("VARS.fd");
        fs_err::write(&code, b"c").expect("write");
        fs_err::write(&vars, b"v").expect("write");
        let desc = |features: &str| {
            format!(
                r#"{{"interface-types": ["uefi"], "mapping": {{"device": "flash",
                "executable": {{"filename": "{}", "format": "raw"}},
                "nvram-template": {{"filename": "{}", "format": "raw"}}}},
                "targets": [{{"architecture": "x86_64", "machines": ["pc-q35-*"]}}],
                "features": [{features}]}}"#,
                code.display(),
                vars.display()
            )
        };
        fs_err::write(dir.path().join("10-junk.json"), b"{not json").expect("write");
        fs_err::write(
            dir.path().join("40-secure.json"),
            desc(r#""secure-boot", "requires-smm""#),
        )
        .expect("write");
        fs_err::write(dir.path().join("60-plain.json"), desc(r#""acpi-s3""#)).expect("write");
        let uefi = find_uefi_in(&[dir.path()]).expect("found");
        assert_eq!(uefi.code, code);
        assert_eq!(uefi.vars_template, vars);
        assert_eq!(uefi.vars_format, DiskFormat::Raw);

        fs_err::remove_file(dir.path().join("60-plain.json")).expect("rm");
        let e = find_uefi_in(&[dir.path()]).expect_err("only secure boot left");
        assert!(e.to_string().contains("ovmf"), "{e}");
    }

    #[test]
    fn this_machine_has_ovmf() {
        // Debian's `ovmf` package ships the descriptors; the VM tests need it for UEFI.
        let uefi = find_uefi().expect("install the ovmf package");
        assert!(uefi.code.is_file());
    }
}
