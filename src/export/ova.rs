//! OVA: a USTAR tar holding the OVF descriptor first, then the manifest (`.mf`, one
//! `SHA256(file)= hex` line per file), then the stream-optimized vmdk, as the OVF spec orders
//! them so an importer can read the descriptor before the disk arrives.
//!
//! The descriptor is OVF 1.0 (the version every importer reads: VMware, VirtualBox, oVirt):
//! one VirtualSystem with the build's CPUs and memory, an LSI Logic SCSI or AHCI SATA
//! controller with the disk on it, and one E1000 network adapter on "VM Network" (a VM
//! without a network card is rarely what anyone imports). UEFI firmware is recorded the way
//! VMware reads it (`vmw:Config firmware=efi`); other importers ignore that element.

use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{DiskController, ExportError, HashingWriter, MachineSpec};
use crate::recipe::{Firmware, Format};

pub(super) struct OvaLayout {
    pub stem: String,
    /// The vmdk's name inside the tar.
    pub disk_name: String,
    /// The vmdk on disk.
    pub vmdk: PathBuf,
    /// Its digest when already known (the exported vmdk); computed otherwise.
    pub vmdk_sha256: Option<String>,
    pub virtual_size: u64,
    pub machine: MachineSpec,
}

/// Write the OVA into `out` (already created at `path`, which is only used in messages) and
/// return its sha256, computed while writing. Blocking.
pub(super) fn write(
    out: fs_err::File,
    path: &Path,
    layout: &OvaLayout,
) -> Result<String, ExportError> {
    let vmdk_size = fs_err::metadata(&layout.vmdk)?.len();
    let vmdk_sha = match &layout.vmdk_sha256 {
        Some(s) => s.clone(),
        None => super::sha256_hex(&layout.vmdk)?,
    };
    let ovf_name = format!("{}.ovf", layout.stem);
    let mf_name = format!("{}.mf", layout.stem);
    let ovf = descriptor(layout, vmdk_size);
    let mf = format!(
        "SHA256({ovf_name})= {}\nSHA256({})= {vmdk_sha}\n",
        hex::encode(Sha256::digest(ovf.as_bytes())),
        layout.disk_name
    );
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    let writer = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        hasher: Sha256::new(),
    };
    let mut tar = tar::Builder::new(writer);
    let header = |name: &str, size: u64| -> Result<tar::Header, ExportError> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name)?;
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        Ok(h)
    };
    tar.append(&header(&ovf_name, ovf.len() as u64)?, ovf.as_bytes())?;
    tar.append(&header(&mf_name, mf.len() as u64)?, mf.as_bytes())?;
    let vmdk_file = fs_err::File::open(&layout.vmdk)?;
    // Hash the disk as it goes into the tar: what the manifest promises is what was written.
    let mut reader = HashingReader {
        inner: vmdk_file.take(vmdk_size),
        hasher: Sha256::new(),
        count: 0,
    };
    tar.append(&header(&layout.disk_name, vmdk_size)?, &mut reader)?;
    if reader.count != vmdk_size || hex::encode(reader.hasher.finalize()) != vmdk_sha {
        return Err(ExportError::Verify {
            format: Format::Ova,
            file: path.display().to_string(),
            detail: format!(
                "{} changed while it was being archived",
                layout.vmdk.display()
            ),
        });
    }
    // The tar writes go to an fs-err file, so their errors name the OVA.
    tar.finish()?;
    let HashingWriter { inner, hasher } = tar.into_inner()?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Read an OVA back: USTAR members `.ovf`, `.mf`, `.vmdk` in that order, and the `.mf` line
/// for the `.ovf` matching its content. Blocking; skips over the disk without reading it.
pub(super) fn check_layout(path: &Path) -> Result<(), String> {
    let file = fs_err::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| format!("cannot read it as tar: {e}"))?;
    let mut names = Vec::new();
    let mut ovf_sha = None;
    let mut mf = String::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("cannot read a tar member: {e}"))?;
        if entry.header().as_ustar().is_none() {
            return Err("a member's header is not USTAR".into());
        }
        let name = entry
            .path()
            .map_err(|e| format!("a member's name is unreadable: {e}"))?
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".ovf") {
            let mut text = Vec::new();
            entry
                .read_to_end(&mut text)
                .map_err(|e| format!("cannot read {name}: {e}"))?;
            ovf_sha = Some((name.clone(), hex::encode(Sha256::digest(&text))));
        } else if name.ends_with(".mf") {
            entry
                .read_to_string(&mut mf)
                .map_err(|e| format!("cannot read {name}: {e}"))?;
        }
        names.push(name);
    }
    let kinds: Vec<&str> = names
        .iter()
        .map(|n| n.rsplit('.').next().unwrap_or(""))
        .collect();
    if kinds != ["ovf", "mf", "vmdk"] {
        return Err(format!(
            "its members are {names:?}; expected .ovf, .mf, .vmdk in that order"
        ));
    }
    let Some((ovf_name, sha)) = ovf_sha else {
        return Err("it has no .ovf member".into());
    };
    let line = format!("SHA256({ovf_name})= {sha}");
    if !mf.lines().any(|l| l == line) {
        return Err(format!("its manifest does not list `{line}`"));
    }
    Ok(())
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The OVF 1.0 descriptor. RASD elements inside each `Item` are in alphabetical order, as the
/// CIM schema's sequence requires (strict importers reject other orders).
pub(super) fn descriptor(layout: &OvaLayout, vmdk_size: u64) -> String {
    let m = &layout.machine;
    let name = escape(&m.name);
    let disk = escape(&layout.disk_name);
    let info = escape(
        m.description
            .as_deref()
            .unwrap_or("A virtual machine built by builder"),
    );
    let (controller_desc, controller_subtype, controller_type) = match m.controller {
        DiskController::Scsi => ("SCSI Controller", "lsilogic", 6),
        DiskController::Sata => ("SATA Controller", "AHCI", 20),
    };
    let firmware = match m.firmware {
        Firmware::Uefi => {
            "      <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>\n"
        }
        Firmware::Bios => "",
    };
    let (cpus, memory, size, vsize) = (m.cpus, m.memory_mib, vmdk_size, layout.virtual_size);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{disk}" ovf:id="file1" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{vsize}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>{info}</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="101" vmw:osType="otherLinux64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Linux 64-bit</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{memory}MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>{controller_desc}</rasd:Description>
        <rasd:ElementName>{controller_desc} 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>{controller_subtype}</rasd:ResourceSubType>
        <rasd:ResourceType>{controller_type}</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>E1000 ethernet adapter on "VM Network"</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
{firmware}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(firmware: Firmware, controller: DiskController) -> OvaLayout {
        OvaLayout {
            stem: "web".into(),
            disk_name: "web.vmdk".into(),
            vmdk: PathBuf::from("/nonexistent"),
            vmdk_sha256: None,
            virtual_size: 3 << 30,
            machine: MachineSpec {
                name: "web <1.2.0> & co".into(),
                description: None,
                cpus: 4,
                memory_mib: 2048,
                firmware,
                controller,
            },
        }
    }

    #[test]
    fn descriptor_carries_the_machine_and_escapes_names() {
        let d = descriptor(&layout(Firmware::Bios, DiskController::Scsi), 12345);
        assert!(d.contains(r#"ovf:capacity="3221225472""#));
        assert!(d.contains(r#"ovf:href="web.vmdk" ovf:id="file1" ovf:size="12345""#));
        assert!(d.contains("<rasd:VirtualQuantity>4</rasd:VirtualQuantity>"));
        assert!(d.contains("<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>"));
        assert!(d.contains("<rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>"));
        assert!(d.contains("<Name>web &lt;1.2.0&gt; &amp; co</Name>"));
        assert!(!d.contains("vmw:Config"));
        let d = descriptor(&layout(Firmware::Uefi, DiskController::Sata), 1);
        assert!(d.contains("<rasd:ResourceType>20</rasd:ResourceType>"));
        assert!(d.contains(r#"vmw:key="firmware" vmw:value="efi""#));
    }
}
