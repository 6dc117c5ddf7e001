//! builder: golden machine images on a local QEMU/KVM hypervisor, offline.
//!
//! The data flow of one build:
//!
//! ```text
//! recipe.yml ─recipe─▶ Recipe ─build─▶ Plan ─vm─▶ RunningVm ─machine─▶ Session
//!   component documents ─component::parse─▶ Document ─component::executor─▶ phase reports
//!   ─build─▶ generalize, shut down, test in a fresh VM ─export─▶ artifacts ─distribute─▶ receipts
//! ```
//!
//! The modules in layers. A module uses modules of the layers above its own (the ones named
//! in brackets), never one of its own layer or below: dependencies point up this list, toward
//! the pure values. `tests/module_layers.rs` fails on any module that depends on a module that
//! depends on it (doc links count: rustdoc resolves them).
//!
//! 1. Nothing else of the crate:
//!    - [`diagnostic`]: problems in input files, collected and rendered with `file:line:col`.
//!    - [`undo`]: the undo list that releases what a stage or a VM created, and its report.
//!    - [`digest`]: sha256 of files, streamed, with progress: the one file hasher.
//!    - [`agent`]: the host↔guest protocol spoken over virtio-serial.
//!    - [`atomic`]: files written whole or not at all (temporary sibling, sync, rename).
//! 2. Only layer 1:
//!    - [`yaml`] (diagnostic): YAML read into a node tree that keeps line and column of every
//!      value.
//!    - [`aws`] (digest): signed AWS requests, credentials, the one S3 client (objects,
//!      resumable multipart upload).
//! 3. [`machine`] (agent): where steps run ([`machine::Machine`]): this machine, a guest via
//!    our agent or qemu-guest-agent.
//! 4. [`component`] (machine, yaml, aws, diagnostic): AWSTOE component documents: model,
//!    validation, templating, executor.
//! 5. [`recipe`] (component, yaml, diagnostic): image recipes: model, validation (every
//!    problem at `file:line:col`), JSON Schema.
//! 6. [`vm`] (machine, agent, undo): qemu-img, QEMU launch and QMP, accelerator probe,
//!    cloud-init seed.
//! 7. [`store`] (recipe, digest, diagnostic, vm, yaml): the local store: base image cache and
//!    downloads, the layer cache (component layers by key, qcow2 chains rebased with
//!    qemu-img, pruned to the cap of the store's `config.yml`), image versions `name/x.y.z/n`
//!    with their manifests (the `manifest.json` model) and receipts; container builds as OCI
//!    image layouts (the shapes of OCI manifests, indexes and descriptors live there).
//! 8. [`export`] (store, vm, recipe): the finished disk converted to
//!    qcow2/raw/vmdk/vhdx/vhd/ova, checked, hashed, recorded as the manifest's artifacts;
//!    `SHA256SUMS`.
//!    [`container`] (machine, agent, undo, vm, store): buildah in the store's private
//!    container storage, the isolation probe, the agent in a container, leftovers recovery.
//!    [`packages`] (store, diagnostic): the package update check: an image's recorded apt
//!    sources and keys, its repositories' signed indices fetched on the host, versions
//!    compared by Debian's rules.
//! 9. [`distribute`] (store, export, vm, recipe, aws, diagnostic): finished images pushed to OCI
//!    registries, AWS (AMI import), Vagrant boxes, directories; a receipt for each.
//! 10. [`build`] (all of the above): the stages of a build, in order, and its plan.
//! 11. [`pipeline`] (build, store, distribute, export, recipe, component, yaml, diagnostic):
//!     scheduled builds of a recipe, their history, notifications and image lifecycle.

// `expect` is reviewed in the library and the binaries: each one left says why it cannot fail
// and carries `#[expect(clippy::expect_used, reason = ...)]`. Unit tests are exempt
// (`allow-expect-in-tests` in clippy.toml); so are tests/ and examples/, which are other crates
// and do not take this lint (it is here, not in `[workspace.lints]`, for that reason).
#![warn(clippy::expect_used)]

pub mod agent;
pub mod atomic;
pub mod aws;
pub mod build;
pub mod component;
pub mod container;
pub mod diagnostic;
pub mod digest;
pub mod distribute;
pub mod export;
pub mod machine;
pub mod packages;
pub mod pipeline;
pub mod recipe;
pub mod store;
pub mod undo;
pub mod vm;
pub mod yaml;
