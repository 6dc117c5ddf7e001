//! Evaluating comparison and logical expressions (a step's `if`, the `Assert` action) on a
//! target. Operands are expanded first (they may hold references); file-system operators ask
//! the target, so `fileExists` means "on the machine the steps run on", never the host.
//!
//! Semantics (reference 1.9/1.10): `value <op> baseline`; string operators ignore case
//! (Unicode lower-casing on both sides); number operators accept
//! `^[-+]?([0-9]+[.])?[0-9]+$` and compare exactly, and a value that is not such a number makes
//! the comparison false (not an error); `patternMatches` is an RE2-style regex matched
//! case-insensitively; `and`/`or` stop at the first deciding operand.

use std::cmp::Ordering;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::document::{
    COMPARISONS, CompareOp, EXISTS, ExistsOp, Expr, HASHES, HashAlgorithm, STRING_TESTS,
    StringTest, operator,
};
use crate::machine::{Capture, Discard, ExecRequest, FileKind, Machine, MachineError};

#[derive(Debug, thiserror::Error)]
pub enum ConditionError {
    /// An operand's reference could not be resolved.
    #[error("could not expand `{operand}`: {message}")]
    Template { operand: String, message: String },
    /// `patternMatches` was given something that is not a regular expression.
    #[error("`{pattern}` is not a valid regular expression: {message}")]
    Pattern { pattern: String, message: String },
    /// The target could not answer a file-system question.
    #[error("could not check `{what}` on the target")]
    Target {
        what: String,
        #[source]
        source: MachineError,
    },
}

/// Expands the references in an operand.
pub type Expander<'a> = &'a (dyn Fn(&str) -> Result<String, String> + Sync);

/// What evaluating needs besides the expression.
pub struct EvalContext<'a> {
    pub target: &'a dyn Machine,
    /// Relative paths are resolved against this folder (the run's working directory).
    pub working_directory: &'a Path,
    pub expand: Expander<'a>,
}

impl EvalContext<'_> {
    fn operand(&self, text: &str) -> Result<String, ConditionError> {
        (self.expand)(text).map_err(|message| ConditionError::Template {
            operand: text.to_string(),
            message,
        })
    }

    fn path(&self, text: &str) -> PathBuf {
        self.working_directory.join(text)
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Evaluate `expr`; `Ok(false)` for a false condition, `Err` only when it could not be decided.
pub fn evaluate<'a>(
    expr: &'a Expr,
    cx: &'a EvalContext<'a>,
) -> BoxFuture<'a, Result<bool, ConditionError>> {
    Box::pin(async move {
        match expr {
            Expr::Compare {
                op,
                baseline,
                value,
            } => {
                let baseline = cx.operand(baseline)?;
                compare(*op, &cx.operand(value)?, &baseline)
            }
            Expr::StringTest { op, value } => Ok(string_test(*op, &cx.operand(value)?)),
            Expr::Exists { op, path } => exists(*op, &cx.operand(path)?, cx).await,
            Expr::FileHash {
                algorithm,
                digest,
                path,
            } => {
                let (digest, path) = (cx.operand(digest)?, cx.operand(path)?);
                file_hash_equals(*algorithm, &digest, &path, cx).await
            }
            Expr::And(items) | Expr::Or(items) => {
                // The value that decides: `false` for `and`, `true` for `or`.
                let decides = matches!(expr, Expr::Or(_));
                for item in items {
                    if evaluate(item, cx).await? == decides {
                        return Ok(decides);
                    }
                }
                Ok(!decides)
            }
            Expr::Not(inner) => Ok(!evaluate(inner, cx).await?),
        }
    })
}

/// `value <op> baseline` for the comparison operators.
pub fn compare(op: CompareOp, value: &str, baseline: &str) -> Result<bool, ConditionError> {
    let strings = || value.to_lowercase().cmp(&baseline.to_lowercase());
    let numbers = || compare_numbers(value, baseline);
    Ok(match op {
        CompareOp::StringEquals => strings() == Ordering::Equal,
        CompareOp::StringLessThan => strings() == Ordering::Less,
        CompareOp::StringLessThanEquals => strings() != Ordering::Greater,
        CompareOp::StringGreaterThan => strings() == Ordering::Greater,
        CompareOp::StringGreaterThanEquals => strings() != Ordering::Less,
        CompareOp::PatternMatches => {
            let regex = regex::RegexBuilder::new(baseline)
                .case_insensitive(true)
                .build()
                .map_err(|e| ConditionError::Pattern {
                    pattern: baseline.to_string(),
                    message: e.to_string(),
                })?;
            regex.is_match(value)
        }
        CompareOp::NumberEquals => numbers() == Some(Ordering::Equal),
        CompareOp::NumberLessThan => numbers() == Some(Ordering::Less),
        CompareOp::NumberLessThanEquals => {
            matches!(numbers(), Some(Ordering::Less | Ordering::Equal))
        }
        CompareOp::NumberGreaterThan => numbers() == Some(Ordering::Greater),
        CompareOp::NumberGreaterThanEquals => {
            matches!(numbers(), Some(Ordering::Greater | Ordering::Equal))
        }
    })
}

pub fn string_test(op: StringTest, value: &str) -> bool {
    match op {
        StringTest::IsEmpty => value.is_empty(),
        StringTest::IsWhitespace => !value.is_empty() && value.chars().all(char::is_whitespace),
    }
}

#[expect(
    clippy::expect_used,
    reason = "a constant regex, checked by the unit tests"
)]
static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[-+]?([0-9]+[.])?[0-9]+$").expect("a constant, valid regex"));

/// A decimal number split into sign and normalised digits, compared exactly (no float
/// rounding: AWSTOE compares with arbitrary precision).
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    /// Without leading zeros.
    int: String,
    /// Without trailing zeros.
    frac: String,
}

fn parse_decimal(text: &str) -> Option<Decimal> {
    if !NUMBER.is_match(text) {
        return None;
    }
    let (negative, digits) = match text.as_bytes()[0] {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let int = int.trim_start_matches('0').to_string();
    let frac = frac.trim_end_matches('0').to_string();
    // -0 and 0 are the same number.
    let negative = negative && !(int.is_empty() && frac.is_empty());
    Some(Decimal {
        negative,
        int,
        frac,
    })
}

fn cmp_magnitude(a: &Decimal, b: &Decimal) -> Ordering {
    a.int
        .len()
        .cmp(&b.int.len())
        .then_with(|| a.int.cmp(&b.int))
        .then_with(|| a.frac.cmp(&b.frac))
}

/// `None` when either side is not a number.
fn compare_numbers(value: &str, baseline: &str) -> Option<Ordering> {
    let a = parse_decimal(value)?;
    let b = parse_decimal(baseline)?;
    Some(match (a.negative, b.negative) {
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, false) => cmp_magnitude(&a, &b),
        (true, true) => cmp_magnitude(&b, &a),
    })
}

async fn exists(op: ExistsOp, path: &str, cx: &EvalContext<'_>) -> Result<bool, ConditionError> {
    let target_err = |source| ConditionError::Target {
        what: path.to_string(),
        source,
    };
    let request = match op {
        // `type` finds executables on PATH, builtins and functions, like AWSTOE's check.
        ExistsOp::Binary => ExecRequest::argv(["bash", "-c", "type -- \"$1\"", "bash", path]),
        ExistsOp::File | ExistsOp::Folder => {
            let full = cx.path(path);
            let (want, flag) = match op {
                ExistsOp::File => (FileKind::File, "-f"),
                _ => (FileKind::Dir, "-d"),
            };
            match cx.target.stat(&full).await.map_err(target_err)? {
                None => return Ok(false),
                // A link counts for what it points to (like `test -f`).
                Some(s) if s.kind == FileKind::Symlink => {
                    ExecRequest::argv(["test", flag, &full.to_string_lossy()])
                }
                Some(s) => return Ok(s.kind == want),
            }
        }
    };
    let outcome = cx.target.exec(&request, &Discard).await;
    Ok(outcome.map_err(target_err)?.status.success())
}

/// The coreutils program that computes `algorithm`.
pub fn hash_program(algorithm: HashAlgorithm) -> &'static str {
    match algorithm {
        HashAlgorithm::Md5 => "md5sum",
        HashAlgorithm::Sha1 => "sha1sum",
        HashAlgorithm::Sha256 => "sha256sum",
        HashAlgorithm::Sha512 => "sha512sum",
    }
}

/// The digest of a file on the target, lower-case hex; `None` when it is not a readable file.
pub async fn file_digest(
    target: &dyn Machine,
    algorithm: HashAlgorithm,
    path: &Path,
) -> Result<Option<String>, MachineError> {
    let capture = Capture::default();
    let request = ExecRequest::argv([
        hash_program(algorithm).to_string(),
        "--".to_string(),
        path.to_string_lossy().into_owned(),
    ]);
    let outcome = target.exec(&request, &capture).await?;
    if !outcome.status.success() {
        return Ok(None);
    }
    let stdout = String::from_utf8_lossy(&capture.stdout()).into_owned();
    // A name with a backslash or newline makes coreutils prefix the line with `\`.
    let digest = stdout
        .trim_start_matches('\\')
        .split_whitespace()
        .next()
        .map(str::to_ascii_lowercase);
    Ok(digest)
}

async fn file_hash_equals(
    algorithm: HashAlgorithm,
    digest: &str,
    path: &str,
    cx: &EvalContext<'_>,
) -> Result<bool, ConditionError> {
    let full = cx.path(path);
    let actual = file_digest(cx.target, algorithm, &full)
        .await
        .map_err(|source| ConditionError::Target {
            what: path.to_string(),
            source,
        })?;
    Ok(actual.is_some_and(|a| a.eq_ignore_ascii_case(digest.trim())))
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Build an expression from the inputs of an `Assert` step (the document keeps them as JSON).
/// The parser already validated them; this still answers every shape with a message, never a
/// panic, because nested documents are loaded at run time.
pub fn expr_from_json(inputs: &Value) -> Result<Expr, String> {
    let Value::Object(map) = inputs else {
        return Err("expected one operator (e.g. `stringEquals`) with its operands".into());
    };
    let operand = |key: &str| -> Result<String, String> {
        match map.get(key) {
            Some(v) => scalar_text(v).ok_or_else(|| format!("`{key}` must be a string")),
            None => Err(format!("`{key}` is missing")),
        }
    };
    let operators: Vec<&String> = map
        .keys()
        .filter(|k| !matches!(k.as_str(), "value" | "path"))
        .collect();
    let [op] = operators.as_slice() else {
        return Err(format!(
            "expected exactly one operator, found {}",
            if operators.is_empty() {
                "none".to_string()
            } else {
                operators
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    };
    let op = op.as_str();
    let arg = &map[op];
    let single = || scalar_text(arg).ok_or_else(|| format!("`{op}` must be a string"));
    if let Some(cmp) = operator(COMPARISONS, op) {
        return Ok(Expr::Compare {
            op: cmp,
            baseline: single()?,
            value: operand("value")?,
        });
    }
    if let Some(test) = operator(STRING_TESTS, op) {
        return Ok(Expr::StringTest {
            op: test,
            value: single()?,
        });
    }
    if let Some(exists) = operator(EXISTS, op) {
        return Ok(Expr::Exists {
            op: exists,
            path: single()?,
        });
    }
    if let Some(algorithm) = operator(HASHES, op) {
        return Ok(Expr::FileHash {
            algorithm,
            digest: single()?,
            path: operand("path")?,
        });
    }
    Ok(match op {
        "and" | "or" => {
            let Value::Array(items) = arg else {
                return Err(format!("`{op}` must be a list of expressions"));
            };
            let items = items
                .iter()
                .map(expr_from_json)
                .collect::<Result<Vec<_>, _>>()?;
            if op == "and" {
                Expr::And(items)
            } else {
                Expr::Or(items)
            }
        }
        "not" => {
            let inner = match arg {
                Value::Array(items) if items.len() == 1 => &items[0],
                Value::Array(_) => return Err("`not` takes exactly one expression".into()),
                other => other,
            };
            Expr::Not(Box::new(expr_from_json(inner)?))
        }
        other => return Err(format!("`{other}` is not a comparison or logical operator")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::host::HostMachine;

    fn yes(op: CompareOp, value: &str, baseline: &str) -> bool {
        compare(op, value, baseline).expect("valid operands")
    }

    #[test]
    fn string_operators_ignore_case_and_compare_value_to_baseline() {
        use CompareOp::*;
        assert!(yes(StringEquals, "Hello", "hELLO"));
        assert!(!yes(StringEquals, "Hello ", "hello"));
        assert!(yes(StringGreaterThan, "b", "a"));
        assert!(!yes(StringGreaterThan, "a", "b"));
        assert!(yes(StringLessThan, "a", "b"));
        assert!(yes(StringLessThanEquals, "A", "a"));
        assert!(!yes(StringLessThan, "A", "a"));
        assert!(yes(StringGreaterThanEquals, "b", "B"));
        assert!(yes(StringEquals, "ÄRGER", "ärger"));
        assert!(yes(PatternMatches, "ThisIsValue", "^[a-z]+$"));
        assert!(!yes(PatternMatches, "This Is", "^[a-z]+$"));
        assert!(compare(PatternMatches, "x", "(").is_err());
    }

    #[test]
    fn number_operators_compare_exactly_and_fail_closed() {
        use CompareOp::*;
        assert!(yes(NumberLessThan, "1", "2"));
        assert!(!yes(NumberLessThan, "2", "1"));
        assert!(yes(NumberEquals, "1.50", "+01.5"));
        assert!(yes(NumberEquals, "-0", "0"));
        assert!(yes(NumberGreaterThan, "-1", "-2"));
        assert!(yes(NumberLessThan, "-2.5", "-2.25"));
        assert!(yes(NumberGreaterThanEquals, "10", "9.999"));
        assert!(yes(NumberLessThanEquals, "3", "3"));
        assert!(yes(
            NumberGreaterThan,
            "100000000000000000001",
            "100000000000000000000"
        ));
        // Not numbers: false, not an error.
        assert!(!yes(NumberEquals, "abc", "abc"));
        assert!(!yes(NumberLessThan, "1e3", "2000"));
        assert!(!yes(NumberEquals, " 1", "1"));
        assert!(!yes(NumberEquals, "1.", "1"));
    }

    proptest::proptest! {
        /// No input makes a comparison panic, and the order operators agree with each other
        /// (`a < b` exactly when `b > a`; `<=` is `<` or `=`), for strings and numbers alike.
        #[test]
        fn comparisons_are_consistent(a in ".{0,12}", b in ".{0,12}", x in -1_000_000i64..1_000_000, y in 0u32..1000) {
            use CompareOp::*;
            let n1 = format!("{x}.{y:03}");
            let n2 = format!("{}", x / 3);
            for (v, w) in [(a.as_str(), b.as_str()), (n1.as_str(), n2.as_str()), (n1.as_str(), a.as_str())] {
                for (lt, gt, le, eq) in [
                    (StringLessThan, StringGreaterThan, StringLessThanEquals, StringEquals),
                    (NumberLessThan, NumberGreaterThan, NumberLessThanEquals, NumberEquals),
                ] {
                    let c = |op, p: &str, q: &str| compare(op, p, q).expect("no pattern involved");
                    proptest::prop_assert_eq!(c(lt, v, w), c(gt, w, v));
                    proptest::prop_assert_eq!(c(le, v, w), c(lt, v, w) || c(eq, v, w));
                }
                let _ = compare(CompareOp::PatternMatches, v, w);
            }
            // A number equals itself written differently.
            let padded = format!("+0{n1}0");
            if x >= 0 {
                proptest::prop_assert!(compare(CompareOp::NumberEquals, &padded, &n1).expect("numbers"));
            }
        }
    }

    #[test]
    fn whitespace_test_needs_a_non_empty_string() {
        assert!(string_test(StringTest::IsEmpty, ""));
        assert!(!string_test(StringTest::IsEmpty, " "));
        assert!(string_test(StringTest::IsWhitespace, " \t\n"));
        assert!(!string_test(StringTest::IsWhitespace, ""));
        assert!(!string_test(StringTest::IsWhitespace, " x "));
    }

    #[test]
    fn assert_inputs_become_expressions() {
        let expr = expr_from_json(&serde_json::json!({
            "and": [
                {"numberLessThan": 2, "value": "1"},
                {"not": [{"fileExists": "/nope"}]},
                {"fileSHA256Equals": "ab", "path": "/x"}
            ]
        }))
        .expect("valid");
        let Expr::And(items) = expr else {
            panic!("expected and")
        };
        assert_eq!(
            items[0],
            Expr::Compare {
                op: CompareOp::NumberLessThan,
                baseline: "2".into(),
                value: "1".into()
            }
        );
        assert!(matches!(items[1], Expr::Not(_)));
        assert!(expr_from_json(&serde_json::json!({"stringEquals": "a"})).is_err());
        assert!(expr_from_json(&serde_json::json!({"a": 1, "b": 2})).is_err());
        assert!(expr_from_json(&serde_json::json!([])).is_err());
    }

    #[test]
    fn file_system_operators_ask_the_target() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            fs_err::write(dir.path().join("f"), b"abc").expect("write");
            fs_err::os::unix::fs::symlink(dir.path().join("f"), dir.path().join("link"))
                .expect("symlink");
            let target = HostMachine::new();
            let expand = |s: &str| -> Result<String, String> { Ok(s.replace("{{ F }}", "f")) };
            let cx = EvalContext {
                target: &target,
                working_directory: dir.path(),
                expand: &expand,
            };
            let check = |expr: Expr| {
                let cx = &cx;
                async move { evaluate(&expr, cx).await.expect("decidable") }
            };
            let exists = |op, path: &str| Expr::Exists {
                op,
                path: path.into(),
            };
            assert!(check(exists(ExistsOp::File, "{{ F }}")).await);
            assert!(check(exists(ExistsOp::File, "link")).await);
            assert!(!check(exists(ExistsOp::Folder, "f")).await);
            assert!(check(exists(ExistsOp::Folder, ".")).await);
            assert!(!check(exists(ExistsOp::File, "missing")).await);
            assert!(check(exists(ExistsOp::Binary, "bash")).await);
            assert!(!check(exists(ExistsOp::Binary, "no-such-binary-xyz")).await);
            let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
            let hash = |digest: &str| Expr::FileHash {
                algorithm: HashAlgorithm::Sha256,
                digest: digest.into(),
                path: "f".into(),
            };
            assert!(check(hash(&sha.to_uppercase())).await);
            assert!(!check(hash("00")).await);
            let md5 = Expr::FileHash {
                algorithm: HashAlgorithm::Md5,
                digest: "900150983cd24fb0d6963f7d28e17f72".into(),
                path: "f".into(),
            };
            assert!(check(md5).await);
            let and = Expr::And(vec![
                exists(ExistsOp::File, "f"),
                Expr::Not(Box::new(exists(ExistsOp::File, "missing"))),
            ]);
            assert!(check(and).await);
            let or = Expr::Or(vec![
                exists(ExistsOp::File, "missing"),
                exists(ExistsOp::Folder, "missing"),
            ]);
            assert!(!check(or).await);
        });
    }
}
