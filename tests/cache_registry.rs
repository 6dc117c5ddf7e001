//! The layer cache shared through a real OCI registry (Debian's `docker-registry` on loopback,
//! see tests/support/registry.rs): layers made with qemu-img and qemu-io, cached in store A,
//! pushed, and pulled into store B's empty cache, whose parent image is another file. No VM;
//! the registry binary and qemu-utils (tests/support/qcow2.rs) are needed (scripts/install-deps installs them).

#[path = "support/qcow2.rs"]
mod qcow2;
#[path = "support/registry.rs"]
#[allow(dead_code)] // shared with tests/distribute_oci.rs, which uses all of it
mod registry;

use std::path::{Path, PathBuf};
use std::time::Duration;

use builder::distribute::NoProgress;
use builder::distribute::oci::OciOptions;
use builder::distribute::oci::layers::{
    self, LayerShareError, PARENT_SHA256, Pulled, Pushed, pull_layers, push_layers,
};
use builder::recipe::OciReference;
use builder::store::Store;
use builder::store::layers::{LayerCache, LayerInputs, LayerParent, Origin};
use builder::store::manifest::{Package, PackageList};
use builder::vm::DiskFormat;
use registry::TestRegistry;

/// A qcow2 at `path` (on `backing`) with 64 KiB of `pattern` at `offset`, its folder made.
fn image(path: &Path, backing: Option<&Path>, pattern: &str, offset: &str) {
    fs_err::create_dir_all(path.parent().expect("a folder")).expect("folder");
    qcow2::image(path, backing, pattern, offset, "64k");
}

fn key(n: u32) -> String {
    format!("{:064x}", 0xc0ffee_u64 * 1000 + u64::from(n))
}

/// Store A with a three-layer chain cached (boot, one, two) on its parent image, and store B
/// with an empty cache and the same parent image in another folder.
struct Setup {
    dir: tempfile::TempDir,
    a: LayerCache,
    b: LayerCache,
    base_b: PathBuf,
    chain: Vec<String>,
    /// The build's own top layer in A (what the cached chain must read as).
    top: PathBuf,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let base_a = d.join("a-parent/base.qcow2");
        image(&base_a, None, "0x11", "0");
        let base_b = d.join("b-parent/elsewhere.qcow2");
        fs_err::create_dir_all(base_b.parent().expect("folder")).expect("folder");
        fs_err::copy(&base_a, &base_b).expect("copy the parent");
        let work = d.join("work");
        let files = [
            work.join("l1.qcow2"),
            work.join("l2.qcow2"),
            work.join("l3.qcow2"),
        ];
        image(&files[0], Some(&base_a), "0x5a", "64k");
        image(&files[1], Some(&files[0]), "0x66", "128k");
        image(&files[2], Some(&files[1]), "0x77", "192k");
        let a = Store::open(d.join("a"))
            .expect("store A")
            .layers()
            .expect("cache A");
        let b = Store::open(d.join("b"))
            .expect("store B")
            .layers()
            .expect("cache B");
        let chain: Vec<String> = (1..=3).map(key).collect();
        let mut sha = String::new();
        let packages = PackageList {
            manager: "dpkg".into(),
            packages: vec![Package {
                name: "nginx".into(),
                version: "1.22.1-9".into(),
                arch: "amd64".into(),
            }],
        };
        let inputs = LayerInputs {
            layer: "two".into(),
            parameters: [("Greeting".to_string(), "hi".to_string())].into(),
            ..LayerInputs::default()
        };
        for (i, (file, component)) in files.iter().zip(["boot", "one", "two"]).enumerate() {
            let parent = if i == 0 {
                LayerParent::Base {
                    path: &base_a,
                    format: DiskFormat::Qcow2,
                }
            } else {
                LayerParent::Layer {
                    key: &chain[i - 1],
                    sha256: &sha,
                }
            };
            // The top layer keeps what went into its key and a package list (as a
            // generalize layer does): both travel with it.
            let top = i == 2;
            let origin = Origin {
                component,
                build: "web/1.0.0/1",
                inputs: top.then_some(&inputs),
                packages: top.then_some(&packages),
                ..Origin::default()
            };
            sha = a
                .insert(&chain[i], parent, file, origin)
                .await
                .expect("insert into A")
                .sha256;
        }
        Setup {
            top: files[2].clone(),
            dir,
            a,
            b,
            base_b,
            chain,
        }
    }

    async fn pull(&self, cache: &LayerCache, at: &OciReference, have: usize) -> Pulled {
        self.try_pull(cache, at, have).await.expect("pull")
    }

    async fn try_pull(
        &self,
        cache: &LayerCache,
        at: &OciReference,
        have: usize,
    ) -> Result<Pulled, LayerShareError> {
        pull_layers(
            cache,
            at,
            &self.base_b,
            DiskFormat::Qcow2,
            &self.chain,
            have,
            &options(at),
            &NoProgress,
        )
        .await
    }
}

async fn push(cache: &LayerCache, at: &OciReference, chain: &[String]) -> Pushed {
    push_layers(cache, at, chain, &options(at), &NoProgress)
        .await
        .expect("push")
}

fn options(at: &OciReference) -> OciOptions {
    OciOptions {
        plain_http: vec![at.registry.clone()],
        chunk_size: 1 << 20,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..OciOptions::default()
    }
}

fn repository(registry: &TestRegistry, path: &str) -> OciReference {
    format!("{}/{path}", registry.host())
        .parse()
        .expect("reference")
}

/// Files of inserts or downloads in progress left in a cache's folder.
fn leftovers(cache: &LayerCache) -> Vec<String> {
    fs_err::read_dir(cache.dir())
        .expect("cache folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn get_manifest(registry: &TestRegistry, repo: &str, tag: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/v2/{repo}/manifests/{tag}",
            registry.host()
        ))
        .header("accept", MANIFEST)
        .send()
        .await
        .expect("registry answers");
    assert_eq!(response.status().as_u16(), 200, "GET {repo}:{tag}");
    response.json().await.expect("json")
}

async fn put_manifest(
    registry: &TestRegistry,
    repo: &str,
    tag: &str,
    manifest: &serde_json::Value,
) {
    let response = reqwest::Client::new()
        .put(format!(
            "http://{}/v2/{repo}/manifests/{tag}",
            registry.host()
        ))
        .header("content-type", MANIFEST)
        .body(serde_json::to_vec(manifest).expect("json"))
        .send()
        .await
        .expect("registry answers");
    assert_eq!(response.status().as_u16(), 201, "PUT {repo}:{tag}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_pushed_from_one_store_is_pulled_into_another_on_its_own_parent() {
    let registry = TestRegistry::start();
    let t = Setup::new().await;
    let at = repository(&registry, "cache/web");

    let pushed = push(&t.a, &at, &t.chain).await;
    assert_eq!(pushed.pushed, t.chain);
    assert!(pushed.conflict.is_none() && pushed.not_cached.is_none());
    // The artifact's shape and annotations.
    let manifest = get_manifest(&registry, "cache/web", &t.chain[1]).await;
    assert_eq!(manifest["artifactType"], layers::LAYER_ARTIFACT_TYPE);
    assert_eq!(manifest["config"]["mediaType"], layers::LAYER_CONFIG);
    assert_eq!(manifest["layers"].as_array().expect("layers").len(), 1);
    assert_eq!(manifest["layers"][0]["mediaType"], layers::LAYER_QCOW2);
    let a1 = t.a.get(&t.chain[0]).await.expect("get").expect("cached");
    let notes = &manifest["annotations"];
    assert_eq!(notes[layers::KEY], t.chain[1].as_str());
    assert_eq!(notes[layers::PARENT], t.chain[0].as_str());
    assert_eq!(notes[PARENT_SHA256], a1.record.sha256.as_str());
    assert_eq!(notes[layers::COMPONENT], "one");
    assert_eq!(notes[layers::BUILD], "web/1.0.0/1");
    let first = get_manifest(&registry, "cache/web", &t.chain[0]).await;
    assert!(first["annotations"].get(layers::PARENT).is_none());
    drop(a1);

    // Twice: nothing is sent again.
    let again = push(&t.a, &at, &t.chain).await;
    assert!(again.pushed.is_empty(), "{again:?}");
    assert_eq!(again.present, t.chain);

    let pulled = t.pull(&t.b, &at, 0).await;
    assert_eq!(pulled.pulled, t.chain);
    assert_eq!((pulled.cached, pulled.stopped), (3, None));
    assert!(leftovers(&t.b).is_empty(), "{:?}", leftovers(&t.b));

    // B's lookup finds the whole chain sound, on B's own parent image.
    let found = t.b.lookup(&t.base_b, &t.chain).await.expect("lookup");
    assert!(found.discarded.is_empty(), "{:?}", found.discarded);
    assert_eq!(found.layers.len(), 3);
    let backing = t.b.dir().join(&found.layers[0].record.backing);
    assert_eq!(
        fs_err::canonicalize(backing).expect("backing"),
        fs_err::canonicalize(&t.base_b).expect("base")
    );
    for layer in &found.layers {
        assert_eq!(
            layer.record.source.as_deref(),
            Some(layers::location(&at).as_str())
        );
    }
    assert_eq!(found.layers[2].record.component, "two");
    let a3 = t.a.get(&t.chain[2]).await.expect("get").expect("cached");
    assert!(a3.record.packages.is_some() && a3.record.inputs.is_some());
    assert_eq!(found.layers[2].record.packages, a3.record.packages);
    assert_eq!(found.layers[2].record.inputs, a3.record.inputs);
    assert!(found.layers[0].record.packages.is_none());
    drop(a3);
    assert_eq!(found.layers[2].record.build, "web/1.0.0/1");
    // The same guest-visible disk as the build's in A.
    qcow2::run(
        "qemu-img",
        &[
            "compare".as_ref(),
            found.layers[2].path.as_os_str(),
            t.top.as_os_str(),
        ],
    );
    drop(found);

    // B pushing its pulled chain back sends nothing: its first layer names B's parent, yet
    // it is the repository's copy.
    let from_b = push(&t.b, &at, &t.chain).await;
    assert!(
        from_b.pushed.is_empty() && from_b.conflict.is_none(),
        "{from_b:?}"
    );
    // Nothing left to pull.
    let nothing = t.pull(&t.b, &at, 3).await;
    assert!(nothing.pulled.is_empty() && nothing.cached == 3);

    // A store that built its own first layer (other guest writes) meets A's: the first push
    // wins, and nothing of its chain is pushed.
    let c = Store::open(t.dir.path().join("c"))
        .expect("store C")
        .layers()
        .expect("cache C");
    let other = t.dir.path().join("work/other.qcow2");
    image(&other, Some(&t.base_b), "0x5b", "64k");
    let origin = Origin {
        component: "boot",
        build: "web/1.0.0/2",
        ..Origin::default()
    };
    let base = LayerParent::Base {
        path: &t.base_b,
        format: DiskFormat::Qcow2,
    };
    c.insert(&t.chain[0], base, &other, origin)
        .await
        .expect("insert into C");
    let from_c = push(&c, &at, &t.chain).await;
    assert!(from_c.pushed.is_empty(), "{from_c:?}");
    assert_eq!(
        from_c.conflict.as_ref().map(|c| c.key.as_str()),
        Some(t.chain[0].as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_pushed_chain_pulls_its_prefix_and_the_rest_later() {
    let registry = TestRegistry::start();
    let t = Setup::new().await;
    let at = repository(&registry, "cache/part");

    let pushed = push(&t.a, &at, &t.chain[..2]).await;
    assert_eq!(pushed.pushed, t.chain[..2]);
    let pulled = t.pull(&t.b, &at, 0).await;
    assert_eq!(pulled.cached, 2);
    assert!(
        pulled
            .stopped
            .as_deref()
            .is_some_and(|s| s.contains(&t.chain[2])),
        "{pulled:?}"
    );
    let found = t.b.lookup(&t.base_b, &t.chain).await.expect("lookup");
    assert_eq!(found.layers.len(), 2);
    drop(found);

    // The rest arrives; B continues from what it has.
    let rest = push(&t.a, &at, &t.chain).await;
    assert_eq!(rest.pushed, t.chain[2..]);
    let pulled = t.pull(&t.b, &at, 2).await;
    assert_eq!(pulled.pulled, t.chain[2..]);
    assert_eq!(pulled.cached, 3);
    let found = t.b.lookup(&t.base_b, &t.chain).await.expect("lookup");
    assert_eq!(found.layers.len(), 3);
    assert!(found.discarded.is_empty());

    // Nothing in the repository: nothing pulled, no error.
    let empty = repository(&registry, "cache/empty");
    let c = Store::open(t.dir.path().join("c"))
        .expect("store C")
        .layers()
        .expect("cache C");
    let pulled = t.pull(&c, &empty, 0).await;
    assert_eq!(pulled.cached, 0);
    assert!(c.list().expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_on_another_parent_or_with_a_corrupt_blob_is_refused() {
    let registry = TestRegistry::start();
    let t = Setup::new().await;

    // The second layer's manifest claims another parent blob.
    let at = repository(&registry, "cache/parent");
    push(&t.a, &at, &t.chain).await;
    let mut manifest = get_manifest(&registry, "cache/parent", &t.chain[1]).await;
    manifest["annotations"][PARENT_SHA256] = "0".repeat(64).into();
    put_manifest(&registry, "cache/parent", &t.chain[1], &manifest).await;
    let refused = t.try_pull(&t.b, &at, 0).await.expect_err("wrong parent");
    assert!(
        matches!(&refused, LayerShareError::WrongChain { key, .. } if *key == t.chain[1]),
        "{refused}"
    );
    assert!(refused.to_string().contains(&t.chain[1]), "{refused}");
    // What came before it stays cached and sound.
    let found = t.b.lookup(&t.base_b, &t.chain).await.expect("lookup");
    assert_eq!(found.layers.len(), 1);
    assert!(found.discarded.is_empty());
    drop(found);

    // The third layer's blob is damaged in the registry's storage (same size).
    let at = repository(&registry, "cache/blob");
    push(&t.a, &at, &t.chain).await;
    let manifest = get_manifest(&registry, "cache/blob", &t.chain[2]).await;
    let digest = manifest["layers"][0]["digest"].as_str().expect("digest");
    let hex = digest.trim_start_matches("sha256:");
    let data = registry
        .storage()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = fs_err::read(&data).expect("blob");
    bytes[100] ^= 0xff;
    fs_err::write(&data, bytes).expect("damage the blob");
    let c = Store::open(t.dir.path().join("c"))
        .expect("store C")
        .layers()
        .expect("cache C");
    let refused = t.try_pull(&c, &at, 0).await.expect_err("corrupt blob");
    assert!(
        matches!(
            &refused,
            LayerShareError::Transfer { key, source, .. }
                if *key == t.chain[2]
                    && matches!(**source, builder::distribute::oci::OciError::DigestMismatch { .. })
        ),
        "{refused}"
    );
    assert!(leftovers(&c).is_empty(), "{:?}", leftovers(&c));
    let found = c.lookup(&t.base_b, &t.chain).await.expect("lookup");
    assert_eq!(found.layers.len(), 2);
    assert!(found.discarded.is_empty());
}

const HELLO: &str = "name: hello\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: say\n        action: ExecuteBash\n        inputs:\n          commands: [echo hello]\n";
const RECIPE: &str = "name: shared\nversion: 1.0.0\nparentImage: base.qcow2\ncomponents:\n  - path: hello.yml\ntests: {enabled: false}\noutputs: {formats: [qcow2]}\n";

/// A recipe folder (its parent image, one component) at `dir`, the parent copied from
/// `parent` when given.
fn site(dir: &Path, parent: Option<&Path>) {
    fs_err::create_dir_all(dir).expect("site");
    match parent {
        Some(parent) => drop(fs_err::copy(parent, dir.join("base.qcow2")).expect("copy")),
        None => qcow2::image(&dir.join("base.qcow2"), None, "0x11", "0", "64k"),
    }
    fs_err::write(dir.join("hello.yml"), HELLO).expect("component");
    fs_err::write(dir.join("recipe.yml"), RECIPE).expect("recipe");
}

/// `builder build --json` of the recipe in `dir` on the store `store`, plain HTTP to
/// `registry`: exit code, events, stderr.
fn build(
    dir: &Path,
    store: &Path,
    registry: &str,
    args: &[&str],
) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["build", "--json", "--store"])
        .arg(store)
        .args(args)
        .arg("recipe.yml")
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env("BUILDER_INSECURE_REGISTRIES", registry)
        .output()
        .expect("builder build runs");
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    (
        out.status.code(),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A build on a store whose cache is empty, with `--cache-from` a repository that holds its
/// whole chain (pushed from another machine's cache, whose parent image is elsewhere):
/// every layer is pulled and reused, so no build VM boots (no QEMU is needed); the events
/// and the manifest name the repository, the manifest lists the packages the generalize
/// layer's record carried; `--cache-to` the same repository sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_takes_every_layer_from_a_shared_cache_and_boots_no_vm() {
    let registry = TestRegistry::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (site_a, site_b) = (dir.path().join("a"), dir.path().join("b"));
    site(&site_a, None);
    site(&site_b, Some(&site_a.join("base.qcow2")));

    // Machine A's cache holds the recipe's chain; it pushes it.
    let store_a = Store::open(dir.path().join("store-a")).expect("store A");
    let (plan, _) = builder::build::plan::make(&site_a.join("recipe.yml"), &store_a, &mut |_| {})
        .expect("plan");
    let chain = builder::build::cache::chain(&plan);
    let keys: Vec<String> = chain.iter().map(|l| l.key.clone()).collect();
    let cache_a = store_a.layers().expect("cache A");
    let base = site_a.join("base.qcow2");
    let mut below: Option<(PathBuf, String, String)> = None;
    for (i, layer) in chain.iter().enumerate() {
        let file = dir.path().join(format!("work/{i}.qcow2"));
        let backing = below.as_ref().map_or(base.clone(), |b| b.0.clone());
        image(&file, Some(&backing), "0x5a", &format!("{}k", 64 * (i + 1)));
        let parent = match &below {
            None => LayerParent::Base {
                path: &base,
                format: DiskFormat::Qcow2,
            },
            Some((_, key, sha256)) => LayerParent::Layer { key, sha256 },
        };
        // The generalize layer keeps the image's packages, for the manifest of a build that
        // takes every layer from the cache.
        let packages = PackageList {
            manager: "dpkg".into(),
            packages: vec![Package {
                name: "openssh-server".into(),
                version: "1:9.2p1-2".into(),
                arch: "amd64".into(),
            }],
        };
        let origin = Origin {
            component: &layer.name,
            build: "shared/1.0.0/1",
            packages: (i + 1 == chain.len()).then_some(&packages),
            ..Origin::default()
        };
        let inserted = cache_a
            .insert(&layer.key, parent, &file, origin)
            .await
            .expect("insert into A");
        below = Some((
            inserted.layer.path.clone(),
            layer.key.clone(),
            inserted.layer.record.sha256.clone(),
        ));
    }
    let at = repository(&registry, "cache/shared");
    assert_eq!(push(&cache_a, &at, &keys).await.pushed, keys);

    // Machine B builds the same recipe from its own folder, its cache empty.
    let from = format!("oci://{at}");
    let (code, events, stderr) = tokio::task::spawn_blocking({
        let (site_b, store_b, host) = (site_b.clone(), dir.path().join("store-b"), registry.host());
        move || {
            build(
                &site_b,
                &store_b,
                &host,
                &["--cache-from", &from, "--cache-to", &from],
            )
        }
    })
    .await
    .expect("build");
    assert_eq!(code, Some(0), "{stderr}");
    let of = |name: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["event"] == name).collect()
    };
    let layers: Vec<(String, String, String)> = of("layerCache")
        .iter()
        .map(|e| {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (text(&e["key"]), text(&e["status"]), text(&e["from"]))
        })
        .collect();
    let location = layers::location(&at);
    let expected: Vec<(String, String, String)> = keys
        .iter()
        .map(|k| (k.clone(), "cached".to_string(), location.clone()))
        .collect();
    assert_eq!(layers, expected, "{stderr}");
    assert!(
        !of("stageStarted").iter().any(|e| e["stage"] == "boot"),
        "a build VM booted"
    );
    let said: Vec<String> = of("progress")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    assert!(
        said.iter().any(
            |m| m.contains(&location) && m.contains(&format!("pulled {} layer(s)", keys.len()))
        ),
        "{said:#?}"
    );
    assert!(
        said.iter()
            .any(|m| m.contains(&format!("pushed 0 layer(s), {} already there", keys.len()))),
        "{said:#?}"
    );

    // The manifest says where each reused layer came from.
    let finished = of("buildFinished");
    let image = finished[0]["image"].as_str().expect("image");
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs_err::read(
            dir.path()
                .join("store-b/images")
                .join(image)
                .join("manifest.json"),
        )
        .expect("manifest"),
    )
    .expect("json");
    let froms: Vec<&str> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["from"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(froms, vec![location.as_str(); keys.len()]);
    assert_eq!(
        manifest["packages"]["packages"][0]["name"],
        "openssh-server"
    );
}
