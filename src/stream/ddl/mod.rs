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
    /// Tables of the stream it gave a new name: (old, new), quoted.
    pub renamed: Vec<(String, String)>,
    /// Of those, the ones whose new name the selection leaves out.
    pub renamed_out: Vec<(String, String)>,
    /// The source session's settings that values computed by the command depend on (TimeZone, …).
    pub settings: Vec<(String, String)>,
    /// Columns of the tables it touched whose rows read a value computed once (a missing value), in ISO
    /// form: (table, column, value as a one-element array).
    pub missing: Vec<Missing>,
}

/// A column's missing value on the source: what rows written before the column was added read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    pub table: String,
    pub column: String,
    /// A one-element array in text form (`{"2026-12-01 10:00:00+00"}`).
    pub value: String,
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
            renamed: pairs(text_array(get("renamed").unwrap_or("{}"))),
            renamed_out: pairs(text_array(get("renamed_out").unwrap_or("{}"))),
            settings: pairs(text_array(get("settings").unwrap_or("{}"))),
            missing: text_array(get("missing").unwrap_or("{}"))
                .chunks_exact(3)
                .map(|m| Missing {
                    table: m[0].clone(),
                    column: m[1].clone(),
                    value: m[2].clone(),
                })
                .collect(),
        })
    }
}

/// A flat array of pairs (`{a,b,c,d}`) as pairs.
fn pairs(flat: Vec<String>) -> Vec<(String, String)> {
    flat.chunks_exact(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect()
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

    #[test]
    fn renames_settings_and_missing_values_read_back_from_a_capture_row() {
        let columns: Vec<String> = [
            "id",
            "at",
            "tag",
            "statement",
            "statement_at",
            "pid",
            "search_path",
            "role_name",
            "renamed",
            "settings",
            "missing",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let values: Vec<Option<String>> = [
            "7",
            "2026-12-01",
            "ALTER TABLE",
            "ALTER TABLE app.t RENAME TO u",
            "2026-12-01",
            "42",
            "public",
            "postgres",
            "{app.t,app.u}",
            r#"{TimeZone,Asia/Tokyo,DateStyle,"ISO, MDY"}"#,
            r#"{app.u,stamp,"{\"2026-12-01 10:00:00+00\"}"}"#,
        ]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
        let c = Captured::from_row(&columns, &values).unwrap();
        assert_eq!(c.renamed, vec![("app.t".into(), "app.u".into())]);
        assert!(c.renamed_out.is_empty());
        assert_eq!(
            c.settings,
            vec![
                ("TimeZone".into(), "Asia/Tokyo".into()),
                ("DateStyle".into(), "ISO, MDY".into())
            ]
        );
        assert_eq!(
            c.missing,
            vec![Missing {
                table: "app.u".into(),
                column: "stamp".into(),
                value: r#"{"2026-12-01 10:00:00+00"}"#.into()
            }]
        );
    }
}
