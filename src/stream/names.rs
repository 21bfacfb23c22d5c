//! Every name hikkoshi gives a replication slot or a publication, in one place: `clone` makes them,
//! `cutover` adds its own, `clean` finds them all by one pattern.
//!
//! - `hikkoshi_<id>`: the migration's stream — its slot on the source and its publication (same name);
//! - `hikkoshi_<id>_<pid>`: a temporary slot a resumed or plain clone takes for its snapshot;
//! - `hikkoshi_<id>_rev`: the reverse stream a `cutover --reverse` starts on the new primary;
//! - `hikkoshi_<id>_proof`: the cutover proof's publication on the new primary, and the prefix of its two
//!   temporary slots.

/// The migration's stream: slot and publication on the source.
pub fn stream(migration_id: &str) -> String {
    format!("hikkoshi_{migration_id}")
}

/// A temporary slot of the process `pid`, for a snapshot.
pub fn temporary_slot(migration_id: &str, pid: u32) -> String {
    format!("hikkoshi_{migration_id}_{pid}")
}

/// The reverse stream of a forward stream's slot or publication.
pub fn reverse(forward: &str) -> String {
    format!("{forward}_rev")
}

/// The cutover proof's publication (and its slots' prefix).
pub fn proof(migration_id: &str) -> String {
    format!("hikkoshi_{migration_id}_proof")
}

/// A regular expression for every slot and publication of a migration (`clean`); its temporary proof
/// slots go with their sessions.
pub fn pattern(migration_id: &str) -> String {
    format!("^hikkoshi_{migration_id}(_[0-9]+|_rev|_proof)?$")
}

/// Whether `name` is one hikkoshi gives a stream's publication (or slot) or a DDL capture's event trigger
/// (`<publication>_end`, `_drop`, `_rewrite`): what a schema dump of the source holds that is not the user's.
pub fn is_ours(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("hikkoshi_") else {
        return false;
    };
    let Some(id) = rest.get(..8) else {
        return false;
    };
    let suffix = &rest[8..];
    let suffix = suffix.strip_prefix("_rev").unwrap_or(suffix);
    id.chars().all(|c| c.is_ascii_hexdigit())
        && matches!(suffix, "" | "_proof" | "_end" | "_drop" | "_rewrite")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_matches_the_clean_pattern_and_nothing_else_does() {
        let id = "3f9c2a1b";
        let re = pattern(id);
        let matches = |n: &str| {
            // the pattern is simple enough to check by hand: anchored, one optional suffix
            let body = n.strip_prefix(&format!("hikkoshi_{id}"));
            let ok = match body {
                Some("") | Some("_rev") | Some("_proof") => true,
                Some(rest) => {
                    rest.len() > 1
                        && rest.starts_with('_')
                        && rest[1..].chars().all(|c| c.is_ascii_digit())
                }
                None => false,
            };
            assert!(re.starts_with('^') && re.ends_with('$'));
            ok
        };
        for n in [
            stream(id),
            temporary_slot(id, 4242),
            reverse(&stream(id)),
            proof(id),
        ] {
            assert!(matches(&n), "{n}");
        }
        assert!(!matches("hikkoshi_other"));
    }

    #[test]
    fn ours_are_told_from_the_users() {
        for n in [
            "hikkoshi_3f9c2a1b",
            "hikkoshi_3f9c2a1b_rev",
            "hikkoshi_3f9c2a1b_proof",
            "hikkoshi_3f9c2a1b_end",
            "hikkoshi_3f9c2a1b_rev_rewrite",
        ] {
            assert!(is_ours(n), "{n}");
        }
        for n in [
            "hikkoshi_items",
            "hikkoshi_3f9c2a1b_x",
            "hikkoshi_3f9c",
            "orders",
            "hikkoshi_zzzzzzzz",
        ] {
            assert!(!is_ours(n), "{n}");
        }
    }
}
