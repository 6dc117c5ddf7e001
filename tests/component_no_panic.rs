//! Property tests: no input makes the YAML reader, the validator, the diagnostics renderer or
//! the templater panic, and "valid" always means "no errors".

use std::path::Path;

use builder::component::parse;
use builder::component::template::{self, Reference, Scope};
use proptest::prelude::*;

const FIXTURE: &str = include_str!("../fixtures/components/hardening.yml");
const CHAINING: &str = include_str!("../fixtures/components/chaining-outputs.yml");

/// Characters that matter to YAML and to the template language.
fn yamlish() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("\n".to_string()),
            Just("  ".to_string()),
            Just("- ".to_string()),
            Just(": ".to_string()),
            Just("{{ ".to_string()),
            Just(" }}".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just("{".to_string()),
            Just("}".to_string()),
            Just("'".to_string()),
            Just("\"".to_string()),
            Just("|".to_string()),
            Just("&a ".to_string()),
            Just("*a".to_string()),
            Just("<<: ".to_string()),
            Just("#".to_string()),
            Just("\t".to_string()),
            Just("é".to_string()),
            Just("phases".to_string()),
            Just("steps".to_string()),
            Just("name".to_string()),
            Just("action".to_string()),
            Just("inputs".to_string()),
            Just("loop".to_string()),
            Just("if".to_string()),
            Just("ExecuteBash".to_string()),
            "[a-zA-Z0-9_.]{1,8}",
        ],
        0..80,
    )
    .prop_map(|parts| parts.concat())
}

fn check_invariants(text: &str) {
    let checked = parse::check(Path::new("fuzz.yml"), text);
    assert_eq!(
        checked.document.is_some(),
        !checked.diagnostics.has_errors(),
        "valid must mean no errors:\n{}",
        checked.diagnostics.render(false)
    );
    for problem in checked.diagnostics.problems() {
        assert!(problem.span.start <= problem.span.end);
        assert!(problem.span.end <= text.len());
        assert!(problem.span.line >= 1 && problem.span.col >= 1);
    }
    let _ = checked.diagnostics.render(true);
}

struct Echo;
impl Scope for Echo {
    fn resolve(&self, reference: &Reference) -> Result<Option<String>, String> {
        match reference {
            Reference::Loop { .. } => Ok(None),
            Reference::Ssm(_) => Err("offline".into()),
            other => Ok(Some(other.to_string())),
        }
    }
}

/// Replace, insert or delete characters of `base` at the given places.
fn mutate(base: &str, edits: &[(usize, u8, String)]) -> String {
    let mut text: Vec<char> = base.chars().collect();
    for (at, kind, piece) in edits {
        if text.is_empty() {
            break;
        }
        let at = at % text.len();
        match kind % 3 {
            0 => {
                text.splice(at..at, piece.chars());
            }
            1 => {
                let end = (at + piece.len()).min(text.len());
                text.drain(at..end);
            }
            _ => {
                let end = (at + piece.chars().count()).min(text.len());
                text.splice(at..end, piece.chars());
            }
        }
    }
    text.into_iter().collect()
}

proptest! {
    // 256 cases each unless PROPTEST_CASES says otherwise (e.g. 100000 for a long soak).

    #[test]
    fn templater_never_panics(text in any::<String>()) {
        let _ = template::parse(&text);
        let _ = template::references(&text);
        let _ = template::expand(&text, &Echo);
    }

    #[test]
    fn templater_never_panics_on_braces(text in "[{} a-z.\\[\\]0-9:_-]{0,40}") {
        if let Ok(pieces) = template::parse(&text) {
            // Ranges point at `{{ … }}` in the text.
            for piece in pieces {
                if let template::Piece::Ref { range, source, .. } = piece {
                    prop_assert_eq!(&text[range], source.as_str());
                }
            }
        }
        let _ = template::expand(&text, &Echo);
    }

    #[test]
    fn validator_never_panics_on_byte_soup(text in any::<String>()) {
        check_invariants(&text);
    }

    #[test]
    fn validator_never_panics_on_yamlish_text(text in yamlish()) {
        check_invariants(&text);
    }

    #[test]
    fn validator_never_panics_on_mutated_documents(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), yamlish()), 1..6),
        which in any::<bool>(),
    ) {
        let base = if which { FIXTURE } else { CHAINING };
        check_invariants(&mutate(base, &edits));
    }
}
