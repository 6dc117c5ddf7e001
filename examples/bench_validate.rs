//! Benchmark (a program, not a test): validation time of a generated 1,000-step component
//! document. Run with `cargo run --release --example bench_validate [-- STEPS RUNS]`.
//! Goal (issue 2): under 50 ms per validation of 1,000 steps.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use builder::component::parse;

/// A document in the style of real ones: a mix of actions, parameters, loops, conditions and
/// chaining, so every part of validation is exercised.
fn document(steps: usize) -> String {
    let mut doc = String::from(
        "name: Bench\ndescription: generated\nschemaVersion: 1.0\nparameters:\n  - Package:\n      type: string\n      default: nginx\n  - Dir:\n      type: string\n      default: /opt/x\nconstants:\n  - Conf:\n      type: string\n      value: /etc/x.conf\nphases:\n  - name: build\n    steps:\n",
    );
    for i in 0..steps {
        let step = match i % 5 {
            0 => format!(
                "      - name: Bash{i}\n        action: ExecuteBash\n        timeoutSeconds: 60\n        inputs:\n          commands:\n            - echo installing {{{{ Package }}}} step {i}\n            - |\n              if [ -d {{{{ Dir }}}} ]; then\n                echo yes\n              fi\n"
            ),
            1 => format!(
                "      - name: File{i}\n        action: CreateFile\n        inputs:\n          - path: \"{{{{ Dir }}}}/f{i}\"\n            content: \"{{{{ build.Bash{}.outputs.stdout }}}}\"\n            permissions: 0644\n            overwrite: true\n",
                i - 1
            ),
            2 => format!(
                "      - name: Loop{i}\n        action: ExecuteBash\n        loop:\n          name: l{i}\n          forEach:\n            - a\n            - b\n            - \"{{{{ Package }}}}\"\n        inputs:\n          commands:\n            - echo {{{{ l{i}.value }}}} {{{{ loop.index }}}}\n"
            ),
            3 => format!(
                "      - name: Cond{i}\n        action: ExecuteBinary\n        onFailure: Continue\n        maxAttempts: 3\n        if:\n          and:\n            - fileExists: \"{{{{ Conf }}}}\"\n            - not:\n                stringEquals: x\n                value: \"{{{{ build.File{}.inputs[0].path }}}}\"\n        inputs:\n          path: /bin/true\n          arguments: [\"{{{{ Package }}}}\", \"42\"]\n",
                i - 2
            ),
            _ => format!(
                "      - name: Check{i}\n        action: Assert\n        inputs:\n          patternMatches: '^[a-z]+$'\n          value: \"{{{{ Package }}}}\"\n"
            ),
        };
        doc.push_str(&step);
    }
    doc
}

fn main() {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let text = document(steps);
    let path = Path::new("bench.yml");

    // The generated document must be valid, or the figure would measure error paths.
    match parse::parse_str(path, &text) {
        Ok(doc) => assert_eq!(doc.phases[0].steps.len(), steps),
        Err(d) => {
            eprintln!("{}", d.render(false));
            std::process::exit(1);
        }
    }

    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let result = parse::parse_str(path, &text);
            let elapsed = start.elapsed();
            assert!(result.is_ok());
            elapsed
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    // The share of the YAML reader, to know where time goes.
    let mut yaml_times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let (root, _) = builder::yaml::parse(&text);
            let elapsed = start.elapsed();
            assert!(root.is_some());
            elapsed
        })
        .collect();
    yaml_times.sort();
    let yaml_median = yaml_times[yaml_times.len() / 2];
    let mut report = String::new();
    let _ = writeln!(
        report,
        "validate: {steps} steps, {} KiB, {runs} runs",
        text.len() / 1024
    );
    let _ = writeln!(
        report,
        "  median {:.2} ms   min {:.2} ms   max {:.2} ms   ({:.1} µs per step)",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e6 / steps as f64
    );
    let _ = writeln!(
        report,
        "  of which reading YAML: median {:.2} ms",
        yaml_median.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        report,
        "  goal < 50 ms for 1,000 steps: {}",
        if steps == 1000 && median < Duration::from_millis(50) {
            "met"
        } else if steps == 1000 {
            "NOT met"
        } else {
            "n/a (not 1,000 steps)"
        }
    );
    print!("{report}");
}
