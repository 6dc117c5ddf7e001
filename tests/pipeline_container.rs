//! Container tier: a pipeline of a container recipe (real buildah, the fixture's Debian 12
//! base container) with `startCondition: dependencyChanged`, run with `builder pipeline run`:
//!
//! 1. the first run builds (no earlier execution), and stores a container build;
//! 2. the second is skipped: nothing changed;
//! 3. after a component changes, it builds again, and the reason names the component;
//! 4. after the parent image changes (another OCI archive at the same path, with another
//!    digest), it builds again, and the reason names the parent.
//!
//! Nothing is left behind: no working container in builder's storage, no build folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use builder::pipeline::history::{ExecStatus, Execution, History};
use builder::store::Store;

#[path = "support/container_tier.rs"]
mod container_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

const COMPONENT: &str = r#"name: greet
description: Writes a greeting.
schemaVersion: 1.0
parameters:
  - Greeting:
      type: string
      default: hello
phases:
  - name: build
    steps:
      - name: Write
        action: CreateFile
        inputs:
          - path: /etc/greeting
            content: "{{ Greeting }}"
  - name: validate
    steps:
      - name: Check
        action: ExecuteBash
        inputs:
          commands:
            - grep -qx 'GREETING' /etc/greeting
"#;

const PIPELINE: &str = "name: greet\nrecipe: ../recipe.yml\nschedule:\n  expression: '0 3 * * *'\n  startCondition: dependencyChanged\n";

struct Site {
    guard: NoLeftovers,
}

impl Site {
    fn new(parent: &Path) -> Site {
        let guard = NoLeftovers::new();
        let d = guard.root();
        fs_err::create_dir_all(d.join("pipelines")).expect("mkdir");
        fs_err::copy(parent, d.join("parent.oci.tar")).expect("copy the parent");
        fs_err::write(d.join("pipelines/greet.yml"), PIPELINE).expect("write the pipeline");
        fs_err::write(
            d.join("recipe.yml"),
            "name: greet\nversion: 1.0.0\ncontainerType: docker\nparentImage: parent.oci.tar\ncomponents:\n  - path: greet.yml\ntests: {enabled: false}\n",
        )
        .expect("write the recipe");
        let site = Site { guard };
        site.component("hello");
        site
    }

    fn path(&self, p: &str) -> PathBuf {
        self.guard.root().join(p)
    }

    fn component(&self, greeting: &str) {
        fs_err::write(
            self.path("greet.yml"),
            COMPONENT
                .replace("default: hello", &format!("default: {greeting}"))
                .replace("GREETING", greeting),
        )
        .expect("write the component");
    }

    fn run(&self) -> Execution {
        let args = ["pipeline", "run", "pipelines/greet.yml"];
        let mut cmd = self.guard.builder_command(&args);
        cmd.arg("--store").arg(self.path("store"));
        let out = leftovers::run_echoed(&mut cmd, &args);
        assert_eq!(out.status.code(), Some(0), "pipeline run");
        let store = Store::open(self.path("store")).expect("store");
        let history = History::open(&History::default_path(&store)).expect("history");
        history
            .executions(Some("greet"), 100)
            .expect("executions")
            .into_iter()
            .next()
            .expect("an execution")
    }
}

fn details(e: &Execution) -> String {
    e.transitions
        .iter()
        .map(|t| format!("{}: {}", t.status, t.detail.as_deref().unwrap_or("")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[cfg_attr(
    not(container_tier),
    ignore = "container tier: set BUILDER_CONTAINER_TESTS=1 and BUILDER_TEST_CONTAINER (scripts/test does)"
)]
fn a_container_pipeline_rebuilds_when_a_component_or_the_parent_changed() {
    let parent = container_tier::base_container();
    let site = Site::new(&parent);

    let first = site.run();
    assert_eq!(first.status, ExecStatus::Available, "{}", details(&first));
    assert_eq!(first.image.as_deref(), Some("greet/1.0.0/1"));

    let skipped = site.run();
    assert_eq!(skipped.status, ExecStatus::Skipped, "{}", details(&skipped));
    assert!(
        details(&skipped).contains("nothing changed since execution"),
        "{}",
        details(&skipped)
    );

    site.component("bonjour");
    let component = site.run();
    let why = details(&component);
    assert_eq!(component.status, ExecStatus::Available, "{why}");
    assert!(why.contains("dependency changed since execution"), "{why}");
    assert!(
        why.contains("component `greet` document changed"),
        "the reason names the component: {why}"
    );
    assert_eq!(component.image.as_deref(), Some("greet/1.0.0/2"));

    // Another archive of the same image at the same path: the index names it differently, so
    // the file (and its digest) differ.
    let other = site.path("other.oci.tar");
    let copied = Command::new("skopeo")
        .arg("copy")
        .arg("--quiet")
        .arg(format!("oci-archive:{}", parent.display()))
        .arg(format!("oci-archive:{}:renamed", other.display()))
        .status()
        .expect("skopeo runs");
    assert!(copied.success(), "skopeo copy");
    fs_err::rename(&other, site.path("parent.oci.tar")).expect("replace the parent");
    let parent_changed = site.run();
    let why = details(&parent_changed);
    assert_eq!(parent_changed.status, ExecStatus::Available, "{why}");
    assert!(
        why.contains("parent image `parent.oci.tar` changed"),
        "the reason names the parent: {why}"
    );
    assert_eq!(parent_changed.image.as_deref(), Some("greet/1.0.0/3"));

    let left = site.guard.leftovers();
    assert!(left.is_empty(), "left behind:\n  {}", left.join("\n  "));
    let containers = Command::new("buildah")
        .arg("--root")
        .arg(site.path("store/containers/storage"))
        .arg("--runroot")
        .arg(site.path("store/containers/run"))
        .args(["containers", "--quiet"])
        .output()
        .expect("buildah runs");
    assert_eq!(
        String::from_utf8_lossy(&containers.stdout).trim(),
        "",
        "no working container is left in builder's storage"
    );
    container_tier::remove_engine_dir(&site.path("store/containers"));
}
