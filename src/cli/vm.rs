//! `builder vm exec|shell`.

use clap::Subcommand;

use super::CliResult;

#[derive(Debug, Subcommand)]
pub enum VmCommand {}

pub async fn main(command: VmCommand) -> CliResult {
    match command {}
}
