//! DDL during a follow: captured on the upstream server by an event trigger (`capture`), cut out of the
//! query string that carried it (`split`), and applied by the applier at its place in the stream.

pub mod capture;
pub mod split;

/// One captured command, as a row of the capture table reaches the applier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub id: i64,
    /// When the source ran it.
    pub at: String,
    pub tag: String,
    /// The whole query string the client sent.
    pub statement: String,
    /// Which client statement it came from: commands of one string share it.
    pub origin: (String, i32),
    pub search_path: String,
    pub role: String,
    /// Tables it touched, `schema.table` quoted (dropped ones too).
    pub touched: Vec<String>,
    /// New tables the selection takes.
    pub created: Vec<String>,
    /// New tables the selection takes that have no replica identity yet, so could not join the stream.
    pub unpublished: Vec<String>,
    /// Why the capture could not carry it, when it could not.
    pub refused: Option<String>,
}

impl Captured {
    /// Reads a row of the capture table from its columns' names and text values.
    pub fn from_row(columns: &[String], values: &[Option<String>]) -> Result<Captured, String> {
        let get = |name: &str| -> Option<&str> {
            columns
                .iter()
                .position(|c| c == name)
                .and_then(|i| values.get(i))
                .and_then(|v| v.as_deref())
        };
        let need = |name: &str| get(name).ok_or_else(|| format!("the capture row has no {name}"));
        Ok(Captured {
            id: need("id")?
                .parse()
                .map_err(|_| "the capture row's id is not a number".to_string())?,
            at: need("at")?.to_string(),
            tag: need("tag")?.to_string(),
            statement: need("statement")?.to_string(),
            origin: (
                need("statement_at")?.to_string(),
                need("pid")?.parse().unwrap_or(0),
            ),
            search_path: need("search_path")?.to_string(),
            role: need("role_name")?.to_string(),
            touched: text_array(get("touched").unwrap_or("{}")),
            created: text_array(get("created").unwrap_or("{}")),
            unpublished: text_array(get("unpublished").unwrap_or("{}")),
            refused: get("refused").map(str::to_string),
        })
    }
}

/// A one-dimensional text array in PostgreSQL's output form (`{a,"b c","d\"e"}`).
pub fn text_array(s: &str) -> Vec<String> {
    let inner = s
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or("");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() || was_quoted || !out.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arrays_read_back() {
        assert_eq!(text_array("{}"), Vec::<String>::new());
        assert_eq!(text_array("{public.t}"), vec!["public.t"]);
        assert_eq!(
            text_array(r#"{public.t,"public.\"Odd, name\"","a\\b"}"#),
            vec!["public.t", r#"public."Odd, name""#, r"a\b"]
        );
        assert_eq!(text_array(r#"{"",x}"#), vec!["", "x"]);
    }
}
