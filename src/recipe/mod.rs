//! Image recipes: the model ([`model`]), every setting declared once ([`settings`]: key lists,
//! the JSON Schema for editors, the reference), reading and validating recipe files.
//!
//! Pure: [`check`] reads nothing but its arguments (an infrastructure file named by the recipe
//! is read through the caller's `include` function); [`load`] reads the recipe file and that
//! one include. Never imports `vm`, `build` or `distribute`; resolving inputs (component
//! documents, the parent image) is the plan's job (`build::plan`).
//!
//! A recipe file, with every key (camelCase, as Image Builder's):
//!
//! ```yaml
//! name: debian-12-web
//! version: 1.2.0
//! description: Debian 12 with nginx
//! parentImage: ../base/debian-12.qcow2     # or {url: https://…, sha256: …}, or name/1.x.x
//! components:
//!   - path: components/install-nginx.yml
//!     parameters: {packages: nginx curl}
//! workingDirectory: /var/tmp/builder
//! userData: |
//!   #cloud-config
//!   packages: [htop]
//! diskSize: 8GiB
//! infrastructure: {cpus: 2, memory: 2GiB, accelerator: auto, firmware: bios, network: none}
//! tests: {enabled: true, timeoutSeconds: 3600, components: [{path: tests/serves.yml}]}
//! outputs: {formats: [qcow2, vmdk], compression: zstd, name: "{{imagebuilder:name}}-{{imagebuilder:buildVersion}}"}
//! ```
//!
//! A container recipe (`containerType`, [`dockerfile`]) builds an OCI image from the same
//! components; the machine-only keys above (`userData`, `diskSize`, `outputs`, the VM's
//! `infrastructure` keys, …) are refused in it, as [`settings`] declares:
//!
//! ```yaml
//! name: debian-12-tools
//! version: 1.0.0
//! containerType: docker
//! parentImage: oci://registry.local:5000/base/debian:12@sha256:…   # or an OCI archive, or name/1.x.x
//! components: [{path: components/install-packages.yml, parameters: {Packages: curl jq}}]
//! dockerfileTemplate: |               # optional; this is the default
//!   FROM {{{ imagebuilder:parentImage }}}
//!   {{{ imagebuilder:environments }}}
//!   {{{ imagebuilder:components }}}
//! distribution: [{oci: {reference: registry.local:5000/tools/debian-12-tools}}, {directory: {path: out/, formats: [oci-archive]}}]
//! ```

pub mod components;
pub mod dockerfile;
pub mod model;
pub mod name_template;
pub mod oci_reference;
mod parse;
pub mod settings;
pub mod units;
pub mod version;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256 as Sha256Hasher};

pub use components::{
    bind_parameters, check_build_component, check_linux_actions, check_test_component,
};
pub use dockerfile::{DEFAULT_TEMPLATE, DockerfileTemplate};
pub use model::{
    Accelerator, ArchiveFormat, Boot, ComponentUse, Compression, ContainerRecipe, ContainerType,
    DirectoryFormats, Distribution, Firmware, Format, Infrastructure, Located, Network, Outputs,
    ParameterValue, ParentImage, Recipe, RecipeSource, Sha256, Tests, USER_DATA_IN_APPLIANCE,
    USER_DATA_IN_APPLIANCE_HINT,
};
pub use model::{
    AmiDistribution, AmiEndpoints, BootMode, DirectoryDistribution, ImportMethod, LaunchPermission,
    OciDistribution, SharedCache, VagrantDistribution,
};
pub use name_template::{NameTemplate, NameValues};
pub use oci_reference::{DEFAULT_OCI_TAG, OciReference, OciReferenceError, split_oci_reference};
pub use parse::resolve_relative;
pub(crate) use parse::{
    distribution as read_distribution, section_override, shared_cache as read_shared_cache,
};
pub use units::ByteSize;
pub use version::{Version, VersionError, VersionPattern};

use crate::diagnostic::{Diagnostics, Span};

/// The noun used in diagnostics headings.
pub const NOUN: &str = "recipe";
/// What an invalid recipe means for every command that reads one.
pub const CONSEQUENCE: &str = "nothing was started";

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipe file cannot be read; the io error names it.
    #[error("could not read the recipe")]
    Io(#[source] std::io::Error),
    /// The recipe (or a file it names) was read but is not valid: the diagnostics of each
    /// file with problems, the recipe's first.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostics>),
}

/// All files' diagnostics, one after another, without colour.
pub fn render(files: &[Diagnostics]) -> String {
    files
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| d.render(false))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The outcome of validating a recipe: the recipe when no file has an error, the component
/// entries that could be read (even when other parts failed, so their documents can be
/// checked too), and the diagnostics of the recipe file (always first) and of an included
/// infrastructure file.
#[derive(Debug)]
pub struct Checked {
    pub recipe: Option<Recipe>,
    /// The parent image when its entry is valid (even when other parts are not).
    pub parent: Option<Located<ParentImage>>,
    pub components: Vec<ComponentUse>,
    pub test_components: Vec<ComponentUse>,
    pub diagnostics: Vec<Diagnostics>,
}

impl Checked {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostics::has_errors)
    }
}

/// Validate `text` as the recipe at `path`. `include` is given the infrastructure file's path
/// as written and returns where it is and its text; it is called only when the recipe names
/// one.
pub fn check(
    path: &Path,
    text: &str,
    include: &mut dyn FnMut(&str) -> (PathBuf, std::io::Result<String>),
) -> Checked {
    let mut diagnostics = Diagnostics::new(path, text, NOUN).with_consequence(CONSEQUENCE);
    let (root, problems) = crate::yaml::parse(text);
    let yaml_failed = root.is_none() && !problems.is_empty();
    diagnostics.extend(problems);
    let mut cx = parse::new_reader(text);
    let mut included = Vec::new();
    let parts = match &root {
        Some(root) => parse::recipe(&mut cx, root, include, &mut included),
        None => {
            if !yaml_failed {
                cx.problems.push(
                    crate::diagnostic::Problem::error(
                        Span::from_offsets(text, 0, 0),
                        "the file holds no YAML document",
                    )
                    .with_hint(
                        "a recipe needs at least `name`, `version`, `parentImage` and `components`",
                    ),
                );
            }
            parse::Parts::default()
        }
    };
    diagnostics.extend(cx.problems);
    diagnostics.sort();
    let mut all = vec![diagnostics];
    for file in included {
        let mut d = Diagnostics::new(file.path, file.text, "infrastructure file")
            .with_consequence(CONSEQUENCE);
        d.extend(file.problems);
        d.sort();
        all.push(d);
    }
    let test_components = parts
        .tests
        .as_ref()
        .map(|t| t.components.clone())
        .unwrap_or_default();
    let components = parts.components.clone();
    let parent = parts.parent.clone();
    let failed = all.iter().any(Diagnostics::has_errors);
    let recipe = if failed {
        None
    } else {
        assemble(parts, path, text)
    };
    Checked {
        recipe,
        parent,
        components,
        test_components,
        diagnostics: all,
    }
}

fn assemble(parts: parse::Parts, path: &Path, text: &str) -> Option<Recipe> {
    Some(Recipe {
        name: parts.name?,
        version: parts.version?,
        description: parts.description,
        parent: parts.parent?,
        components: parts.components,
        working_directory: parts.working_directory?,
        user_data: parts.user_data,
        disk_size: parts.disk_size,
        infrastructure: parts.infrastructure?,
        tests: parts.tests?,
        outputs: parts.outputs?,
        generalize: parts.generalize?,
        distribution: parts.distribution?,
        cache: parts.cache?,
        container: parts.container?,
        source: RecipeSource {
            path: path.to_path_buf(),
            text: text.to_string(),
            sha256: Sha256::from_digest(&Sha256Hasher::digest(text.as_bytes())),
        },
    })
}

/// Validate `text` as the recipe at `path`, reading an infrastructure file from disk
/// (relative to the recipe's directory).
pub fn check_file(path: &Path, text: &str) -> Checked {
    check(path, text, &mut |name| {
        let resolved = resolve_relative(path, name);
        let read = fs_err::read_to_string(&resolved);
        (resolved, read)
    })
}

/// Read and validate the recipe at `path` (and the infrastructure file it names).
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    let text = fs_err::read_to_string(path).map_err(RecipeError::Io)?;
    let checked = check_file(path, &text);
    match checked.recipe {
        Some(recipe) => Ok(recipe),
        None => Err(RecipeError::Invalid(checked.diagnostics)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn no_include(name: &str) -> (PathBuf, std::io::Result<String>) {
        (
            PathBuf::from(name),
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        )
    }

    fn checked(text: &str) -> Checked {
        check(Path::new("r.yml"), text, &mut no_include)
    }

    fn messages(text: &str) -> Vec<String> {
        checked(text)
            .diagnostics
            .iter()
            .flat_map(|d| d.problems().iter().map(|p| p.message.clone()))
            .collect()
    }

    const MINIMAL: &str =
        "name: web\nversion: 1.0.0\nparentImage: base.qcow2\ncomponents:\n  - path: c.yml\n";

    #[test]
    fn minimal_recipe_gets_every_default() {
        let c = checked(MINIMAL);
        let r = c.recipe.unwrap();
        assert_eq!(r.name, "web");
        assert_eq!(r.version.to_string(), "1.0.0");
        assert_eq!(
            r.parent.value,
            ParentImage::File {
                path: "base.qcow2".into(),
                sha256: None
            }
        );
        assert_eq!(r.working_directory, "/tmp");
        assert_eq!(r.infrastructure, Infrastructure::default());
        assert_eq!(r.infrastructure.memory, ByteSize::gib(2));
        assert_eq!(r.tests, Tests::default());
        assert_eq!(r.outputs.formats, [Format::Qcow2]);
        assert_eq!(r.outputs.compression, Compression::Zlib);
        assert_eq!(r.disk_size, None);
        assert_eq!(r.source.sha256.as_str().len(), 64);
    }

    #[test]
    fn parent_image_forms() {
        let parent = |p: &str| {
            let text = MINIMAL.replace("base.qcow2", p);
            checked(&text).recipe.map(|r| r.parent.value)
        };
        assert_eq!(
            parent("debian-12-base/1.x.x"),
            Some(ParentImage::Store {
                name: "debian-12-base".into(),
                version: "1.x.x".parse().unwrap()
            })
        );
        assert_eq!(
            parent("{image: base/1.2.0/3}"),
            Some(ParentImage::Store {
                name: "base".into(),
                version: "1.2.0/3".parse().unwrap()
            })
        );
        let digest = "a".repeat(64);
        assert_eq!(
            parent(&format!(
                "{{url: 'https://example.invalid/x.qcow2', sha256: {digest}}}"
            )),
            Some(ParentImage::Url {
                url: "https://example.invalid/x.qcow2".into(),
                sha256: Sha256::parse(&digest).unwrap()
            })
        );
        assert_eq!(
            parent(&format!(
                "{{path: ./x.qcow2, sha256: {}}}",
                digest.to_uppercase()
            )),
            Some(ParentImage::File {
                path: "./x.qcow2".into(),
                sha256: Sha256::parse(&digest)
            })
        );
        assert_eq!(
            parent("${BASE}/x.qcow2"),
            Some(ParentImage::File {
                path: "${BASE}/x.qcow2".into(),
                sha256: None
            })
        );
        // Pinning is checked by the plan, which can ask the registry for the current digest.
        assert_eq!(
            parent("oci://registry/x:1"),
            Some(ParentImage::Oci {
                reference: "registry/x:1".into()
            })
        );
        assert_eq!(parent("oci://registry"), None);
        assert_eq!(parent("oci://registry/x@sha256:abc"), None);
        assert_eq!(parent("{url: 'oci://registry/x:1'}"), None);
        assert_eq!(parent("'${BASE'"), None);
        assert_eq!(parent("'${1X}'"), None);
        assert_eq!(parent("{path: a, url: 'https://b'}"), None);
        assert_eq!(parent("{image: base/1.x.x, sha256: aa}"), None);
    }

    #[test]
    fn every_problem_is_reported_once_with_its_value() {
        let text = "name: web site\nversion: 1.0\nparentImage: https://x/y.qcow2\ncomponents: []\ninfrastructure:\n  cpus: 0\n  memory: 64MiB\n  network: bridge\noutputs:\n  formats: [qcow2, qcow2, vdi]\n";
        let m = messages(text);
        assert_eq!(
            m,
            [
                "name `web site` holds ` `; names may hold letters, digits, `-` and `_`",
                "version `1.0` must have three numbers: major.minor.patch",
                "a parent image from a URL needs its sha256",
                "`components` is empty",
                "cpus (0) is below the minimum (1)",
                "memory (64MiB) is below the minimum (256MiB)",
                "unknown network `bridge`; expected `none` or `user`",
                "format `qcow2` is listed twice",
                "unknown output format `vdi`; expected `qcow2`, `raw`, `vmdk`, `vhdx`, `vhd` or `ova`",
            ]
        );
    }

    #[test]
    fn image_builder_spellings_get_a_translation() {
        let text = format!(
            "{MINIMAL}semanticVersion: 1.0.0\ninfrastructure:\n  terminateInstanceOnFailure: false\n"
        );
        let c = checked(&text);
        let hints: Vec<_> = c.diagnostics[0]
            .problems()
            .iter()
            .map(|p| p.hint.clone().unwrap())
            .collect();
        assert_eq!(
            hints[0],
            "`semanticVersion` is Image Builder's; here, write `version: 1.0.0`"
        );
        assert!(hints[1].contains("keepOnFailure"), "{hints:?}");
    }

    #[test]
    fn infrastructure_file_is_included_and_its_problems_are_its_own() {
        let text = MINIMAL.to_string() + "infrastructure: infra.yml\n";
        let mut include = |name: &str| {
            assert_eq!(name, "infra.yml");
            (
                PathBuf::from("dir/infra.yml"),
                Ok("cpus: 4\nmemry: 1G\n".to_string()),
            )
        };
        let c = check(Path::new("dir/r.yml"), &text, &mut include);
        assert!(c.recipe.is_none());
        assert!(c.diagnostics[0].is_empty());
        assert_eq!(c.diagnostics[1].path(), Path::new("dir/infra.yml"));
        assert_eq!(
            c.diagnostics[1].problems()[0].hint.as_deref(),
            Some("did you mean `memory`?")
        );
        let mut good = |_: &str| (PathBuf::from("i.yml"), Ok("cpus: 4\n".to_string()));
        let r = check(Path::new("r.yml"), &text, &mut good).recipe.unwrap();
        assert_eq!(r.infrastructure.cpus, 4);
        let missing = checked(&text);
        assert!(
            missing.diagnostics[0].problems()[0]
                .message
                .starts_with("could not read the infrastructure file `infra.yml`")
        );
    }

    #[test]
    fn generalize_is_on_unless_turned_off() {
        assert!(checked(MINIMAL).recipe.unwrap().generalize);
        let off = format!("{MINIMAL}generalize: false\n");
        assert!(!checked(&off).recipe.unwrap().generalize);
        let bad = format!("{MINIMAL}generalize: sometimes\n");
        assert!(checked(&bad).has_errors());
    }

    #[test]
    fn parameters_accept_strings_numbers_and_lists() {
        let text = "name: web\nversion: 1.0.0\nparentImage: b.qcow2\ncomponents:\n  - path: c.yml\n    parameters:\n      a: x y\n      b: 3\n      c: [p, q]\n";
        let r = checked(text).recipe.unwrap();
        let map = r.components[0].parameter_map();
        assert_eq!(map["a"], "x y");
        assert_eq!(map["b"], "3");
        assert_eq!(map["c"], "p,q");
    }

    #[test]
    fn components_survive_other_problems() {
        let text = "version: 1.0.0\nparentImage: b.qcow2\ncomponents:\n  - path: c.yml\ntests:\n  components:\n    - path: t.yml\n";
        let c = checked(text);
        assert!(c.recipe.is_none());
        assert_eq!(c.components.len(), 1);
        assert_eq!(c.test_components.len(), 1);
    }

    #[test]
    fn user_data_must_be_cloud_config() {
        let ok = format!("{MINIMAL}userData: |\n  #cloud-config\n  packages: [htop]\n");
        assert!(
            checked(&ok)
                .recipe
                .unwrap()
                .user_data
                .unwrap()
                .contains("htop")
        );
        let script = format!("{MINIMAL}userData: |\n  #!/bin/sh\n  echo hi\n");
        assert!(messages(&script)[0].contains("#cloud-config"));
        let broken = format!("{MINIMAL}userData: |\n  #cloud-config\n  packages: [htop\n");
        assert!(messages(&broken)[0].contains("not valid YAML"));
    }

    const FULL: &str = "name: web\nversion: 1.2.0\ndescription: d\nparentImage: {url: 'https://x/y', sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}\ncomponents:\n  - path: c.yml\n    parameters: {a: b, c: [d, e]}\nworkingDirectory: /var/tmp\nuserData: |\n  #cloud-config\n  packages: [htop]\ndiskSize: 8GiB\ninfrastructure:\n  cpus: 2\n  memory: 2GiB\n  accelerator: auto\n  firmware: uefi\n  network: user\n  bootTimeoutSeconds: 900\n  buildTimeoutSeconds: 7200\n  shutdownTimeoutSeconds: 120\n  keepOnFailure: false\ntests:\n  enabled: true\n  timeoutSeconds: 3600\n  components:\n    - path: t.yml\noutputs:\n  formats: [qcow2, raw, vmdk, vhdx, vhd, ova]\n  compression: zstd\n  name: \"{{imagebuilder:name}}-{{ imagebuilder:buildDate:yyyyMMddHHmm }}\"\n  directory: ./out\ndistribution: []\n";

    #[test]
    fn every_key_at_once() {
        let r = checked(FULL).recipe.unwrap();
        assert_eq!(r.infrastructure.firmware, Firmware::Uefi);
        assert_eq!(r.outputs.formats.len(), 6);
        assert_eq!(r.outputs.compression, Compression::Zstd);
        assert_eq!(r.outputs.directory.as_deref(), Some("./out"));
        assert_eq!(r.disk_size.unwrap().value, ByteSize::gib(8));
        assert_eq!(r.tests.components.len(), 1);
    }

    const CONTAINER: &str = "name: tools\nversion: 1.0.0\ncontainerType: docker\nparentImage: oci://registry.local:5000/base/debian:12@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\ncomponents:\n  - path: c.yml\n";

    /// (line, column, message) of each problem of the recipe file.
    fn placed(text: &str) -> Vec<(usize, usize, String)> {
        checked(text).diagnostics[0]
            .problems()
            .iter()
            .map(|p| (p.span.line, p.span.col, p.message.clone()))
            .collect()
    }

    #[test]
    fn a_container_recipe_gets_the_default_template_and_archive() {
        let text = format!(
            "{CONTAINER}distribution:\n  - directory: {{path: out/}}\n  - oci: {{reference: 'registry.local:5000/tools/x'}}\n"
        );
        let r = checked(&text).recipe.unwrap();
        let container = r.container.as_ref().unwrap();
        assert_eq!(container.container_type, ContainerType::Docker);
        assert_eq!(container.template.value.text(), DEFAULT_TEMPLATE);
        // The default template is located at `containerType`.
        assert_eq!(container.template.span.line, 3);
        assert!(matches!(r.parent.value, ParentImage::Oci { .. }));
        let Distribution::Directory(d) = &r.distribution[0].value else {
            panic!("a directory target")
        };
        assert_eq!(
            d.formats,
            DirectoryFormats::Container(vec![ArchiveFormat::OciArchive])
        );
        // A machine recipe's directory target copies every output.
        let machine = format!("{MINIMAL}distribution:\n  - directory: {{path: out/}}\n");
        let r = checked(&machine).recipe.unwrap();
        assert!(!r.is_container());
        let Distribution::Directory(d) = &r.distribution[0].value else {
            panic!("a directory target")
        };
        assert_eq!(d.formats, DirectoryFormats::Disk(vec![]));
    }

    #[test]
    fn a_container_recipe_reads_its_template_and_archives() {
        let text = format!(
            "{CONTAINER}dockerfileTemplate: |\n  FROM {{{{{{ imagebuilder:parentImage }}}}}}\n  ENV A=1\n  {{{{{{ imagebuilder:components }}}}}}\n  USER nobody\ndistribution:\n  - directory: {{path: out/, formats: [docker-archive, oci-archive]}}\ninfrastructure: {{buildTimeoutSeconds: 60, keepOnFailure: true}}\n"
        );
        let r = checked(&text).recipe.unwrap();
        let template = &r.container.as_ref().unwrap().template.value;
        assert_eq!(
            template.render("P", "", "RUN c"),
            "FROM P\nENV A=1\nRUN c\nUSER nobody\n"
        );
        let Distribution::Directory(d) = &r.distribution[0].value else {
            panic!("a directory target")
        };
        assert_eq!(
            d.formats.archives(),
            [ArchiveFormat::DockerArchive, ArchiveFormat::OciArchive]
        );
        assert_eq!(r.infrastructure.build_timeout_secs, 60);
        for parent in [
            "./debian.tar",
            "{path: ./debian.tar, sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}",
            "base/1.x.x",
            "'oci://r.local/b:12'",
        ] {
            let text = CONTAINER.replace(
                "oci://registry.local:5000/base/debian:12@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                parent,
            );
            assert!(checked(&text).recipe.is_some(), "{parent}");
        }
    }

    #[test]
    fn template_problems_are_placed_in_the_file() {
        let text = format!(
            "{CONTAINER}dockerfileTemplate: |\n  FROM debian:12\n  RUN x\n    {{{{{{ imagebuilder:component }}}}}}\n"
        );
        assert_eq!(
            placed(&text),
            [
                (7, 1, "the template has no `{{{ imagebuilder:components }}}` line".to_string()),
                (8, 8, "`FROM debian:12` does not start from the parent image; the template has no `FROM {{{ imagebuilder:parentImage }}}` line".to_string()),
                (10, 5, "unknown placeholder `{{{ imagebuilder:component }}}`".to_string()),
            ]
        );
        // Quoted: found in the scalar as written.
        let quoted = format!(
            "{CONTAINER}dockerfileTemplate: \"FROM {{{{{{ imagebuilder:parentImage }}}}}}\\n{{{{{{ imagebuilder:x }}}}}}\\n{{{{{{ imagebuilder:components }}}}}}\"\n"
        );
        assert_eq!(placed(&quoted)[0].0, 7);
        assert_eq!(placed(&quoted)[0].1, 61);
    }

    #[test]
    fn machine_only_settings_are_refused_in_a_container_recipe() {
        let text = format!(
            "{CONTAINER}diskSize: 8GiB\nuserData: x\ngeneralize: false\noutputs: {{formats: [raw]}}\ncache: {{to: 'oci://r.local/c'}}\ninfrastructure:\n  cpus: 4\n  firmware: uefi\n  keepOnFailure: true\ndistribution:\n  - vagrant: {{path: x.box}}\n  - ami: {{bucket: b}}\n  - containerDisk: {{reference: 'r.local/x'}}\n  - directory: {{path: out/, formats: [qcow2, oci-archive]}}\n"
        );
        let p = placed(&text);
        let at: Vec<(usize, usize)> = p.iter().map(|(l, c, _)| (*l, *c)).collect();
        assert_eq!(
            at,
            [
                (7, 1),
                (8, 1),
                (9, 1),
                (10, 1),
                (11, 1),
                (13, 3),
                (14, 3),
                (17, 5),
                (18, 5),
                (19, 5),
                (20, 39)
            ],
            "{p:#?}"
        );
        assert_eq!(
            p[0].2,
            "`diskSize` is for machine images; this is a container recipe (`containerType`)"
        );
        assert_eq!(
            p[5].2,
            "`infrastructure.cpus` is for machine images; this is a container recipe (`containerType`)"
        );
        assert_eq!(
            p[10].2,
            "`qcow2` is a disk format; a container image is written as `docker-archive` or `oci-archive`"
        );
        let url = CONTAINER.replace(
            "oci://registry.local:5000/base/debian:12@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "{url: 'https://x/y.tar', sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}",
        );
        assert_eq!(
            messages(&url),
            [
                "`parentImage.url` is for machine images; this is a container recipe (`containerType`)"
            ]
        );
    }

    #[test]
    fn a_container_parent_is_not_an_image_name_or_a_disk() {
        let parent = |p: &str| {
            let text = CONTAINER.replace(
                "oci://registry.local:5000/base/debian:12@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                p,
            );
            let c = checked(&text);
            let problems = c.diagnostics[0].problems().to_vec();
            (c.recipe.is_some(), problems)
        };
        let (ok, problems) = parent("docker.io/library/debian:12");
        assert!(!ok);
        assert_eq!(
            problems[0].hint.as_deref(),
            Some(
                "write `parentImage: oci://docker.io/library/debian:12@sha256:<64 hex digits>` (`skopeo inspect` prints the digest)"
            )
        );
        let (ok, problems) = parent("debian:12");
        assert!(!ok);
        assert!(
            problems[0]
                .hint
                .as_deref()
                .unwrap()
                .contains("oci://<registry>/debian:12@sha256:")
        );
        let (ok, problems) = parent("./base.qcow2");
        assert!(ok, "a warning only");
        assert!(problems[0].message.contains("looks like a disk image"));
        assert!(parent("./debian:12.tar").0);
        assert!(parent("${BASE}/debian.tar").0);
    }

    #[test]
    fn container_settings_are_refused_in_a_machine_recipe() {
        let text = format!(
            "{MINIMAL}dockerfileTemplate: x\ndistribution:\n  - directory: {{path: out/, formats: [oci-archive]}}\n"
        );
        assert_eq!(
            messages(&text),
            [
                "`dockerfileTemplate` is for container recipes",
                "`oci-archive` is only for container recipes"
            ]
        );
        let wrong = CONTAINER.replace("containerType: docker", "containerType: DOCKER");
        let c = checked(&wrong);
        let problem = &c.diagnostics[0].problems()[0];
        assert_eq!(
            problem.message,
            "unknown container type `DOCKER`; expected `docker`"
        );
        assert_eq!(problem.hint.as_deref(), Some("did you mean `docker`?"));
    }

    proptest::proptest! {
        /// Any edit of a valid recipe gives a recipe or problems, never a panic.
        #[test]
        fn edited_recipes_never_panic(at in 0usize..2000, len in 0usize..8, insert in ".{0,6}") {
            let c = checked(&crate::yaml::edited(FULL, at, len, &insert));
            proptest::prop_assert!(c.recipe.is_some() || c.has_errors());
        }
    }

    #[test]
    fn hostile_input_is_a_problem_not_a_panic() {
        for text in [
            "",
            "[",
            "- a\n- b\n",
            "name: {{ x }}\n",
            "\u{feff}name: x\n",
            "a: &a [*a]\n",
        ] {
            let c = checked(text);
            assert!(c.has_errors(), "{text:?}");
        }
    }
}
