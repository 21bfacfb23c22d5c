//! Which version pairs hikkoshi supports, and the dump tools that fit them.

use super::{Level, Report};
use crate::schema::DumpTools;

/// The version pairs `.ci/run` migrates end to end (clone, follow under writes, cutover, verify, rows
/// compared): `tests/it/versions.rs`, `tests/it/cutover.rs`, `tests/it/follow.rs`.
pub const TESTED_PAIRS: &[(u32, u32)] = &[
    (13, 15),
    (13, 16),
    (13, 18),
    (14, 17),
    (15, 15),
    (15, 18),
    (16, 18),
    (17, 16),
    (18, 18),
];

/// How well hikkoshi supports migrating from PostgreSQL `source` to `target`: tested in CI, expected to
/// work, or refused (with the reason and what to do instead).
pub fn support(source: u32, target: u32) -> (Level, String) {
    let oldest = 13;
    if source < oldest || target < oldest {
        let which = if source < oldest { "source" } else { "target" };
        let v = source.min(target);
        return (
            Level::Blocker,
            format!(
                "PostgreSQL {source} → {target} is not supported: the {which} runs PostgreSQL {v}, and hikkoshi \
                 supports {oldest} and later (older servers lack what its stream and cutover rely on, and \
                 none is tested). Upgrade the {which} in place first (pg_upgrade), or move it with \
                 pg_dump/pg_restore in a maintenance window"
            ),
        );
    }
    if TESTED_PAIRS.contains(&(source, target)) {
        (
            Level::Ok,
            format!(
                "PostgreSQL {source} → {target}: tested in CI (clone, follow, cutover, verify)"
            ),
        )
    } else if target + 1 < source {
        (
            Level::Warning,
            format!(
                "PostgreSQL {source} → {target} is a downgrade by {} majors (the target is older than the \
                 source): not tested; the schema may use what the target lacks",
                source - target
            ),
        )
    } else {
        (
            Level::Ok,
            format!(
                "PostgreSQL {source} → {target}: expected to work (every major from 13 to 18 is tested, \
                 not this pair)"
            ),
        )
    }
}

pub(super) fn versions(r: &mut Report, source: u32, target: u32, pg_bin: Option<&std::path::Path>) {
    let (level, message) = support(source, target);
    r.add(
        level,
        "version pair",
        None,
        message,
        (level != Level::Ok).then(|| {
            "upgrade the older server first (pg_upgrade), or migrate to a target of the source's major \
             or newer"
                .to_string()
        }),
    );
    // a downgrade by one major is "expected to work" above; say what it risks (more than one is a warning
    // there already)
    if target < source && target + 1 == source {
        r.add(
            Level::Warning,
            "versions",
            None,
            format!(
                "the target (PostgreSQL {target}) is older than the source ({source}): a downgrade; the \
                 schema may use features the target lacks"
            ),
            Some("test the schema step first (hikkoshi clone into a scratch database)".into()),
        );
    }
    match DumpTools::find(pg_bin, source, target) {
        Ok(t) if t.restores_through_script() => r.add(
            Level::Ok,
            "pg_dump",
            None,
            format!(
                "pg_dump {} in {}; it is newer than the target (PostgreSQL {target}), so the schema is \
                 restored through a SQL script that hikkoshi filters (settings the target does not know \
                 are left out) and runs itself",
                t.version,
                t.bin.display()
            ),
            None,
        ),
        Ok(t) => r.add(
            Level::Ok,
            "pg_dump",
            None,
            format!("pg_dump {} in {}", t.version, t.bin.display()),
            None,
        ),
        Err(e) => r.add(
            Level::Blocker,
            "pg_dump",
            None,
            e.to_string(),
            Some(format!(
                "install the PostgreSQL {source} (or newer) client programs, or give --pg-bin DIR"
            )),
        ),
    }
}

#[cfg(test)]
mod support_tests {
    use super::*;

    #[test]
    fn every_pair_says_tested_expected_or_refused() {
        assert_eq!(support(13, 18).0, Level::Ok);
        assert!(support(13, 18).1.contains("tested in CI"));
        assert!(support(14, 16).1.contains("expected to work"));
        assert_eq!(support(12, 18).0, Level::Blocker);
        assert!(support(12, 18).1.contains("source runs PostgreSQL 12"));
        assert_eq!(support(15, 11).0, Level::Blocker);
        assert_eq!(support(18, 15).0, Level::Warning);
        assert!(support(17, 16).1.contains("tested in CI"));
    }
}
