//! Selection rules: `--include` and `--exclude` patterns of the form `schema.table`, where `*` matches any run
//! of characters and `?` one character (`public.*`, `*.audit_*`). A pattern without a dot names a table in
//! any schema. Double quotes keep a dot or a star literal (`"my.schema".*`). Exclusion wins over inclusion;
//! no `--include` means everything. A partition follows its partitioned root.

use crate::ident::QualifiedName;

/// One `--include` or `--exclude` pattern, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub text: String,
    schema: Vec<Tok>,
    table: Vec<Tok>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Lit(char),
    Any,
    One,
}

/// A pattern that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("selection pattern \"{pattern}\" {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let err = |reason: &str| PatternError {
            pattern: text.to_string(),
            reason: reason.to_string(),
        };
        let mut parts: Vec<Vec<Tok>> = vec![Vec::new()];
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    parts.last_mut().unwrap().push(Tok::Lit('"'));
                }
                '"' => quoted = !quoted,
                '.' if !quoted => parts.push(Vec::new()),
                '*' if !quoted => parts.last_mut().unwrap().push(Tok::Any),
                '?' if !quoted => parts.last_mut().unwrap().push(Tok::One),
                c => parts.last_mut().unwrap().push(Tok::Lit(c)),
            }
        }
        if quoted {
            return Err(err("has an unterminated double quote"));
        }
        if parts.iter().any(Vec::is_empty) {
            return Err(err(
                "has an empty part: write schema.table, e.g. public.orders or app.*",
            ));
        }
        let (schema, table) = match parts.len() {
            1 => (vec![Tok::Any], parts.pop().unwrap()),
            2 => {
                let t = parts.pop().unwrap();
                (parts.pop().unwrap(), t)
            }
            _ => {
                return Err(err(
                    "has more than one dot: write schema.table (quote names that contain dots)",
                ));
            }
        };
        Ok(Pattern {
            text: text.to_string(),
            schema,
            table,
        })
    }

    /// A SQL condition that holds exactly where `matches` does, over two text expressions.
    fn sql(&self, schema: &str, table: &str) -> String {
        format!(
            "({schema} LIKE {} ESCAPE '\\' AND {table} LIKE {} ESCAPE '\\')",
            like(&self.schema),
            like(&self.table)
        )
    }

    pub fn matches(&self, name: &QualifiedName) -> bool {
        glob(&self.schema, &name.schema.chars().collect::<Vec<_>>())
            && glob(&self.table, &name.name.chars().collect::<Vec<_>>())
    }
}

/// A LIKE pattern (escape `\\`) as a quoted SQL literal.
fn like(p: &[Tok]) -> String {
    let mut out = String::new();
    for t in p {
        match t {
            Tok::Any => out.push('%'),
            Tok::One => out.push('_'),
            Tok::Lit(c @ ('%' | '_' | '\\')) => {
                out.push('\\');
                out.push(*c);
            }
            Tok::Lit(c) => out.push(*c),
        }
    }
    crate::ident::quote_literal(&out)
}

fn glob(p: &[Tok], s: &[char]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((Tok::Any, rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((Tok::One, rest)) => !s.is_empty() && glob(rest, &s[1..]),
        Some((Tok::Lit(c), rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// The include and exclude rules of one run.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub include: Vec<Pattern>,
    pub exclude: Vec<Pattern>,
}

impl Selection {
    pub fn parse(include: &[String], exclude: &[String]) -> Result<Selection, PatternError> {
        Ok(Selection {
            include: include
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()?,
            exclude: exclude
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether a relation with this (root) name is selected.
    pub fn selects(&self, name: &QualifiedName) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| p.matches(name)))
            && !self.exclude.iter().any(|p| p.matches(name))
    }

    /// A SQL condition over two text expressions that holds exactly where `selects` does (the source's
    /// DDL capture decides with it whether a new table joins the stream).
    pub fn sql(&self, schema: &str, table: &str) -> String {
        let any = |ps: &[Pattern]| {
            ps.iter()
                .map(|p| p.sql(schema, table))
                .collect::<Vec<_>>()
                .join(" OR ")
        };
        let include = if self.include.is_empty() {
            "true".to_string()
        } else {
            format!("({})", any(&self.include))
        };
        if self.exclude.is_empty() {
            include
        } else {
            format!("{include} AND NOT ({})", any(&self.exclude))
        }
    }

    /// The patterns that match none of `names`: almost always a typo, so the caller refuses them.
    pub fn unmatched<'a>(&'a self, names: &[&QualifiedName]) -> Vec<&'a str> {
        self.include
            .iter()
            .chain(&self.exclude)
            .filter(|p| !names.iter().any(|n| p.matches(n)))
            .map(|p| p.text.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str, t: &str) -> QualifiedName {
        QualifiedName::new(s, t)
    }

    #[test]
    fn globs_match_schema_and_table_parts() {
        let p = Pattern::parse("*.audit_*").unwrap();
        assert!(p.matches(&q("app", "audit_log")));
        assert!(!p.matches(&q("app", "xaudit_log")));
        let p = Pattern::parse("public.*").unwrap();
        assert!(p.matches(&q("public", "x")));
        assert!(!p.matches(&q("app", "x")));
        let p = Pattern::parse("orders").unwrap();
        assert!(p.matches(&q("any", "orders")));
        let p = Pattern::parse("app.t?").unwrap();
        assert!(p.matches(&q("app", "t1")) && !p.matches(&q("app", "t12")));
    }

    #[test]
    fn quotes_keep_dots_and_stars_literal() {
        let p = Pattern::parse("\"my.schema\".\"a*\"").unwrap();
        assert!(p.matches(&q("my.schema", "a*")));
        assert!(!p.matches(&q("my.schema", "ab")));
        assert!(Pattern::parse("\"open").is_err());
        assert!(Pattern::parse("a.b.c").is_err());
        assert!(Pattern::parse("a.").is_err());
    }

    #[test]
    fn exclusion_wins_and_unmatched_patterns_are_reported() {
        let s =
            Selection::parse(&["app.*".into()], &["*.audit_*".into(), "nope.*".into()]).unwrap();
        assert!(s.selects(&q("app", "orders")));
        assert!(!s.selects(&q("app", "audit_log")));
        assert!(!s.selects(&q("public", "orders")));
        let a = q("app", "orders");
        let b = q("app", "audit_log");
        assert_eq!(s.unmatched(&[&a, &b]), vec!["nope.*"]);
    }
}
