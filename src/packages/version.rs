//! Version ordering as each package manager defines it: Debian's (dpkg's epoch, upstream
//! version and revision, with `~` sorting before everything, even the end) through the
//! `debversion` crate, and RPM's rpmvercmp (epoch, version, release; `~` and `^`) through the
//! `rpm-version` crate. Pure; owns no parsing of package indices.

use std::cmp::Ordering;

/// Whose rules order two versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// dpkg and apt.
    Debian,
    /// rpm, dnf and yum.
    Rpm,
}

impl Scheme {
    /// The scheme of a package manager as the manifest names it (`PackageList::manager`
    /// `dpkg`/`rpm`, `PackageSources::manager` `apt`/`dnf`); `None` for one we do not know.
    pub fn of(manager: &str) -> Option<Scheme> {
        match manager {
            "dpkg" | "apt" => Some(Scheme::Debian),
            "rpm" | "dnf" | "yum" => Some(Scheme::Rpm),
            _ => None,
        }
    }
}

/// Order `a` and `b` by `scheme`'s rules. Never fails: a Debian version dpkg would refuse
/// (no package manager installs one) sorts below every valid one, so it is never offered
/// as an update; two such versions compare as text.
pub fn compare(scheme: Scheme, a: &str, b: &str) -> Ordering {
    match scheme {
        Scheme::Debian => {
            let parse = |v: &str| debversion::Version::parse_lenient(v.trim()).ok();
            match (parse(a), parse(b)) {
                (Some(a), Some(b)) => a.cmp(&b),
                (Some(_), None) => Ordering::Greater,
                (None, Some(_)) => Ordering::Less,
                (None, None) => a.cmp(b),
            }
        }
        Scheme::Rpm => rpm_version::rpm_evr_compare(a.trim(), b.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::{Equal, Greater, Less};

    fn deb(a: &str, b: &str) -> Ordering {
        let forward = compare(Scheme::Debian, a, b);
        assert_eq!(
            compare(Scheme::Debian, b, a),
            forward.reverse(),
            "{a} vs {b} is not antisymmetric"
        );
        forward
    }

    fn rpm(a: &str, b: &str) -> Ordering {
        compare(Scheme::Rpm, a, b)
    }

    #[test]
    fn debian_epochs_win_over_everything_after_them() {
        assert_eq!(deb("1:1.0", "2.0"), Greater);
        assert_eq!(deb("1:1.0-1", "1:1.0-1"), Equal);
        assert_eq!(deb("0:1.0", "1.0"), Equal);
        assert_eq!(deb("2:0.1", "1:9.9-9"), Greater);
        // dpkg's own: 1:2.30.2-1 (util-linux in bullseye) above 2.38.1-5 without epoch.
        assert_eq!(deb("1:2.30.2-1", "2.38.1-5"), Greater);
    }

    #[test]
    fn debian_tilde_sorts_before_the_end() {
        assert_eq!(deb("1.0~rc1", "1.0"), Less);
        assert_eq!(deb("1.0~~", "1.0~"), Less);
        assert_eq!(deb("1.0~~a", "1.0~"), Less);
        assert_eq!(deb("1.0~rc1", "1.0~rc2"), Less);
        assert_eq!(deb("1.0~beta", "1.0~rc"), Less);
        assert_eq!(deb("3.0.17-1~deb12u2", "3.0.17-1"), Less);
    }

    #[test]
    fn debian_plus_sorts_after_the_end() {
        assert_eq!(deb("1.0+deb12u1", "1.0"), Greater);
        assert_eq!(deb("1.0+deb12u1", "1.0+deb12u2"), Less);
        assert_eq!(deb("2.36-9+deb12u13", "2.36-9+deb12u10"), Greater);
        assert_eq!(deb("1.0-1+b1", "1.0-1"), Greater);
        assert_eq!(deb("1.0+dfsg-1", "1.0-1"), Greater);
    }

    #[test]
    fn debian_revisions_of_security_updates() {
        assert_eq!(deb("1.22.1-9+deb12u12", "1.22.1-9+deb12u13"), Less);
        assert_eq!(deb("3.0.17-1~deb12u2", "3.0.18-1~deb12u1"), Less);
        assert_eq!(deb("1.0-1", "1.0-2"), Less);
        assert_eq!(deb("1.0-10", "1.0-9"), Greater);
        assert_eq!(deb("1.0", "1.0-0"), Equal);
        // A revision only decides when the upstream versions are equal.
        assert_eq!(deb("1.1-1", "1.0-99"), Greater);
    }

    #[test]
    fn debian_digits_compare_as_numbers_and_letters_before_other_signs() {
        assert_eq!(deb("1.10", "1.9"), Greater);
        assert_eq!(deb("1.010", "1.10"), Equal);
        assert_eq!(deb("1.0a", "1.0"), Greater);
        assert_eq!(deb("1.0a", "1.0b"), Less);
        // Letters sort before non-letters: `a` < `.`, `Z` < `a`.
        assert_eq!(deb("1.0a", "1.0."), Less);
        assert_eq!(deb("1.0Z", "1.0a"), Less);
        assert_eq!(deb("1.0.1", "1.0a"), Greater);
        assert_eq!(deb("20240101", "9999"), Greater);
        assert_eq!(deb("1.2.3", "1.2.3"), Equal);
    }

    #[test]
    fn debian_invalid_versions_sort_below_valid_ones() {
        assert_eq!(deb("not a version", "0.1"), Less);
        assert_eq!(deb("", "0"), Less);
        assert_eq!(deb("x y", "x y"), Equal);
    }

    #[test]
    fn rpm_rpmvercmp_cases() {
        assert_eq!(rpm("1.0-1", "1.0-2"), Less);
        assert_eq!(rpm("1:1.0-1", "2.0-1"), Greater);
        assert_eq!(rpm("1.0~rc1-1", "1.0-1"), Less);
        assert_eq!(rpm("1.0^git1-1", "1.0-1"), Greater);
        assert_eq!(rpm("1.10-1.el9", "1.9-3.el9"), Greater);
        assert_eq!(rpm("3.0.7-24.el9", "3.0.7-27.el9_4"), Less);
        assert_eq!(rpm("1.0a-1", "1.0-1"), Greater);
        assert_eq!(rpm("1.0-1", "1.0-1"), Equal);
        // RPM_QUERY records an explicit epoch 0 as `0:` (rpm 4.18 does), a repository may not.
        assert_eq!(rpm("0:1.0-1", "1.0-1"), Equal);
    }

    #[test]
    fn schemes_of_managers() {
        assert_eq!(Scheme::of("dpkg"), Some(Scheme::Debian));
        assert_eq!(Scheme::of("apt"), Some(Scheme::Debian));
        assert_eq!(Scheme::of("rpm"), Some(Scheme::Rpm));
        assert_eq!(Scheme::of("dnf"), Some(Scheme::Rpm));
        assert_eq!(Scheme::of("apk"), None);
    }
}
