//! EC2 through its Query API (form-encoded POST, `Version=2016-11-15`, SigV4, XML answers):
//! the calls an AMI import needs. Each answer is read for the few fields used; EC2's
//! `<Errors>` become messages that say what to fix.

use std::collections::BTreeMap;

use crate::aws::client::{self, Client, CredentialsRefused, RequestError, RetryPolicy, Service};
use crate::aws::credentials::AwsCredentials;
use crate::aws::xml::Element;

const VERSION: &str = "2016-11-15";

#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    #[error("the EC2 endpoint `{endpoint}` is not an http:// or https:// URL")]
    BadEndpoint { endpoint: String },
    #[error(transparent)]
    Credentials(Box<CredentialsRefused>),
    #[error(
        "the credentials may not call ec2:{action} in {region}; grant it to the IAM user or \
         role (an AMI import needs ec2:ImportSnapshot, ec2:DescribeImportSnapshotTasks, \
         ec2:RegisterImage, ec2:DescribeImages, ec2:CreateTags, and for copies and sharing \
         ec2:CopyImage and ec2:ModifyImageAttribute)"
    )]
    Unauthorized {
        action: &'static str,
        region: String,
        #[source]
        source: RequestError,
    },
    #[error(
        "an AMI named `{name}` already exists in {region} ({image_id}); choose another name \
         (a name template with {{{{imagebuilder:buildDate}}}} makes each one unique)"
    )]
    DuplicateName {
        name: String,
        region: String,
        image_id: String,
    },
    #[error("EC2 {action} in {region} failed{}", hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default())]
    Request {
        action: &'static str,
        region: String,
        hint: Option<String>,
        #[source]
        source: RequestError,
    },
    #[error("EC2 answered {action} in {region} without {missing}")]
    Incomplete {
        action: &'static str,
        region: String,
        missing: &'static str,
    },
}

/// An import task as DescribeImport*Tasks reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportTask {
    pub id: String,
    /// `active`, `completed`, `deleting`, `deleted` (the last two mean it failed or was
    /// cancelled; `status_message` says why).
    pub status: String,
    pub progress: Option<u32>,
    pub status_message: Option<String>,
    pub snapshot_id: Option<String>,
    /// ImportImage only.
    pub image_id: Option<String>,
}

/// An image as DescribeImages reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageState {
    pub image_id: String,
    /// `pending`, `available`, `failed`, …
    pub state: String,
    pub snapshot_id: Option<String>,
    pub reason: Option<String>,
}

/// The disk S3 holds for an import.
#[derive(Debug, Clone)]
pub struct DiskSource {
    /// `VMDK`, `RAW` or `VHD`.
    pub format: String,
    pub bucket: String,
    pub key: String,
}

/// RegisterImage's parameters.
#[derive(Debug, Clone)]
pub struct RegisterImage {
    pub name: String,
    pub description: Option<String>,
    pub snapshot_id: String,
    /// `legacy-bios` or `uefi`.
    pub boot_mode: String,
    pub architecture: String,
    pub root_device: String,
}

/// The parameters both imports send; `container` is `DiskContainer` (ImportSnapshot) or
/// `DiskContainer.1` (ImportImage).
fn import_params(
    container: &str,
    disk: &DiskSource,
    description: &str,
    role_name: &str,
) -> Vec<(String, String)> {
    vec![
        ("Description".to_string(), description.to_string()),
        (format!("{container}.Description"), description.to_string()),
        (format!("{container}.Format"), disk.format.clone()),
        (
            format!("{container}.UserBucket.S3Bucket"),
            disk.bucket.clone(),
        ),
        (format!("{container}.UserBucket.S3Key"), disk.key.clone()),
        ("RoleName".into(), role_name.to_string()),
    ]
}

/// EC2 in one region (a custom endpoint serves every region).
#[derive(Debug, Clone)]
pub struct Ec2Client {
    client: Client,
}

impl Ec2Client {
    pub fn new(
        http: reqwest::Client,
        credentials: AwsCredentials,
        region: &str,
        endpoint: Option<&str>,
        retry: RetryPolicy,
    ) -> Result<Ec2Client, Ec2Error> {
        let client = Client::new(
            http,
            Some(credentials),
            region,
            Service::Ec2,
            endpoint,
            retry,
        )
        .map_err(|endpoint| Ec2Error::BadEndpoint { endpoint })?;
        Ok(Ec2Client { client })
    }

    pub fn region(&self) -> &str {
        &self.client.region
    }

    /// The same account in another region (copies).
    pub fn in_region(&self, region: &str) -> Ec2Client {
        Ec2Client {
            client: self.client.for_region(region),
        }
    }

    async fn call(
        &self,
        action: &'static str,
        params: Vec<(String, String)>,
    ) -> Result<Element, Ec2Error> {
        let request = client::query_request(&self.client.endpoint, action, VERSION, &params);
        self.client
            .send_xml(&request)
            .await
            .map_err(|e| self.error(action, e))
    }

    fn error(&self, action: &'static str, e: RequestError) -> Ec2Error {
        if e.is_credentials() {
            return Ec2Error::Credentials(self.client.refused(e));
        }
        if e.code() == Some("UnauthorizedOperation") {
            return Ec2Error::Unauthorized {
                action,
                region: self.client.region.clone(),
                source: e,
            };
        }
        let message = match &e {
            RequestError::Service(f) => f.message.clone().unwrap_or_default(),
            _ => String::new(),
        };
        Ec2Error::Request {
            action,
            region: self.client.region.clone(),
            hint: hint_for(e.code(), &message),
            source: e,
        }
    }

    fn incomplete(&self, action: &'static str, missing: &'static str) -> Ec2Error {
        Ec2Error::Incomplete {
            action,
            region: self.client.region.clone(),
            missing,
        }
    }

    /// ImportSnapshot; returns the task id. With `dry_run` it only checks permissions
    /// (EC2 answers `DryRunOperation`, which is success) and returns an empty id.
    pub async fn import_snapshot(
        &self,
        disk: &DiskSource,
        description: &str,
        role_name: &str,
        tags: &BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<String, Ec2Error> {
        let mut params = import_params("DiskContainer", disk, description, role_name);
        tag_specification(&mut params, "import-snapshot-task", tags);
        self.dry_run_or_call("ImportSnapshot", params, dry_run, &["importTaskId"])
            .await
    }

    /// ImportImage (the OS conversion path); returns the task id.
    pub async fn import_image(
        &self,
        disk: &DiskSource,
        description: &str,
        role_name: &str,
        boot_mode: &str,
        tags: &BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<String, Ec2Error> {
        let mut params = import_params("DiskContainer.1", disk, description, role_name);
        params.extend([
            ("Architecture".into(), "x86_64".into()),
            ("Platform".into(), "Linux".into()),
            ("BootMode".into(), boot_mode.to_string()),
        ]);
        tag_specification(&mut params, "import-image-task", tags);
        self.dry_run_or_call("ImportImage", params, dry_run, &["importTaskId"])
            .await
    }

    async fn dry_run_or_call(
        &self,
        action: &'static str,
        mut params: Vec<(String, String)>,
        dry_run: bool,
        id_path: &[&str],
    ) -> Result<String, Ec2Error> {
        if dry_run {
            params.push(("DryRun".into(), "true".into()));
            return match self.call(action, params).await {
                Err(Ec2Error::Request { source, .. })
                    if source.code() == Some("DryRunOperation") =>
                {
                    Ok(String::new())
                }
                Err(e) => Err(e),
                // A service that ignores DryRun would have started the real thing.
                Ok(_) => Ok(String::new()),
            };
        }
        let root = self.call(action, params).await?;
        root.text_at(id_path)
            .ok_or_else(|| self.incomplete(action, "an importTaskId"))
    }

    /// DescribeImportSnapshotTasks for one task.
    pub async fn describe_import_snapshot_task(
        &self,
        task_id: &str,
    ) -> Result<ImportTask, Ec2Error> {
        let action = "DescribeImportSnapshotTasks";
        let root = self
            .call(action, vec![("ImportTaskId.1".into(), task_id.to_string())])
            .await?;
        let item = root
            .at(&["importSnapshotTaskSet", "item"])
            .ok_or_else(|| self.incomplete(action, "the task"))?;
        let detail = item.child("snapshotTaskDetail");
        let text = |name: &str| detail.and_then(|d| d.text_at(&[name]));
        Ok(ImportTask {
            id: item
                .text_at(&["importTaskId"])
                .unwrap_or_else(|| task_id.to_string()),
            status: text("status").unwrap_or_default(),
            progress: text("progress").and_then(|p| p.parse().ok()),
            status_message: text("statusMessage"),
            snapshot_id: text("snapshotId"),
            image_id: None,
        })
    }

    /// DescribeImportImageTasks for one task.
    pub async fn describe_import_image_task(&self, task_id: &str) -> Result<ImportTask, Ec2Error> {
        let action = "DescribeImportImageTasks";
        let root = self
            .call(action, vec![("ImportTaskId.1".into(), task_id.to_string())])
            .await?;
        let item = root
            .at(&["importImageTaskSet", "item"])
            .ok_or_else(|| self.incomplete(action, "the task"))?;
        Ok(ImportTask {
            id: item
                .text_at(&["importTaskId"])
                .unwrap_or_else(|| task_id.to_string()),
            status: item.text_at(&["status"]).unwrap_or_default(),
            progress: item.text_at(&["progress"]).and_then(|p| p.parse().ok()),
            status_message: item.text_at(&["statusMessage"]),
            snapshot_id: item.text_at(&["snapshotDetailSet", "item", "snapshotId"]),
            image_id: item.text_at(&["imageId"]),
        })
    }

    /// CancelImportTask (after the user cancels).
    pub async fn cancel_import_task(&self, task_id: &str) -> Result<(), Ec2Error> {
        self.call(
            "CancelImportTask",
            vec![("ImportTaskId".into(), task_id.to_string())],
        )
        .await
        .map(|_| ())
    }

    /// RegisterImage: an HVM AMI booting from the snapshot, ENA enabled.
    pub async fn register_image(&self, args: &RegisterImage) -> Result<String, Ec2Error> {
        let action = "RegisterImage";
        let mut params = vec![
            ("Name".to_string(), args.name.clone()),
            ("Architecture".into(), args.architecture.clone()),
            ("VirtualizationType".into(), "hvm".into()),
            ("RootDeviceName".into(), args.root_device.clone()),
            ("EnaSupport".into(), "true".into()),
            ("SriovNetSupport".into(), "simple".into()),
            ("BootMode".into(), args.boot_mode.clone()),
            (
                "BlockDeviceMapping.1.DeviceName".into(),
                args.root_device.clone(),
            ),
            (
                "BlockDeviceMapping.1.Ebs.SnapshotId".into(),
                args.snapshot_id.clone(),
            ),
            (
                "BlockDeviceMapping.1.Ebs.DeleteOnTermination".into(),
                "true".into(),
            ),
            ("BlockDeviceMapping.1.Ebs.VolumeType".into(), "gp3".into()),
        ];
        if let Some(d) = &args.description {
            params.push(("Description".into(), d.clone()));
        }
        let root = match self.call(action, params).await {
            Err(Ec2Error::Request { source, .. })
                if source.code() == Some("InvalidAMIName.Duplicate") =>
            {
                let image_id = self
                    .images_named(&args.name)
                    .await
                    .ok()
                    .and_then(|ids| ids.into_iter().next())
                    .unwrap_or_else(|| "id unknown".into());
                return Err(Ec2Error::DuplicateName {
                    name: args.name.clone(),
                    region: self.client.region.clone(),
                    image_id,
                });
            }
            other => other?,
        };
        root.text_at(&["imageId"])
            .ok_or_else(|| self.incomplete(action, "an imageId"))
    }

    /// CreateTags on several resources at once.
    pub async fn create_tags(
        &self,
        resources: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), Ec2Error> {
        if tags.is_empty() || resources.is_empty() {
            return Ok(());
        }
        let mut params = Vec::new();
        for (i, r) in resources.iter().enumerate() {
            params.push((format!("ResourceId.{}", i + 1), r.clone()));
        }
        for (i, (k, v)) in tags.iter().enumerate() {
            params.push((format!("Tag.{}.Key", i + 1), k.clone()));
            params.push((format!("Tag.{}.Value", i + 1), v.clone()));
        }
        self.call("CreateTags", params).await.map(|_| ())
    }

    /// CopyImage into this client's region from `source_region`; returns the new image id.
    pub async fn copy_image(
        &self,
        source_region: &str,
        source_image_id: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<String, Ec2Error> {
        let action = "CopyImage";
        let mut params = vec![
            ("SourceRegion".to_string(), source_region.to_string()),
            ("SourceImageId".into(), source_image_id.to_string()),
            ("Name".into(), name.to_string()),
        ];
        if let Some(d) = description {
            params.push(("Description".into(), d.to_string()));
        }
        let root = self.call(action, params).await?;
        root.text_at(&["imageId"])
            .ok_or_else(|| self.incomplete(action, "an imageId"))
    }

    /// DescribeImages for one image; `None` when EC2 does not know it (yet).
    pub async fn describe_image(&self, image_id: &str) -> Result<Option<ImageState>, Ec2Error> {
        let root = match self
            .call(
                "DescribeImages",
                vec![("ImageId.1".into(), image_id.to_string())],
            )
            .await
        {
            Err(Ec2Error::Request { source, .. })
                if source.code() == Some("InvalidAMIID.NotFound") =>
            {
                return Ok(None);
            }
            other => other?,
        };
        Ok(root.at(&["imagesSet", "item"]).map(|item| ImageState {
            image_id: item
                .text_at(&["imageId"])
                .unwrap_or_else(|| image_id.to_string()),
            state: item.text_at(&["imageState"]).unwrap_or_default(),
            snapshot_id: item.text_at(&["blockDeviceMapping", "item", "ebs", "snapshotId"]),
            reason: item.text_at(&["stateReason", "message"]),
        }))
    }

    /// Ids of this account's images with exactly this name.
    pub async fn images_named(&self, name: &str) -> Result<Vec<String>, Ec2Error> {
        let root = self
            .call(
                "DescribeImages",
                vec![
                    ("Owner.1".into(), "self".into()),
                    ("Filter.1.Name".into(), "name".into()),
                    ("Filter.1.Value.1".into(), name.to_string()),
                ],
            )
            .await?;
        Ok(root
            .child("imagesSet")
            .map(|set| {
                set.children_named("item")
                    .filter_map(|i| i.text_at(&["imageId"]))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// ModifyImageAttribute: add launch permissions for accounts and groups (`all` makes
    /// the image public).
    pub async fn add_launch_permissions(
        &self,
        image_id: &str,
        user_ids: &[String],
        groups: &[String],
    ) -> Result<(), Ec2Error> {
        if user_ids.is_empty() && groups.is_empty() {
            return Ok(());
        }
        let mut params = vec![("ImageId".to_string(), image_id.to_string())];
        let mut n = 0;
        for user in user_ids {
            n += 1;
            params.push((format!("LaunchPermission.Add.{n}.UserId"), user.clone()));
        }
        for group in groups {
            n += 1;
            params.push((format!("LaunchPermission.Add.{n}.Group"), group.clone()));
        }
        self.call("ModifyImageAttribute", params).await.map(|_| ())
    }
}

fn tag_specification(
    params: &mut Vec<(String, String)>,
    resource_type: &str,
    tags: &BTreeMap<String, String>,
) {
    if tags.is_empty() {
        return;
    }
    params.push((
        "TagSpecification.1.ResourceType".into(),
        resource_type.into(),
    ));
    for (i, (k, v)) in tags.iter().enumerate() {
        params.push((format!("TagSpecification.1.Tag.{}.Key", i + 1), k.clone()));
        params.push((format!("TagSpecification.1.Tag.{}.Value", i + 1), v.clone()));
    }
}

/// What to do about an EC2 error code, when there is something better than its message.
fn hint_for(code: Option<&str>, message: &str) -> Option<String> {
    let lower = message.to_ascii_lowercase();
    match code? {
        "InvalidParameter" | "InvalidParameterValue"
            if lower.contains("vmimport") || lower.contains("service role") =>
        {
            Some(
                "VM Import needs the IAM service role `vmimport` (trusted by \
                 vmie.amazonaws.com, allowed to read the bucket); create it as AWS's VM \
                 Import/Export guide describes"
                    .into(),
            )
        }
        "InvalidAMIName.Malformed" => Some(
            "AMI names are 3 to 128 characters: letters, digits and ( ) [ ] space . / - ' @ _"
                .into(),
        ),
        "OptInRequired" => Some("the account has not enabled this region".into()),
        "ResourceLimitExceeded" => {
            Some("too many import tasks are running in this account; wait and retry".into())
        }
        "InvalidSnapshot.NotFound" => Some("the imported snapshot is gone".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_fix() {
        assert!(
            hint_for(
                Some("InvalidParameter"),
                "The service role vmimport provided does not exist"
            )
            .expect("hint")
            .contains("vmimport")
        );
        assert!(hint_for(Some("InvalidParameter"), "something else").is_none());
        assert!(hint_for(None, "x").is_none());
    }

    #[test]
    fn tag_specifications_are_numbered() {
        let mut params = Vec::new();
        let tags: BTreeMap<String, String> =
            [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into();
        tag_specification(&mut params, "image", &tags);
        assert_eq!(
            params,
            [
                (
                    "TagSpecification.1.ResourceType".to_string(),
                    "image".to_string()
                ),
                ("TagSpecification.1.Tag.1.Key".into(), "a".into()),
                ("TagSpecification.1.Tag.1.Value".into(), "1".into()),
                ("TagSpecification.1.Tag.2.Key".into(), "b".into()),
                ("TagSpecification.1.Tag.2.Value".into(), "2".into()),
            ]
        );
    }
}
