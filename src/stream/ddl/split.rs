//! Splitting a query string into its statements, and finding the one an event trigger reported.
//!
//! `current_query()` in an event trigger returns the whole string the client sent. A string of several
//! statements (`ALTER TABLE …; UPDATE …;`) must not be replayed whole: its DML reaches the target through
//! the stream already, and would be applied twice. So the string is cut at its top-level semicolons — not
//! those inside quotes, dollar quotes, comments or a `BEGIN ATOMIC … END` function body — and each event is
//! matched to the next statement whose leading words fit the event's command tag.

/// One statement of a query string, and its words (keywords and bare identifiers, upper-cased) in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    pub words: Vec<String>,
}

/// Cuts `sql` into statements (empty ones dropped).
pub fn split(sql: &str) -> Vec<Piece> {
    let b = sql.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut words: Vec<String> = Vec::new();
    // depth of BEGIN/CASE … END inside a CREATE FUNCTION or PROCEDURE body
    let mut depth = 0usize;
    let mut i = 0;
    let mut push = |from: usize, to: usize, words: &mut Vec<String>| {
        let text = sql[from..to].trim();
        if !text.is_empty() {
            pieces.push(Piece {
                text: text.to_string(),
                words: std::mem::take(words),
            });
        }
        words.clear();
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut nest = 1;
                i += 2;
                while i < b.len() && nest > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        nest += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        nest -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b'\'' => {
                // E'…' allows backslash escapes; '' is a quote in either form
                let escapes =
                    i > 0 && matches!(b[i - 1], b'e' | b'E') && !word_byte_before(b, i - 1);
                i = closing_quote(b, i, escapes);
            }
            b'"' => i = closing_quote(b, i, false),
            b'$' if !word_byte_before(b, i) => {
                if let Some(tag_end) = dollar_tag(b, i) {
                    let tag = &sql[i..=tag_end];
                    match sql[tag_end + 1..].find(tag) {
                        Some(at) => i = tag_end + 1 + at + tag.len() - 1,
                        None => i = b.len(),
                    }
                }
            }
            b';' if depth == 0 => {
                push(start, i, &mut words);
                start = i + 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let from = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                let w = sql[from..i].to_ascii_uppercase();
                if is_routine(&words) {
                    match w.as_str() {
                        "BEGIN" | "CASE" => depth += 1,
                        "END" => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                }
                words.push(w);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    push(start, sql.len(), &mut words);
    pieces
}

/// The position of the quote that closes the one at `open` (a doubled quote is part of the text; with
/// `escapes`, so is a backslash's next byte), or the end.
fn closing_quote(b: &[u8], open: usize, escapes: bool) -> usize {
    let quote = b[open];
    let mut i = open + 1;
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
        } else if b[i] != quote {
            i += 1;
        } else if b.get(i + 1) == Some(&quote) {
            i += 2;
        } else {
            return i;
        }
    }
    b.len()
}

fn word_byte_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] >= 0x80)
}

/// The end of a dollar-quote opening tag (`$$` or `$name$`) at `i`, if there is one.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'$' => return Some(j),
            c if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => {
                if j == i + 1 && c.is_ascii_digit() {
                    return None; // $1 is a parameter
                }
                j += 1
            }
            _ => return None,
        }
    }
    None
}

/// A `CREATE [OR REPLACE] FUNCTION|PROCEDURE` statement, whose SQL-standard body has semicolons inside.
fn is_routine(words: &[String]) -> bool {
    let w: Vec<&str> = words.iter().take(4).map(|s| s.as_str()).collect();
    matches!(
        w.as_slice(),
        ["CREATE", "FUNCTION" | "PROCEDURE", ..]
            | ["CREATE", "OR", "REPLACE", "FUNCTION" | "PROCEDURE"]
    )
}

/// Whether a statement's words fit an event trigger's command tag (`CREATE INDEX` fits `CREATE UNIQUE INDEX
/// CONCURRENTLY …`; `CREATE TABLE AS` fits `CREATE TABLE t AS SELECT …`; `SELECT INTO` fits `SELECT … INTO t
/// …`): the first word is the tag's, and the tag's other words follow in order.
pub fn fits(piece: &Piece, tag: &str) -> bool {
    let mut tag_words = tag.split_whitespace();
    let Some(first) = tag_words.next() else {
        return false;
    };
    if piece.words.first().map(String::as_str) != Some(first) {
        return false;
    }
    let mut rest = piece.words.iter().skip(1);
    tag_words.all(|t| rest.any(|w| w == t))
}

/// The statement to run on the target for `piece`: `CONCURRENTLY` is dropped, since the target applies in a
/// transaction (where `CREATE INDEX CONCURRENTLY` cannot run) and no application waits on it there.
pub fn for_target(piece: &Piece) -> String {
    if !piece.words.iter().any(|w| w == "CONCURRENTLY") {
        return piece.text.clone();
    }
    // the first CONCURRENTLY outside quotes: re-scan for it at word boundaries
    let text = &piece.text;
    let upper = text.to_ascii_uppercase();
    let mut from = 0;
    while let Some(at) = upper[from..].find("CONCURRENTLY") {
        let at = from + at;
        let end = at + "CONCURRENTLY".len();
        let bounded = !word_byte_before(upper.as_bytes(), at)
            && upper
                .as_bytes()
                .get(end)
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == b'_'));
        let quoted = in_quotes(text, at);
        if bounded && !quoted {
            return format!("{}{}", &text[..at], text[end..].trim_start_matches(' '));
        }
        from = end;
    }
    piece.text.clone()
}

/// Whether byte `at` of `text` lies inside a quoted identifier or string (`"`, `'`).
fn in_quotes(text: &str, at: usize) -> bool {
    let mut quote: Option<u8> = None;
    for &c in &text.as_bytes()[..at] {
        match (quote, c) {
            (None, b'"' | b'\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    quote.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<String> {
        split(sql).into_iter().map(|p| p.text).collect()
    }

    #[test]
    fn cuts_at_top_level_semicolons_only() {
        assert_eq!(
            texts("ALTER TABLE t ADD c int; UPDATE t SET c = 1 ;; "),
            vec!["ALTER TABLE t ADD c int", "UPDATE t SET c = 1"]
        );
        assert_eq!(
            texts("COMMENT ON TABLE t IS 'a;b'';c'; SELECT 1"),
            vec!["COMMENT ON TABLE t IS 'a;b'';c'", "SELECT 1"]
        );
        assert_eq!(
            texts(r"SELECT E'it\'s;'; SELECT 2"),
            vec![r"SELECT E'it\'s;'", "SELECT 2"]
        );
        assert_eq!(
            texts(
                r#"CREATE TABLE "a;b" (x int); -- c;d
            /* e; /* f; */ g; */ DROP TABLE x"#
            ),
            vec![
                r#"CREATE TABLE "a;b" (x int)"#,
                "-- c;d\n            /* e; /* f; */ g; */ DROP TABLE x"
            ]
        );
    }

    #[test]
    fn dollar_quotes_and_atomic_bodies_stay_whole() {
        let f =
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END $body$";
        assert_eq!(texts(&format!("{f}; SELECT f()")), vec![f, "SELECT f()"]);
        let g = "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); \
                 SELECT CASE WHEN true THEN 1 END; END";
        assert_eq!(
            texts(&format!("{g}; ALTER TABLE t ADD y int")),
            vec![g, "ALTER TABLE t ADD y int"]
        );
        // $1 is a parameter, not a quote
        assert_eq!(
            texts("PREPARE p AS SELECT $1; SELECT 3"),
            vec!["PREPARE p AS SELECT $1", "SELECT 3"]
        );
    }

    #[test]
    fn a_tag_fits_the_statement_it_names() {
        let p = |s: &str| split(s).remove(0);
        assert!(fits(
            &p("create unique index concurrently i on t (a)"),
            "CREATE INDEX"
        ));
        assert!(fits(&p("CREATE TABLE t AS SELECT 1"), "CREATE TABLE AS"));
        assert!(fits(&p("SELECT 1 AS a INTO t2"), "SELECT INTO"));
        assert!(!fits(&p("UPDATE t SET a = 1"), "ALTER TABLE"));
        assert!(!fits(
            &p("DO $$ BEGIN EXECUTE 'ALTER TABLE t ADD b int'; END $$"),
            "ALTER TABLE"
        ));
        assert!(!fits(&p("CREATE INDEX i ON t (a)"), "CREATE TABLE"));
    }

    #[test]
    fn concurrently_is_dropped_for_the_target() {
        let p = |s: &str| for_target(&split(s).remove(0));
        assert_eq!(
            p("CREATE INDEX CONCURRENTLY i ON t (a)"),
            "CREATE INDEX i ON t (a)"
        );
        assert_eq!(
            p("drop index concurrently if exists i"),
            "drop index if exists i"
        );
        assert_eq!(
            p(r#"CREATE INDEX "CONCURRENTLY" ON t (a)"#),
            r#"CREATE INDEX "CONCURRENTLY" ON t (a)"#
        );
        assert_eq!(p("ALTER TABLE t ADD a int"), "ALTER TABLE t ADD a int");
    }
}
