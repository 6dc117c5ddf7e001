//! `systemctl` in the appliance: init puts a copy of the agent first on the steps' PATH under
//! that name. No service manager runs there, and the guest's own systemctl, seeing a chroot,
//! skips `start` and its kin with exit status 0: a step would "start" a service that never
//! runs. This copy fails those verbs with a message saying why and what to do instead, and
//! hands every other use (`enable`, `disable`, `mask`, `daemon-reload`, `is-enabled`, …) to
//! the guest's real systemctl unchanged.

use std::os::unix::process::CommandExt;

/// Where init puts the copy, inside the guest's root (its /run tmpfs: nothing in the image).
pub const BIN_DIR: &str = "/run/builder-appliance/bin";

/// Verbs that need a running service manager.
const NEEDS_MANAGER: &[&str] = &[
    "start",
    "stop",
    "restart",
    "reload",
    "try-restart",
    "reload-or-restart",
    "try-reload-or-restart",
    "isolate",
    "kill",
];

/// Options of systemctl that take their value as the next argument.
const WITH_VALUE: &[&str] = &[
    "-t",
    "--type",
    "-p",
    "--property",
    "-s",
    "--signal",
    "-H",
    "--host",
    "-M",
    "--machine",
    "-n",
    "--lines",
    "-o",
    "--output",
    "--root",
    "--image",
    "--job-mode",
    "--kill-whom",
    "--kill-who",
    "--state",
    "--what",
    "--timestamp",
    "--boot-loader-entry",
    "--boot-loader-menu",
    "--reboot-argument",
    "--message",
    "--preset-mode",
    "--drop-in",
    "--when",
    "--kill-value",
];

/// The verb and the units after it, skipping options (and the values of those that take one).
fn verb_and_units(args: &[String]) -> Option<(&str, Vec<&str>)> {
    let mut words = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a.starts_with('-') {
            skip = WITH_VALUE.contains(&a.as_str());
            continue;
        }
        words.push(a.as_str());
    }
    let (verb, units) = words.split_first()?;
    Some((verb, units.to_vec()))
}

/// The refusal for a verb that needs a running service manager, if `args` asks for one.
fn refusal(args: &[String]) -> Option<String> {
    let (verb, units) = verb_and_units(args)?;
    if !NEEDS_MANAGER.contains(&verb) {
        return None;
    }
    let what = std::iter::once("systemctl")
        .chain(std::iter::once(verb))
        .chain(units)
        .collect::<Vec<_>>()
        .join(" ");
    Some(format!(
        "builder appliance: no service manager runs in the appliance; `{what}` cannot run here. \
         Use `infrastructure.boot: full` for steps that need running services."
    ))
}

/// Runs as `systemctl`: never returns.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(msg) = refusal(&args) {
        eprintln!("{msg}");
        std::process::exit(1);
    }
    // The guest's, in the guest's usual places (a guest program: the host need not have it).
    let Some(real) = ["/usr/bin", "/bin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join("systemctl"))
        .find(|p| p.exists())
    else {
        eprintln!("systemctl: not found in the guest (/usr/bin/systemctl, /bin/systemctl)");
        std::process::exit(127);
    };
    let err = std::process::Command::new(&real)
        .arg0("systemctl")
        .args(&args)
        .exec();
    eprintln!("systemctl: cannot run {}: {err}", real.display());
    std::process::exit(126);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn verbs_that_need_a_running_manager_are_refused() {
        let msg = refusal(&args("start nginx.service")).expect("refused");
        assert_eq!(
            msg,
            "builder appliance: no service manager runs in the appliance; `systemctl start \
             nginx.service` cannot run here. Use `infrastructure.boot: full` for steps that \
             need running services."
        );
        assert!(
            refusal(&args("--no-block -q restart a b"))
                .expect("refused")
                .contains("`systemctl restart a b`")
        );
        assert!(refusal(&args("--job-mode fail kill x")).is_some());
        for ok in [
            "enable nginx",
            "disable --now-not-a-verb x",
            "daemon-reload",
            "is-enabled ssh",
            "--type service list-unit-files",
            "mask apt-daily.timer",
            "-t start list-units",
            "",
            "--version",
        ] {
            assert_eq!(refusal(&args(ok)), None, "{ok}");
        }
    }
}
