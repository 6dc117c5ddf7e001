//! `builder distribute NAME[/VERSION[/BUILD]] --to TARGET [--to …]`: send an image already in
//! the store to one or more targets. Every target is checked first (destinations free,
//! references valid, credentials and buckets answer); then each runs in turn, its receipt is
//! printed and recorded in the store. stdout carries the receipts' locations, one per line,
//! or with `--json` one event per line; progress goes to stderr.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use anstream::eprintln;
use anstyle::{AnsiColor, Style};
use clap::Args;
use serde::Serialize;

use super::{CliResult, EXIT_FAILED, EXIT_HOST, EXIT_INPUT, Failure};
use builder::diagnostic::{causes, error_chain};
use builder::distribute::destination::{
    self, AmiDestination, CliOptions, Destination, DestinationError,
};
use builder::distribute::directory::DirectoryError;
use builder::distribute::{DistributeError, Progress, Receipt, Unit};
use builder::recipe::Format;
use builder::recipe::model::ArchiveFormat;
use builder::store::{ImageRef, human_size};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct DistributeArgs {
    /// The stored image: `NAME`, `NAME/VERSION` (with `x` wildcards) or `NAME/VERSION/BUILD`;
    /// a partial reference means the newest matching build.
    #[arg(value_name = "NAME[/VERSION[/BUILD]]")]
    reference: String,
    /// Where to: `oci://REGISTRY/REPO:TAG` (an OCI artifact), `containerdisk://REGISTRY/REPO:TAG`
    /// (a KubeVirt containerDisk), `ami` (with `--region`, `--bucket`), `vagrant:PATH.box`
    /// (a libvirt box; `vagrant:DIR/` for `DIR/<name>.box`), `dir:PATH` (a copy in
    /// `PATH/<name>/`) or `store`. A container build goes to `oci://REGISTRY/REPO:TAG` (the
    /// image itself, same digests), `dir:PATH` (archive files) or `store`. Repeat for several
    /// targets.
    #[arg(long = "to", value_name = "TARGET", required = true)]
    to: Vec<String>,
    /// Name template for `dir:` folders, `vagrant:DIR/` boxes and AMIs
    /// [default: {{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}].
    #[arg(long, value_name = "TEMPLATE")]
    name: Option<String>,
    /// `dir:` targets: the formats to copy; one the build did not export is converted (e.g.
    /// `ova`) [default: every output of the build]. A container build is written as
    /// `oci-archive` or `docker-archive` files [default: oci-archive]. Repeatable.
    #[arg(long = "format", value_name = "FORMAT", value_parser = parse_format)]
    formats: Vec<FormatArg>,
    /// `dir:` and `vagrant:` targets: replace what is already there.
    #[arg(long)]
    overwrite: bool,
    /// Talk to this registry host over plain HTTP (a registry on loopback or a lab network).
    /// Repeatable.
    #[arg(long = "plain-http", value_name = "HOST")]
    plain_http: Vec<String>,
    /// `ami`: the region [default: AWS_REGION, AWS_DEFAULT_REGION, the profile's].
    #[arg(long)]
    region: Option<String>,
    /// `ami`: the S3 bucket the disk is uploaded to.
    #[arg(long)]
    bucket: Option<String>,
    /// `ami`: the key prefix in the bucket [default: builder-imports/].
    #[arg(long)]
    prefix: Option<String>,
    /// `ami`: one endpoint URL for both S3 and EC2 (an on-premises compatible service).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// `ami`: the S3 endpoint URL (overrides `--endpoint`).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// `ami`: the EC2 endpoint URL (overrides `--endpoint`).
    #[arg(long, value_name = "URL")]
    ec2_endpoint: Option<String>,
    /// `ami`: the AWS profile [default: AWS_PROFILE, else default].
    #[arg(long)]
    profile: Option<String>,
    /// `ami`: the AMI's description.
    #[arg(long)]
    description: Option<String>,
    /// `ami`: a tag `KEY=VALUE` on the AMI and its snapshot. Repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// `ami`: copy the AMI to this region too. Repeatable.
    #[arg(long = "copy-to-region", value_name = "REGION")]
    copy_to_regions: Vec<String>,
    /// `ami`: let this account (12 digits) launch the AMI. Repeatable.
    #[arg(long = "share-with", value_name = "ACCOUNT")]
    share_with: Vec<String>,
    /// `ami`: make the AMI public (launch permission group `all`).
    #[arg(long)]
    public: bool,
    /// `ami`: `legacy-bios`, `uefi` or `uefi-preferred` [default: from the build's firmware].
    #[arg(long, value_name = "MODE")]
    boot_mode: Option<String>,
    /// `ami`: `snapshot` (ImportSnapshot + RegisterImage) or `image` (ImportImage).
    #[arg(long, value_name = "METHOD")]
    import_method: Option<String>,
    /// Print one JSON object per line on stdout: each target's start, steps, transfers, and
    /// its receipt or failure.
    #[arg(long)]
    json: bool,
    /// The store folder [default: $BUILDER_STORE, else $XDG_DATA_HOME/builder, else
    /// ~/.local/share/builder].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

/// A `--format`: a disk format (machine builds) or an archive format (container builds).
#[derive(Debug, Clone, Copy)]
enum FormatArg {
    Disk(Format),
    Archive(ArchiveFormat),
}

fn parse_format(s: &str) -> Result<FormatArg, String> {
    Format::from_name(s)
        .map(FormatArg::Disk)
        .or_else(|| ArchiveFormat::from_name(s).map(FormatArg::Archive))
        .ok_or_else(|| {
            format!(
                "unknown output format `{s}`; expected one of {} (machine builds) or {} \
                 (container builds)",
                Format::NAMES.join(", "),
                ArchiveFormat::NAMES.join(", ")
            )
        })
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

impl DistributeArgs {
    fn cli_options(&self) -> CliOptions {
        let both = self.endpoint.clone();
        CliOptions {
            name: self.name.clone(),
            formats: self
                .formats
                .iter()
                .filter_map(|f| match f {
                    FormatArg::Disk(f) => Some(*f),
                    FormatArg::Archive(_) => None,
                })
                .collect(),
            archives: self
                .formats
                .iter()
                .filter_map(|f| match f {
                    FormatArg::Archive(f) => Some(*f),
                    FormatArg::Disk(_) => None,
                })
                .collect(),
            overwrite: self.overwrite,
            plain_http: self.plain_http.clone(),
            ami: AmiDestination {
                region: self.region.clone(),
                bucket: self.bucket.clone().unwrap_or_default(),
                prefix: self.prefix.clone(),
                name: String::new(),
                description: self.description.clone(),
                tags: self.tags.iter().cloned().collect(),
                copy_to_regions: self.copy_to_regions.clone(),
                launch_permission_user_ids: self.share_with.clone(),
                launch_permission_groups: if self.public {
                    vec!["all".into()]
                } else {
                    Vec::new()
                },
                boot_mode: self.boot_mode.clone(),
                import_method: self.import_method.clone(),
                s3_endpoint: self.s3_endpoint.clone().or_else(|| both.clone()),
                ec2_endpoint: self.ec2_endpoint.clone().or(both),
                profile: self.profile.clone(),
            },
        }
    }
}

/// The exit code class of a target's failure.
fn code_of(e: &DistributeError) -> u8 {
    match e {
        DistributeError::Destination(_)
        | DistributeError::Directory(
            DirectoryError::Exists { .. } | DirectoryError::BadName { .. },
        ) => EXIT_INPUT,
        DistributeError::Directory(DirectoryError::Io { .. }) => EXIT_HOST,
        _ => EXIT_FAILED,
    }
}

fn hint_of(e: &DistributeError) -> Option<String> {
    match e {
        DistributeError::Destination(t) => t.hint(),
        DistributeError::Directory(DirectoryError::Exists { .. }) => {
            Some("pass --overwrite to replace it, or choose another name with --name".into())
        }
        _ => None,
    }
}

pub async fn main(args: DistributeArgs) -> CliResult {
    let (store, _) = super::open_store(args.store.as_deref())?;
    let reference: ImageRef = args
        .reference
        .parse()
        .map_err(super::images::store_failure)?;
    let image = store
        .resolve(&reference)
        .map_err(super::images::store_failure)?;

    let options = args.cli_options();
    let mut targets = Vec::new();
    for text in &args.to {
        let t = Destination::parse(text, &options).map_err(|e: DestinationError| {
            let hint = e.hint();
            let f = Failure::input(e);
            match hint {
                Some(h) => f.with_hint(h),
                None => f,
            }
        })?;
        targets.push(t);
    }

    let progress = Terminal::new(args.json);
    let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
    let cyan = Style::new().bold().fg_color(Some(AnsiColor::Cyan.into()));
    let print_error = |what: &str, e: &DistributeError| {
        eprintln!("{red}error{red:#}: {what}");
        for s in std::iter::once(e as &dyn std::error::Error).chain(causes(e)) {
            eprintln!("  Caused by: {s}");
        }
        if let Some(h) = hint_of(e) {
            eprintln!("{cyan}hint{cyan:#}: {h}");
        }
    };

    // 1. Check every target before the first one writes or uploads anything.
    let mut code = 0u8;
    for t in &targets {
        let checked = tokio::select! {
            r = destination::preflight(&image, t) => r,
            sig = super::vm::interrupted() => {
                eprintln!("{sig}: stopped before anything was sent");
                return Err(Failure::interrupted());
            }
        };
        match checked {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("warning: {}: {w}", t.describe(&image));
                }
            }
            Err(e) => {
                let what = t.describe(&image);
                progress.json(&Event::Failed {
                    target: &what,
                    message: &error_chain(&e),
                });
                print_error(&format!("{what}: the check before sending failed"), &e);
                code = code.max(code_of(&e));
            }
        }
    }
    if code != 0 {
        eprintln!("nothing was sent");
        return Err(Failure::already_printed(code));
    }

    // 2. Each target in turn; a failure does not stop the others.
    let bold = Style::new().bold();
    let mut receipts = Vec::new();
    for t in &targets {
        let what = t.describe(&image);
        eprintln!("{bold}▶ {} to {what}{bold:#}", image.reference());
        progress.json(&Event::Started { target: &what });
        // The first signal asks the target to stop cleanly (an AMI import is cancelled, a
        // copy removes what it wrote); a second one stops at once.
        let cancel = CancellationToken::new();
        let run = destination::distribute_cancellable(&image, t, &progress, &cancel);
        tokio::pin!(run);
        let result = tokio::select! {
            r = &mut run => r,
            sig = super::vm::interrupted() => {
                progress.end_bar();
                eprintln!("{sig}: stopping {what} and cleaning up (again to stop at once)");
                cancel.cancel();
                tokio::select! {
                    r = &mut run => r,
                    _ = super::vm::interrupted() => return Err(Failure::interrupted()),
                }
            }
        };
        progress.end_bar();
        if cancel.is_cancelled() {
            if let Err(e) = &result {
                eprintln!("stopped: {}", error_chain(e));
            }
            return Err(Failure::interrupted());
        }
        match result {
            Ok(receipt) => {
                if let Err(e) = store.record_receipts(&image, std::slice::from_ref(&receipt)) {
                    eprintln!("warning: could not record the receipt in the store: {e}");
                }
                print_receipt(&receipt);
                progress.json(&Event::Receipt { receipt: &receipt });
                if !args.json {
                    let _ = writeln!(std::io::stdout().lock(), "{}", receipt.location);
                }
                receipts.push(receipt);
            }
            Err(e) => {
                progress.json(&Event::Failed {
                    target: &what,
                    message: &error_chain(&e),
                });
                print_error(
                    &format!("sending {} to {what} failed", image.reference()),
                    &e,
                );
                code = if code == 0 {
                    code_of(&e)
                } else {
                    code.max(code_of(&e))
                };
            }
        }
    }
    if code != 0 {
        return Err(Failure::already_printed(code));
    }
    Ok(0)
}

fn print_receipt(r: &Receipt) {
    let green = Style::new().bold().fg_color(Some(AnsiColor::Green.into()));
    eprintln!(
        "{green}sent{green:#} {} {} in {:.1} s",
        r.kind, r.location, r.seconds
    );
    for (role, digest) in &r.digests {
        eprintln!("  {role:<10} sha256 {digest}");
    }
    for (role, id) in &r.ids {
        eprintln!("  {role:<10} {id}");
    }
}

/// `--json` events, one per line on stdout.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
enum Event<'a> {
    Started {
        target: &'a str,
    },
    Step {
        target: &'a str,
        message: &'a str,
    },
    Transfer {
        target: &'a str,
        what: &'a str,
        done: u64,
        total: Option<u64>,
        /// `percent` for a conversion (total 100); left out for bytes.
        #[serde(skip_serializing_if = "Unit::is_bytes")]
        unit: Unit,
    },
    Receipt {
        receipt: &'a Receipt,
    },
    Failed {
        target: &'a str,
        message: &'a str,
    },
}

/// Steps and transfers on stderr (a bar on a terminal), or JSON lines on stdout.
struct Terminal {
    json: bool,
    tty: bool,
    /// The last percentage printed per transfer (not on a terminal: every 25 %).
    shown: Mutex<Option<(String, u64)>>,
    /// The transfer's bar (on a terminal).
    bar: super::bar::Bar,
}

impl Terminal {
    fn new(json: bool) -> Self {
        Self {
            json,
            tty: std::io::stderr().is_terminal(),
            shown: Mutex::new(None),
            bar: super::bar::Bar::default(),
        }
    }

    fn json(&self, event: &Event<'_>) {
        if self.json
            && let Ok(line) = serde_json::to_string(event)
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    /// End a bar drawn on a terminal.
    fn end_bar(&self) {
        self.bar.end();
        if let Ok(mut shown) = self.shown.lock() {
            shown.take();
        }
    }
}

impl Progress for Terminal {
    fn step(&self, target: &str, message: &str) {
        self.json(&Event::Step { target, message });
        self.end_bar();
        let dim = Style::new().dimmed();
        eprintln!("  {dim}{target}:{dim:#} {message}");
    }

    fn transfer(&self, target: &str, what: &str, done: u64, total: Option<u64>) {
        self.show(target, what, done, total, Unit::Bytes);
    }

    fn converting(&self, target: &str, what: &str, percent: u64) {
        self.show(target, what, percent, Some(100), Unit::Percent);
    }
}

impl Terminal {
    fn show(&self, target: &str, what: &str, done: u64, total: Option<u64>, unit: Unit) {
        self.json(&Event::Transfer {
            target,
            what,
            done,
            total,
            unit,
        });
        if self.tty {
            let dim = super::bar::styled(Style::new().dimmed());
            let prefix = format!("  {dim}{target}:{dim:#}");
            self.bar.show(what, prefix, unit, done, total);
            return;
        }
        let size = human_size;
        let (text, percent) = match total {
            _ if unit == Unit::Percent => (format!("{what}: converting {done:>3}%"), done),
            Some(t) if t > 0 => (
                format!(
                    "{what}: {} of {} ({:>3}%)",
                    size(done),
                    size(t),
                    done * 100 / t
                ),
                done * 100 / t,
            ),
            _ => (format!("{what}: {}", size(done)), 0),
        };
        let Ok(mut shown) = self.shown.lock() else {
            return;
        };
        let dim = Style::new().dimmed();
        let last = shown.as_ref().filter(|(w, _)| w == what).map(|(_, p)| *p);
        if last.is_none_or(|p| percent >= p + 25 || (percent == 100 && p != 100)) {
            eprintln!("  {dim}{target}:{dim:#} {text}");
            *shown = Some((what.to_string(), percent));
        }
    }
}
