//! Schedules: cron expressions (5-field POSIX and Image Builder's `cron(…)`), read in an IANA
//! time zone, the next run after a time, and what to run after downtime (at most one missed
//! run: the latest). Time comes from a [`Clock`], so tests drive it by hand.
//!
//! croner does the calendar work (`L`, `W`, `#`, daylight saving). Image Builder's form has
//! six fields *without* seconds (`min hour dom month dow year`), which croner would read as
//! seconds-first; it is given to croner with `0` seconds prepended, as seven fields.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::errors::CronError;

pub use super::{Clock, FixedClock, SystemClock};

/// Which spelling an expression was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CronKind {
    /// `minute hour day-of-month month day-of-week` (or `@daily` and friends).
    Posix,
    /// Image Builder's `cron(min hour dom month dow year)`.
    Aws,
}

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct CronExpr {
    /// As written.
    pub written: String,
    pub kind: CronKind,
    cron: Cron,
}

/// Why an expression is not accepted: the message, a hint, and the part of the text at fault
/// (byte offsets in the expression), if one part is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronProblem {
    pub message: String,
    pub hint: Option<String>,
    pub part: Option<(usize, usize)>,
}

const POSIX_FIELDS: &str = "minute hour day-of-month month day-of-week";
const AWS_FIELDS: &str = "minutes hours day-of-month month day-of-week year";

impl CronExpr {
    /// Parse `text` in either spelling. An expression that parses but never matches (`0 0 31
    /// 2 *`) is accepted here; [`CronExpr::never_matches`] finds those.
    pub fn parse(text: &str) -> Result<CronExpr, CronProblem> {
        let trimmed = text.trim();
        let problem = |message: String, hint: Option<String>| CronProblem {
            message,
            hint,
            part: None,
        };
        if trimmed.is_empty() {
            return Err(problem(
                "the schedule expression is empty".into(),
                Some("write 5 fields, e.g. `0 3 * * 1` (Mondays at 03:00)".into()),
            ));
        }
        if let Some(rest) = trimmed.strip_prefix("rate(") {
            let inner = rest.trim_end_matches(')');
            return Err(problem(
                format!("`rate({inner})` is not supported; pipelines use cron expressions"),
                Some("e.g. every day at 03:00: `0 3 * * *`".into()),
            ));
        }
        let (kind, fields, offset) = match trimmed.strip_prefix("cron(") {
            Some(rest) => {
                let Some(inner) = rest.strip_suffix(')') else {
                    return Err(problem(
                        "`cron(` is not closed".into(),
                        Some("write `cron(min hour day-of-month month day-of-week year)`".into()),
                    ));
                };
                let start = text.find("cron(").map_or(0, |i| i + 5);
                (CronKind::Aws, inner, start)
            }
            None => (CronKind::Posix, trimmed, text.find(trimmed).unwrap_or(0)),
        };
        let parts: Vec<&str> = fields.split_whitespace().collect();
        let nickname = kind == CronKind::Posix && parts.len() == 1 && parts[0].starts_with('@');
        match kind {
            CronKind::Posix if !nickname && parts.len() != 5 => {
                let hint = if parts.len() == 6 {
                    "Image Builder's 6-field form is written `cron(min hour dom month dow year)`"
                        .to_string()
                } else {
                    format!("write 5 fields: {POSIX_FIELDS}, e.g. `0 3 * * 1`")
                };
                return Err(problem(
                    format!(
                        "`{trimmed}` has {} field{}; a cron expression has 5 ({POSIX_FIELDS})",
                        parts.len(),
                        if parts.len() == 1 { "" } else { "s" }
                    ),
                    Some(hint),
                ));
            }
            CronKind::Aws if parts.len() != 6 => {
                return Err(problem(
                    format!(
                        "`{trimmed}` has {} field{} inside `cron(…)`; Image Builder's form has 6 ({AWS_FIELDS})",
                        parts.len(),
                        if parts.len() == 1 { "" } else { "s" }
                    ),
                    Some(
                        "e.g. `cron(0 3 ? * MON *)`, or a 5-field expression without `cron(…)`"
                            .into(),
                    ),
                ));
            }
            _ => {}
        }
        let for_croner = match kind {
            CronKind::Posix => fields.to_string(),
            CronKind::Aws => format!("0 {}", parts.join(" ")),
        };
        match Cron::from_str(&for_croner) {
            Ok(cron) => Ok(CronExpr {
                written: text.to_string(),
                kind,
                cron,
            }),
            Err(e) => Err(CronProblem {
                part: field_at_fault(fields, &e).map(|(s, e)| (offset + s, offset + e)),
                message: format!("`{trimmed}` is not a valid cron expression: {}", reason(&e)),
                hint: Some(match kind {
                    CronKind::Posix => format!("the 5 fields are {POSIX_FIELDS}"),
                    CronKind::Aws => format!("the 6 fields are {AWS_FIELDS}"),
                }),
            }),
        }
    }

    /// What the expression means, in English ("At 03:00, on Monday.").
    pub fn describe(&self) -> String {
        self.cron.describe()
    }

    /// `Some(why)` when the expression matches no time from `now` on (Feb 31, a year in the
    /// past), with its meaning explained.
    pub fn never_matches(&self, now: DateTime<Utc>, zone: Tz) -> Option<String> {
        match self
            .cron
            .find_next_occurrence(&now.with_timezone(&zone), false)
        {
            Ok(_) => None,
            Err(_) => Some(format!(
                "`{}` never matches a time from now on: it means \"{}\"",
                self.written.trim(),
                self.describe()
            )),
        }
    }

    /// The first match strictly after `t`, read in `zone`. `None` when there is none.
    pub fn next_after(&self, t: DateTime<Utc>, zone: Tz) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&zone), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The latest match at or before `t`, read in `zone`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>, zone: Tz) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&zone), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }
}

/// croner's messages, without its type names.
fn reason(e: &CronError) -> String {
    match e {
        CronError::EmptyPattern => "it is empty".into(),
        CronError::InvalidDate | CronError::InvalidTime | CronError::TimeSearchLimitExceeded => {
            "it matches no time".into()
        }
        CronError::InvalidPattern(m)
        | CronError::IllegalCharacters(m)
        | CronError::ComponentError(m) => m.trim_end_matches('.').to_string(),
    }
}

/// The byte range of the first field whose text croner's message quotes, if any.
fn field_at_fault(fields: &str, e: &CronError) -> Option<(usize, usize)> {
    let message = match e {
        CronError::InvalidPattern(m)
        | CronError::IllegalCharacters(m)
        | CronError::ComponentError(m) => m.to_ascii_uppercase(),
        _ => return None,
    };
    let mut at = 0;
    for field in fields.split_whitespace() {
        let start = fields[at..].find(field).map(|i| i + at)?;
        at = start + field.len();
        if message.contains(&format!("'{}'", field.to_ascii_uppercase()))
            || message.contains(&format!("\"{}\"", field.to_ascii_uppercase()))
        {
            return Some((start, at));
        }
    }
    None
}

/// A pipeline's schedule as the scheduler uses it.
#[derive(Debug, Clone)]
pub struct When<'a> {
    pub expression: &'a CronExpr,
    pub zone: Tz,
}

/// What the scheduler should do for one pipeline at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Nothing is due; the next run is at this time (persist it).
    Wait { next: DateTime<Utc> },
    /// Run for the occurrence `due` (the latest one missed or just reached); `missed` older
    /// occurrences since `stored` are not run (at most one catch-up run). Then wait for
    /// `next`.
    Run {
        due: DateTime<Utc>,
        missed: u32,
        next: Option<DateTime<Utc>>,
    },
    /// The expression matches nothing from now on.
    Never,
}

/// Counting missed occurrences stops here (every minute for a week is 10 080).
const MISSED_COUNT_LIMIT: u32 = 100_000;

impl When<'_> {
    /// Given the next run time persisted earlier (`None` for a pipeline never scheduled
    /// before), what to do at `now`. A new pipeline waits for its first match: it does not
    /// run at once. After downtime, only the latest missed occurrence runs.
    pub fn due(&self, stored: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Due {
        let next_after_now = self.expression.next_after(now, self.zone);
        let Some(stored) = stored else {
            return match next_after_now {
                Some(next) => Due::Wait { next },
                None => Due::Never,
            };
        };
        if stored > now {
            // The expression or zone may have changed since `stored` was computed: the next
            // match after now is authoritative when it is earlier.
            return match next_after_now {
                Some(next) if next < stored => Due::Wait { next },
                Some(_) => Due::Wait { next: stored },
                None => Due::Never,
            };
        }
        let latest = self
            .expression
            .latest_at_or_before(now, self.zone)
            .filter(|l| *l >= stored)
            // `stored` itself was a match when it was computed; if the expression changed
            // since, run once for it anyway (it was promised).
            .unwrap_or(stored);
        let mut missed = 0u32;
        let mut t = stored;
        // Occurrences in [stored, latest): each one skipped.
        if stored < latest {
            missed = 1;
            while let Some(n) = self.expression.next_after(t, self.zone) {
                if n >= latest || missed >= MISSED_COUNT_LIMIT {
                    break;
                }
                missed += 1;
                t = n;
            }
        }
        Due::Run {
            due: latest,
            missed,
            next: next_after_now,
        }
    }
}

/// The zone named `text` (exact IANA spelling, or differing only in case).
pub fn parse_zone(text: &str) -> Option<Tz> {
    text.parse::<Tz>().ok().or_else(|| {
        chrono_tz::TZ_VARIANTS
            .iter()
            .copied()
            .find(|z| z.name().eq_ignore_ascii_case(text))
    })
}

/// The zone names closest to `text`, for "did you mean".
pub fn close_zone(text: &str) -> Option<&'static str> {
    let names = chrono_tz::TZ_VARIANTS.iter().map(|z| z.name());
    if let Some(close) = crate::diagnostic::did_you_mean(text, names) {
        return Some(close);
    }
    // A city alone (`Paris`, `new york`): the zone that ends with it.
    let city = text.replace(' ', "_").to_ascii_lowercase();
    chrono_tz::TZ_VARIANTS
        .iter()
        .map(|z| z.name())
        .find(|n| n.to_ascii_lowercase().ends_with(&format!("/{city}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn expr(text: &str) -> CronExpr {
        CronExpr::parse(text).unwrap()
    }

    #[test]
    fn both_spellings_give_the_same_times() {
        let posix = expr("0 3 * * 1-5");
        let aws = expr("cron(0 3 ? * MON-FRI *)");
        assert_eq!(aws.kind, CronKind::Aws);
        let t = utc(2026, 11, 21, 12, 0); // a Saturday
        assert_eq!(posix.next_after(t, Tz::UTC), Some(utc(2026, 11, 23, 3, 0)));
        assert_eq!(aws.next_after(t, Tz::UTC), posix.next_after(t, Tz::UTC));
        assert!(posix.describe().contains("03:00"), "{}", posix.describe());
    }

    #[test]
    fn field_count_mistakes_get_a_hint() {
        let six = CronExpr::parse("0 3 ? * MON *").unwrap_err();
        assert!(six.message.contains("has 6 fields"), "{six:?}");
        assert!(six.hint.unwrap().contains("cron(min hour"));
        let aws5 = CronExpr::parse("cron(0 3 * * 1)").unwrap_err();
        assert!(
            aws5.message.contains("Image Builder's form has 6"),
            "{aws5:?}"
        );
        let rate = CronExpr::parse("rate(1 day)").unwrap_err();
        assert!(rate.message.contains("not supported"));
        assert!(CronExpr::parse("cron(0 3 * * ? *").is_err());
    }

    #[test]
    fn bad_field_is_pointed_at() {
        let e = CronExpr::parse("0 25 * * *").unwrap_err();
        assert!(e.message.contains("not a valid cron expression"), "{e:?}");
        let e = CronExpr::parse("0 3 * * FUN").unwrap_err();
        assert!(e.message.contains("not a valid"), "{e:?}");
    }

    #[test]
    fn impossible_dates_never_match_and_say_what_they_mean() {
        let feb31 = expr("0 0 31 2 *");
        let why = feb31.never_matches(utc(2026, 1, 1, 0, 0), Tz::UTC).unwrap();
        assert!(why.contains("never matches"), "{why}");
        assert!(why.contains("31"), "{why}");
        let past = expr("cron(0 0 * * ? 2020)");
        assert!(past.never_matches(utc(2026, 1, 1, 0, 0), Tz::UTC).is_some());
        assert!(
            expr("0 3 L * *")
                .never_matches(utc(2026, 1, 1, 0, 0), Tz::UTC)
                .is_none()
        );
    }

    #[test]
    fn time_zones_and_daylight_saving() {
        let zone = parse_zone("Europe/Paris").unwrap();
        let daily = expr("30 2 * * *");
        // Winter: 02:30 Paris is 01:30 UTC.
        assert_eq!(
            daily.next_after(utc(2026, 1, 10, 0, 0), zone),
            Some(utc(2026, 1, 10, 1, 30))
        );
        // Summer: 00:30 UTC.
        assert_eq!(
            daily.next_after(utc(2026, 7, 10, 0, 0), zone),
            Some(utc(2026, 7, 10, 0, 30))
        );
        // 2026-03-29: 02:00-03:00 does not exist in Paris. The run is not lost and not
        // doubled: exactly one run between the 28th and the 30th.
        let from = utc(2026, 3, 28, 12, 0);
        let first = daily.next_after(from, zone).unwrap();
        let second = daily.next_after(first, zone).unwrap();
        assert!(first < utc(2026, 3, 29, 23, 0), "{first}");
        assert!(second > utc(2026, 3, 29, 23, 0), "{second}");
        // 2026-10-25: 02:30 happens twice in Paris; one run only.
        let from = utc(2026, 10, 24, 12, 0);
        let first = daily.next_after(from, zone).unwrap();
        let second = daily.next_after(first, zone).unwrap();
        assert_eq!(first.date_naive(), utc(2026, 10, 25, 0, 0).date_naive());
        assert_eq!(second.date_naive(), utc(2026, 10, 26, 0, 0).date_naive());
    }

    #[test]
    fn zone_names_and_suggestions() {
        assert_eq!(parse_zone("europe/paris"), Some(chrono_tz::Europe::Paris));
        assert_eq!(parse_zone("Europe/Pariss"), None);
        assert_eq!(close_zone("Europe/Pariss"), Some("Europe/Paris"));
        assert_eq!(close_zone("Paris"), Some("Europe/Paris"));
        assert_eq!(close_zone("new york"), Some("America/New_York"));
    }

    #[test]
    fn a_new_pipeline_waits_for_its_first_match() {
        let e = expr("0 3 * * *");
        let when = When {
            expression: &e,
            zone: Tz::UTC,
        };
        assert_eq!(
            when.due(None, utc(2026, 5, 1, 12, 0)),
            Due::Wait {
                next: utc(2026, 5, 2, 3, 0)
            }
        );
    }

    #[test]
    fn catch_up_runs_only_the_latest_missed_occurrence() {
        let e = expr("0 3 * * *");
        let when = When {
            expression: &e,
            zone: Tz::UTC,
        };
        let stored = utc(2026, 5, 2, 3, 0);
        // Before it is due: wait.
        let clock = FixedClock(utc(2026, 5, 2, 2, 59));
        assert_eq!(
            when.due(Some(stored), clock.now()),
            Due::Wait { next: stored }
        );
        // Exactly due: run it, nothing missed.
        let clock = FixedClock(stored);
        assert_eq!(
            when.due(Some(stored), clock.now()),
            Due::Run {
                due: stored,
                missed: 0,
                next: Some(utc(2026, 5, 3, 3, 0))
            }
        );
        // Down for four days: one run, for the latest occurrence; three are skipped.
        let clock = FixedClock(utc(2026, 5, 5, 14, 0));
        assert_eq!(
            when.due(Some(stored), clock.now()),
            Due::Run {
                due: utc(2026, 5, 5, 3, 0),
                missed: 3,
                next: Some(utc(2026, 5, 6, 3, 0))
            }
        );
    }

    #[test]
    fn a_changed_expression_moves_the_next_run_earlier() {
        let hourly = expr("0 * * * *");
        let when = When {
            expression: &hourly,
            zone: Tz::UTC,
        };
        let now = utc(2026, 5, 1, 12, 10);
        assert_eq!(
            when.due(Some(utc(2026, 5, 8, 3, 0)), now),
            Due::Wait {
                next: utc(2026, 5, 1, 13, 0)
            }
        );
    }

    #[test]
    fn an_expression_with_no_future_is_never() {
        let e = expr("cron(0 0 * * ? 2020)");
        let when = When {
            expression: &e,
            zone: Tz::UTC,
        };
        assert_eq!(when.due(None, utc(2026, 1, 1, 0, 0)), Due::Never);
    }
}
