//! AWS credentials and region, found where the AWS CLI looks for them:
//!
//! 1. a profile named by the caller (`--profile`, recipe `profile:`): only that profile;
//! 2. else `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
//! 3. else the profile `$AWS_PROFILE` (or `default`) in the shared credentials file
//!    (`$AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`, sections `[name]`), then in
//!    the config file (`$AWS_CONFIG_FILE`, else `~/.aws/config`, sections `[profile name]` and
//!    `[default]`).
//!
//! The region: the caller's, else `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `region` in
//! the profile's config section.
//!
//! Profiles that get credentials some other way (assume role, SSO, `credential_process`, web
//! identity) are reported as not supported, with the AWS CLI command that exports plain
//! temporary credentials. Secrets never appear in `Debug` output or in any message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Nothing anywhere.
    #[error(
        "no AWS credentials found (tried: {}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         or run `aws configure` to write {}",
        tried.join("; "),
        credentials_file.display()
    )]
    NoCredentials {
        tried: Vec<String>,
        credentials_file: PathBuf,
    },
    #[error("{set} is set but {missing} is not; set both (or neither, to use a profile)")]
    PartialEnvironment {
        set: &'static str,
        missing: &'static str,
    },
    #[error(
        "the AWS profile `{profile}` was not found (looked in {}); check the name, or create \
         it with `aws configure --profile {profile}`",
        looked_in.join(" and ")
    )]
    ProfileNotFound {
        profile: String,
        looked_in: Vec<String>,
    },
    #[error(
        "the AWS profile `{profile}` in {} has `{present}` but no `{missing}`; add it",
        file.display()
    )]
    IncompleteProfile {
        profile: String,
        file: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error(
        "the AWS profile `{profile}` in {} gets its credentials through `{key}`, which builder \
         does not support; export temporary credentials first: \
         `eval \"$(aws configure export-credentials --profile {profile} --format env)\"`",
        file.display()
    )]
    UnsupportedProfile {
        profile: String,
        file: PathBuf,
        key: String,
    },
    #[error("{}:{line}: {detail}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    /// Reading a file failed; fs-err's error names the path.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// An access key pair (and session token), with where it came from. `Debug` shows neither
/// the secret nor the token.
#[derive(Clone)]
pub struct AwsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    /// Where these came from, for messages: `environment`, `profile default in ~/.aws/…`.
    pub source: String,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("source", &self.source)
            .finish()
    }
}

impl AwsCredentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
        source: impl Into<String>,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token,
            source: source.into(),
        }
    }

    /// The access key id (not a secret; AWS prints it in its own errors).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn has_session_token(&self) -> bool {
        self.session_token.is_some()
    }

    /// For the signer.
    pub(crate) fn to_signing(&self) -> aws_credential_types::Credentials {
        aws_credential_types::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            self.session_token.clone(),
            None,
            "builder",
        )
    }
}

/// Credentials and region as resolved.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub credentials: AwsCredentials,
    /// `None` when no source names one.
    pub region: Option<String>,
    /// Where the region came from (`AWS_REGION`, `profile default in …`, `option`).
    pub region_source: Option<String>,
    /// The profile that was consulted.
    pub profile: String,
}

/// Resolve credentials and region from this process's environment and the AWS files.
pub fn load(profile: Option<&str>, region: Option<&str>) -> Result<AwsConfig, CredentialsError> {
    load_with(profile, region, &|name| {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    })
}

/// [`load`] with the environment given as a function (tests pass a map).
pub fn load_with(
    explicit_profile: Option<&str>,
    explicit_region: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AwsConfig, CredentialsError> {
    let home = env("HOME").map(PathBuf::from);
    let credentials_file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")))
        .unwrap_or_else(|| PathBuf::from("~/.aws/credentials"));
    let config_file = env("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/config")))
        .unwrap_or_else(|| PathBuf::from("~/.aws/config"));
    let profile = explicit_profile
        .map(str::to_string)
        .or_else(|| env("AWS_PROFILE"))
        .unwrap_or_else(|| "default".to_string());

    let credentials_ini = read_ini(&credentials_file)?;
    let config_ini = read_ini(&config_file)?;
    let config_section = config_ini.as_ref().and_then(|ini| {
        let name = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        // The AWS CLI also accepts `[profile default]`.
        ini.get(&name)
            .or_else(|| ini.get(&format!("profile {profile}")))
    });
    let credentials_section = credentials_ini.as_ref().and_then(|ini| ini.get(&profile));

    let (region, region_source) = if let Some(r) = explicit_region {
        (Some(r.to_string()), Some("option".to_string()))
    } else if let Some(r) = env("AWS_REGION") {
        (Some(r), Some("AWS_REGION".to_string()))
    } else if let Some(r) = env("AWS_DEFAULT_REGION") {
        (Some(r), Some("AWS_DEFAULT_REGION".to_string()))
    } else if let Some(r) = config_section.and_then(|s| s.get("region")) {
        (
            Some(r.clone()),
            Some(format!("profile `{profile}` in {}", config_file.display())),
        )
    } else {
        (None, None)
    };
    let done = |credentials: AwsCredentials| AwsConfig {
        credentials,
        region: region.clone(),
        region_source: region_source.clone(),
        profile: profile.clone(),
    };

    let mut tried = Vec::new();
    if explicit_profile.is_none() {
        let id = env("AWS_ACCESS_KEY_ID");
        let secret = env("AWS_SECRET_ACCESS_KEY");
        match (id, secret) {
            (Some(id), Some(secret)) => {
                return Ok(done(AwsCredentials::new(
                    id,
                    secret,
                    env("AWS_SESSION_TOKEN"),
                    "environment variables",
                )));
            }
            (Some(_), None) => {
                return Err(CredentialsError::PartialEnvironment {
                    set: "AWS_ACCESS_KEY_ID",
                    missing: "AWS_SECRET_ACCESS_KEY",
                });
            }
            (None, Some(_)) => {
                return Err(CredentialsError::PartialEnvironment {
                    set: "AWS_SECRET_ACCESS_KEY",
                    missing: "AWS_ACCESS_KEY_ID",
                });
            }
            (None, None) => {
                tried.push("environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".into())
            }
        }
    }

    for (section, file) in [
        (credentials_section, &credentials_file),
        (config_section, &config_file),
    ] {
        let Some(section) = section else {
            let exists = if file.exists() {
                "no such profile"
            } else {
                "file not found"
            };
            tried.push(format!(
                "profile `{profile}` in {} ({exists})",
                file.display()
            ));
            continue;
        };
        for key in [
            "role_arn",
            "credential_process",
            "sso_start_url",
            "sso_session",
            "web_identity_token_file",
        ] {
            if section.contains_key(key) && !section.contains_key("aws_access_key_id") {
                return Err(CredentialsError::UnsupportedProfile {
                    profile: profile.clone(),
                    file: file.clone(),
                    key: key.to_string(),
                });
            }
        }
        match (
            section.get("aws_access_key_id"),
            section.get("aws_secret_access_key"),
        ) {
            (Some(id), Some(secret)) => {
                return Ok(done(AwsCredentials::new(
                    id.clone(),
                    secret.clone(),
                    section.get("aws_session_token").cloned(),
                    format!("profile `{profile}` in {}", file.display()),
                )));
            }
            (Some(_), None) => {
                return Err(CredentialsError::IncompleteProfile {
                    profile: profile.clone(),
                    file: file.clone(),
                    present: "aws_access_key_id",
                    missing: "aws_secret_access_key",
                });
            }
            (None, Some(_)) => {
                return Err(CredentialsError::IncompleteProfile {
                    profile: profile.clone(),
                    file: file.clone(),
                    present: "aws_secret_access_key",
                    missing: "aws_access_key_id",
                });
            }
            (None, None) => tried.push(format!(
                "profile `{profile}` in {} (no aws_access_key_id)",
                file.display()
            )),
        }
    }
    // A profile the user named (option or AWS_PROFILE) that exists nowhere is a typo.
    let named = explicit_profile.is_some() || env("AWS_PROFILE").is_some();
    if named && credentials_section.is_none() && config_section.is_none() {
        return Err(CredentialsError::ProfileNotFound {
            profile,
            looked_in: vec![
                credentials_file.display().to_string(),
                config_file.display().to_string(),
            ],
        });
    }
    Err(CredentialsError::NoCredentials {
        tried,
        credentials_file,
    })
}

type Ini = BTreeMap<String, BTreeMap<String, String>>;

/// Read an AWS-style INI file; `Ok(None)` when it does not exist.
fn read_ini(path: &Path) -> Result<Option<Ini>, CredentialsError> {
    match fs_err::read_to_string(path) {
        Ok(text) => parse_ini(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `[section]` headers, `key = value` lines, `#`/`;` comments. Indented lines continue a
/// nested setting (`s3 =` followed by `  max_concurrent_requests = 4`) and are skipped, as
/// nothing builder reads is nested. Later duplicates win, as in the AWS CLI.
fn parse_ini(path: &Path, text: &str) -> Result<Ini, CredentialsError> {
    let mut ini = Ini::new();
    let mut current: Option<String> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if raw.starts_with([' ', '\t']) && current.is_some() {
            continue;
        }
        let syntax = |detail: String| CredentialsError::Syntax {
            path: path.to_path_buf(),
            line: index + 1,
            detail,
        };
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(|| {
                syntax(format!("`{line}` starts a section but has no closing `]`"))
            })?;
            // `[profile   name]` is allowed; keep one space, as lookups use it.
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            ini.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(syntax(
                "expected `key = value`, a `[section]` header or a comment".to_string(),
            ));
        };
        let Some(section) = &current else {
            return Err(syntax(format!(
                "`{}` is outside any [section]; put it under [default] or [profile name]",
                key.trim()
            )));
        };
        // Inline comments need a space before `#`/`;` (values may contain either).
        let value = value
            .split(" #")
            .next()
            .and_then(|v| v.split(" ;").next())
            .unwrap_or_default()
            .trim();
        ini.entry(section.clone())
            .or_default()
            .insert(key.trim().to_ascii_lowercase(), value.to_string());
    }
    Ok(ini)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Home {
        dir: tempfile::TempDir,
    }

    impl Home {
        fn new(credentials: Option<&str>, config: Option<&str>) -> Home {
            let dir = tempfile::tempdir().expect("temp dir");
            fs_err::create_dir_all(dir.path().join(".aws")).expect("mkdir");
            if let Some(text) = credentials {
                fs_err::write(dir.path().join(".aws/credentials"), text).expect("write");
            }
            if let Some(text) = config {
                fs_err::write(dir.path().join(".aws/config"), text).expect("write");
            }
            Home { dir }
        }

        fn load(
            &self,
            profile: Option<&str>,
            vars: &[(&str, &str)],
        ) -> Result<AwsConfig, CredentialsError> {
            let home = self.dir.path().display().to_string();
            let mut map: BTreeMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            map.insert("HOME".into(), home);
            load_with(profile, None, &|name| map.get(name).cloned())
        }
    }

    const FILES_CREDENTIALS: &str = "# comment\n[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = secretdefault\n\n[work]\naws_access_key_id=AKIDWORK\naws_secret_access_key=secret/work+x ; inline\naws_session_token = tok\n";
    const FILES_CONFIG: &str = "[default]\nregion = eu-west-1\ns3 =\n  max_concurrent_requests = 4\n\n[profile work]\nregion = us-east-2\n\n[profile cfgonly]\nregion = ap-south-1\naws_access_key_id = AKIDCFG\naws_secret_access_key = secretcfg\n\n[profile sso]\nsso_session = corp\nregion = eu-north-1\n";

    #[test]
    fn environment_variables_come_first() {
        let home = Home::new(Some(FILES_CREDENTIALS), Some(FILES_CONFIG));
        let config = home
            .load(
                None,
                &[
                    ("AWS_ACCESS_KEY_ID", "AKIDENV"),
                    ("AWS_SECRET_ACCESS_KEY", "secretenv"),
                    ("AWS_SESSION_TOKEN", "token"),
                    ("AWS_PROFILE", "work"),
                ],
            )
            .expect("loads");
        assert_eq!(config.credentials.access_key_id(), "AKIDENV");
        assert!(config.credentials.has_session_token());
        assert_eq!(config.credentials.source, "environment variables");
        // The region still comes from the named profile when no variable sets it.
        assert_eq!(config.region.as_deref(), Some("us-east-2"));
    }

    #[test]
    fn profiles_from_both_files_and_region_order() {
        let home = Home::new(Some(FILES_CREDENTIALS), Some(FILES_CONFIG));
        let default = home.load(None, &[]).expect("default");
        assert_eq!(default.credentials.access_key_id(), "AKIDDEFAULT");
        assert_eq!(default.region.as_deref(), Some("eu-west-1"));

        let work = home
            .load(
                None,
                &[("AWS_PROFILE", "work"), ("AWS_DEFAULT_REGION", "sa-east-1")],
            )
            .expect("work");
        assert_eq!(work.credentials.access_key_id(), "AKIDWORK");
        assert_eq!(work.region.as_deref(), Some("sa-east-1"));
        assert_eq!(work.region_source.as_deref(), Some("AWS_DEFAULT_REGION"));
        assert_eq!(work.credentials.secret_access_key, "secret/work+x");

        let both = home
            .load(
                Some("work"),
                &[
                    ("AWS_REGION", "ca-central-1"),
                    ("AWS_DEFAULT_REGION", "sa-east-1"),
                    // An explicit profile wins over the environment's keys.
                    ("AWS_ACCESS_KEY_ID", "AKIDENV"),
                    ("AWS_SECRET_ACCESS_KEY", "secretenv"),
                ],
            )
            .expect("work");
        assert_eq!(both.credentials.access_key_id(), "AKIDWORK");
        assert_eq!(both.region.as_deref(), Some("ca-central-1"));

        let cfg = home.load(Some("cfgonly"), &[]).expect("config file keys");
        assert_eq!(cfg.credentials.access_key_id(), "AKIDCFG");
        assert_eq!(cfg.region.as_deref(), Some("ap-south-1"));
    }

    #[test]
    fn files_named_by_variables() {
        let dir = tempfile::tempdir().expect("temp dir");
        let creds = dir.path().join("c.ini");
        let conf = dir.path().join("k.ini");
        fs_err::write(
            &creds,
            "[x]\naws_access_key_id=A\naws_secret_access_key=B\n",
        )
        .expect("w");
        fs_err::write(&conf, "[profile x]\nregion=eu-south-1\n").expect("w");
        let vars: BTreeMap<&str, String> = [
            ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
            ("AWS_CONFIG_FILE", conf.display().to_string()),
            ("AWS_PROFILE", "x".to_string()),
        ]
        .into();
        let config = load_with(None, None, &|n| vars.get(n).cloned()).expect("loads");
        assert_eq!(config.credentials.access_key_id(), "A");
        assert_eq!(config.region.as_deref(), Some("eu-south-1"));
    }

    #[test]
    fn errors_say_what_was_tried_and_never_show_secrets() {
        let home = Home::new(None, None);
        let err = home.load(None, &[]).expect_err("nothing configured");
        let text = err.to_string();
        assert!(text.contains("AWS_ACCESS_KEY_ID"), "{text}");
        assert!(text.contains(".aws/credentials (file not found)"), "{text}");
        assert!(text.contains("aws configure"), "{text}");

        let err = home
            .load(None, &[("AWS_ACCESS_KEY_ID", "AKID")])
            .expect_err("half");
        assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY is not"));

        let home = Home::new(Some(FILES_CREDENTIALS), Some(FILES_CONFIG));
        let err = home.load(Some("wrok"), &[]).expect_err("typo");
        assert!(err.to_string().contains("`wrok` was not found"), "{err}");
        let err = home.load(Some("sso"), &[]).expect_err("sso");
        assert!(
            err.to_string().contains("export-credentials --profile sso"),
            "{err}"
        );

        let config = home.load(Some("work"), &[]).expect("work");
        let debug = format!("{config:?}");
        assert!(!debug.contains("secret/work"), "{debug}");
        assert!(!debug.contains("tok\""), "{debug}");
    }

    #[test]
    fn syntax_errors_have_file_and_line() {
        let home = Home::new(
            Some("[default]\naws_access_key_id = A\nnot a setting\n"),
            None,
        );
        let err = home.load(None, &[]).expect_err("bad file");
        let text = err.to_string();
        assert!(
            text.ends_with(
                "credentials:3: expected `key = value`, a `[section]` header or a comment"
            ),
            "{text}"
        );
        let home = Home::new(Some("key = value\n"), None);
        assert!(
            home.load(None, &[])
                .expect_err("outside")
                .to_string()
                .contains(":1: `key` is outside")
        );
    }
}
