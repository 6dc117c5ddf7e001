//! The `builder` command line: parse arguments, call the library, map errors to exit codes.
//! Every command lives in `cli/<group>.rs`; this file only wires them up.

// `expect` is reviewed here as in the library (see src/lib.rs); tests are exempt.
#![warn(clippy::expect_used)]

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build golden machine images on a local QEMU/KVM hypervisor, offline.
#[derive(Debug, Parser)]
#[command(name = "builder", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate and run AWSTOE-compatible component documents.
    #[command(subcommand)]
    Component(cli::component::ComponentCommand),
    /// Throwaway VMs from a disk image: run a command or open a shell through the agent.
    #[command(subcommand)]
    Vm(cli::vm::VmCommand),
    /// Check a recipe and every file it names (components, infrastructure) without starting
    /// anything: every problem at its file:line:col with a hint.
    Validate(cli::recipe::ValidateArgs),
    /// Print the resolved plan of a recipe: defaults, inputs pinned by sha256, stages. No VM
    /// is started.
    Plan(cli::recipe::PlanArgs),
    /// Print the JSON Schema (draft 2020-12) of an input file, for editors.
    Schema(cli::recipe::SchemaArgs),
    /// Build a recipe: boot the parent, run the components, generalize, test in a fresh VM,
    /// export every format, and store the image as `name/x.y.z/n`.
    Build(cli::build::BuildArgs),
    /// Send an image from the store to OCI registries, AWS (AMI), a Vagrant box or a folder;
    /// each target's receipt is printed and recorded in the store.
    Distribute(Box<cli::distribute::DistributeArgs>),
    /// The image versions in the local store: list, show, remove.
    #[command(subcommand)]
    Images(cli::images::ImagesCommand),
    /// The layer cache (component layers kept by key, reused by later builds): list, prune.
    #[command(subcommand)]
    Cache(cli::cache::CacheCommand),
    /// Pipelines: a recipe built on a schedule or when a dependency changed, with a history.
    #[command(subcommand)]
    Pipeline(cli::pipeline::PipelineCommand),
    /// Run the pipelines of a folder on their schedules (a long-running scheduler; see
    /// contrib/systemd/builder-serve.service).
    Serve(cli::pipeline::ServeArgs),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return cli::report(&cli::Failure::host(
                anyhow::Error::new(e).context("could not start the async runtime"),
            ));
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            Command::Component(cmd) => cli::component::main(cmd).await,
            Command::Vm(cmd) => cli::vm::main(cmd).await,
            Command::Validate(args) => cli::recipe::validate(args),
            Command::Plan(args) => cli::recipe::plan(args),
            Command::Schema(args) => cli::recipe::schema(args),
            Command::Build(args) => cli::build::main(args).await,
            Command::Distribute(args) => cli::distribute::main(*args).await,
            Command::Images(cmd) => cli::images::main(cmd).await,
            Command::Cache(cmd) => cli::cache::main(cmd).await,
            Command::Pipeline(cmd) => cli::pipeline::main(cmd).await,
            Command::Serve(args) => cli::pipeline::serve(args).await,
        }
    });
    // Leave no task behind: the runtime drops here, after every undo has run.
    drop(runtime);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => cli::report(&failure),
    }
}
