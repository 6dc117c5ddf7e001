//! builder: golden machine images on a local QEMU/KVM hypervisor, offline.
//!
//! The modules and the data flow of one build:
//!
//! ```text
//! recipe.yml ─recipe─▶ Recipe ─build─▶ Plan ─vm─▶ RunningVm ─machine─▶ Session
//!   component documents ─component::parse─▶ Document ─component::executor─▶ phase reports
//!   ─build─▶ generalize, shut down, test in a fresh VM ─export─▶ artifacts ─distribute─▶ receipts
//! ```
//!
//! - [`yaml`]: YAML read into a node tree that keeps line and column of every value.
//! - [`diagnostic`]: problems in input files, collected and rendered with `file:line:col`.
//! - [`recipe`]: image recipes: model, validation (every problem at `file:line:col`), JSON Schema.
//! - [`component`]: AWSTOE component documents: model, validation, templating, executor.
//! - [`machine`]: where steps run ([`machine::Machine`]): this machine, a guest via our agent.
//! - [`agent`]: the host↔guest protocol spoken over virtio-serial.
//! - [`vm`]: qemu-img, QEMU launch and QMP, accelerator probe, cloud-init seed.
//! - [`undo`]: the undo list that releases what a stage or a VM created, and its report.
//! - [`build`]: the stages of a build, in order.
//! - [`export`]: the finished disk converted to qcow2/raw/vmdk/vhdx/vhd/ova, checked, hashed;
//!   `SHA256SUMS` and the `manifest.json` model.
//! - [`distribute`]: finished images pushed to OCI registries, AWS (AMI import), Vagrant
//!   boxes, directories; a receipt for each.
//! - [`store`]: the local store: base image cache and downloads, image versions `name/x.y.z/n`.

pub mod agent;
pub mod build;
pub mod component;
pub mod diagnostic;
pub mod distribute;
pub mod export;
pub mod machine;
pub mod pipeline;
pub mod recipe;
pub mod store;
pub mod undo;
pub mod vm;
pub mod yaml;
