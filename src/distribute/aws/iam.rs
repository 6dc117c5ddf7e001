//! IAM, for one question before an import: does the VM Import service role exist? IAM is a
//! global Query API (`Version=2010-05-08`) signed for `us-east-1`.

use crate::aws::client::{self, Client, RequestError, RetryPolicy, Service};
use crate::aws::credentials::AwsCredentials;

const VERSION: &str = "2010-05-08";
/// IAM's signing region in the standard partition.
const SIGNING_REGION: &str = "us-east-1";

#[derive(Debug, thiserror::Error)]
pub enum IamError {
    #[error("the IAM endpoint `{endpoint}` is not an http:// or https:// URL")]
    BadEndpoint { endpoint: String },
    #[error("IAM GetRole for `{role}` failed")]
    Request {
        role: String,
        #[source]
        source: RequestError,
    },
}

/// What IAM says about a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleCheck {
    /// The role exists (its ARN).
    Exists(String),
    Missing,
    /// The credentials may not call iam:GetRole (common for import-only users).
    NotAllowed,
}

#[derive(Debug, Clone)]
pub struct IamClient {
    client: Client,
}

impl IamClient {
    pub fn new(
        http: reqwest::Client,
        credentials: AwsCredentials,
        endpoint: Option<&str>,
        retry: RetryPolicy,
    ) -> Result<IamClient, IamError> {
        let client = Client::new(
            http,
            Some(credentials),
            SIGNING_REGION,
            Service::Iam,
            endpoint,
            retry,
        )
        .map_err(|endpoint| IamError::BadEndpoint { endpoint })?;
        Ok(IamClient { client })
    }

    pub fn endpoint(&self) -> &str {
        &self.client.endpoint
    }

    pub async fn get_role(&self, role: &str) -> Result<RoleCheck, IamError> {
        let request = client::query_request(
            &self.client.endpoint,
            "GetRole",
            VERSION,
            &[("RoleName".to_string(), role.to_string())],
        );
        match self.client.send_xml(&request).await {
            Ok(root) => Ok(RoleCheck::Exists(
                root.text_at(&["GetRoleResult", "Role", "Arn"])
                    .unwrap_or_default(),
            )),
            Err(e) if e.code() == Some("NoSuchEntity") => Ok(RoleCheck::Missing),
            Err(e) if matches!(e.code(), Some("AccessDenied" | "AccessDeniedException")) => {
                Ok(RoleCheck::NotAllowed)
            }
            Err(source) => Err(IamError::Request {
                role: role.to_string(),
                source,
            }),
        }
    }
}
