//! Registry credentials where people already keep them: docker's `config.json` (`auths`,
//! `credHelpers`, `credsStore`, read by `docker_credential`, which runs the
//! `docker-credential-*` helpers), then podman's `auth.json`. The first file with an entry for
//! the host wins; no entry anywhere means anonymous access. What was consulted is kept, so an
//! authentication failure can say which file or helper gave the credential.

use std::path::PathBuf;

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;

use super::OciError;

/// The credential for one registry and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Credentials {
    pub auth: RegistryAuth,
    /// `user `ci` from /home/ci/.docker/config.json`, or the files looked at when none matched.
    pub origin: String,
}

/// The files consulted, in order: `$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`),
/// `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
/// `~/.config/containers/auth.json`.
fn candidates() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut files = Vec::new();
    match (var("DOCKER_CONFIG"), var("HOME")) {
        (Some(dir), _) => files.push(dir.join("config.json")),
        (None, Some(home)) => files.push(home.join(".docker/config.json")),
        (None, None) => {}
    }
    if let Some(f) = var("REGISTRY_AUTH_FILE") {
        files.push(f);
    }
    if let Some(dir) = var("XDG_RUNTIME_DIR") {
        files.push(dir.join("containers/auth.json"));
    }
    if let Some(home) = var("HOME") {
        files.push(home.join(".config/containers/auth.json"));
    }
    files
}

/// The credential for `host` (`host[:port]`, as in the image reference). Blocking: a
/// credential helper is a program that runs.
pub(super) fn lookup(host: &str) -> Result<Credentials, OciError> {
    let files = candidates();
    for file in &files {
        let Ok(f) = fs_err::File::open(file) else {
            continue;
        };
        match docker_credential::get_credential_from_reader(std::io::BufReader::new(f), host) {
            Ok(DockerCredential::UsernamePassword(user, password)) => {
                return Ok(Credentials {
                    auth: RegistryAuth::Basic(user.clone(), password),
                    origin: format!("user `{user}` from {}", file.display()),
                });
            }
            Ok(DockerCredential::IdentityToken(token)) => {
                return Ok(Credentials {
                    auth: RegistryAuth::Bearer(token),
                    origin: format!("an identity token from {}", file.display()),
                });
            }
            Err(CredentialRetrievalError::NoCredentialConfigured) => {}
            // A `credsStore` helper is asked about every host; for one it does not know it
            // answers "credentials not found", which docker itself treats as anonymous.
            Err(CredentialRetrievalError::HelperFailure { stdout, stderr, .. })
                if format!("{stdout}{stderr}").contains("not found") => {}
            Err(e) => {
                return Err(OciError::Credentials {
                    file: file.clone(),
                    registry: host.to_string(),
                    message: e.to_string().trim().to_string(),
                });
            }
        }
    }
    let looked = if files.is_empty() {
        "no credential files (neither $DOCKER_CONFIG nor $HOME is set)".to_string()
    } else {
        format!(
            "no credential for {host} in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Ok(Credentials {
        auth: RegistryAuth::Anonymous,
        origin: looked,
    })
}
