//! SQL identifiers and literals, quoted the way PostgreSQL reads them.

use std::fmt;

/// A schema-qualified relation name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }
    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// `schema.name` as people write it (quoted only where needed), for messages.
impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            display_ident(&self.schema),
            display_ident(&self.name)
        )
    }
}

impl QualifiedName {
    /// Reads back `schema.name` as PostgreSQL's `format('%I.%I', …)` writes it (quoted where needed, `""`
    /// for a quote inside quotes). None when it is not two names.
    pub fn parse(s: &str) -> Option<QualifiedName> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    cur.push('"');
                }
                '"' => quoted = !quoted,
                '.' if !quoted => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        parts.push(cur);
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) if !quoted && !schema.is_empty() && !name.is_empty() => {
                Some(QualifiedName { schema, name })
            }
            _ => None,
        }
    }
}

/// Double-quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an identifier only when it would not read back the same without quotes.
pub fn display_ident(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain { s.to_string() } else { quote_ident(s) }
}

/// A string literal for a session with `standard_conforming_strings = on`.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted_safely() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(display_ident("orders"), "orders");
        assert_eq!(display_ident("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            QualifiedName::new("app", "Mixed Case").to_string(),
            "app.\"Mixed Case\""
        );
    }

    #[test]
    fn qualified_names_read_back_as_postgresql_writes_them() {
        assert_eq!(
            QualifiedName::parse("app.tickets"),
            Some(QualifiedName::new("app", "tickets"))
        );
        assert_eq!(
            QualifiedName::parse(r#""Odd.Schema"."a ""b"" c""#),
            Some(QualifiedName::new("Odd.Schema", r#"a "b" c"#))
        );
        assert_eq!(QualifiedName::parse("tickets"), None);
        assert_eq!(QualifiedName::parse("a.b.c"), None);
    }
}
