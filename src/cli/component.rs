//! `builder component validate|run`.

use clap::Subcommand;

use super::CliResult;

#[derive(Debug, Subcommand)]
pub enum ComponentCommand {}

pub async fn main(command: ComponentCommand) -> CliResult {
    match command {}
}
