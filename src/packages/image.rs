//! Checking a stored image: the package list and package sources its manifest records,
//! against what the repositories offer now, through the store's mirrors
//! (`packageUpdates.mirrors` in `<store>/config.yml`). The one place `builder images
//! outdated` and a pipeline's `packageUpdates` go through.

use super::{CheckError, CheckOptions, Outdated, check};
use crate::store::Store;
use crate::store::config::ConfigError;
use crate::store::manifest::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum ImageCheckError {
    #[error("could not check updates: {image} has no package list in its manifest")]
    NoPackages { image: String },
    #[error("could not check updates: {image} records no package sources in its manifest")]
    NoSources { image: String },
    #[error("could not check updates: the store's configuration cannot be read")]
    Config(#[source] ConfigError),
    #[error(transparent)]
    Check(#[from] CheckError),
}

impl ImageCheckError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ImageCheckError::NoPackages { .. } => Some(
                "the package list is read from the image after its build (dpkg or rpm); an image without either cannot be checked".into(),
            ),
            ImageCheckError::NoSources { .. } => Some(
                "builds record their apt or dnf sources since package update checks exist: build the image again once (a pipeline: `builder pipeline run --force`)".into(),
            ),
            ImageCheckError::Config(_) => Some("fix `<store>/config.yml` (see the error above)".into()),
            ImageCheckError::Check(e) => e.hint(),
        }
    }
}

/// Which of `manifest`'s installed packages have newer versions in its repositories now.
/// `image` names it in errors (`name/1.2.0/3`).
pub async fn check_image(
    store: &Store,
    image: &str,
    manifest: &Manifest,
) -> Result<Outdated, ImageCheckError> {
    let installed = manifest
        .packages
        .as_ref()
        .ok_or_else(|| ImageCheckError::NoPackages {
            image: image.to_string(),
        })?;
    let sources = manifest
        .package_sources
        .as_ref()
        .ok_or_else(|| ImageCheckError::NoSources {
            image: image.to_string(),
        })?;
    let config = store.config().map_err(ImageCheckError::Config)?;
    let options = CheckOptions {
        mirrors: config.package_updates.mirrors.clone(),
    };
    Ok(check(installed, sources, &options).await?)
}
