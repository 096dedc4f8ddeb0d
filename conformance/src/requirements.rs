//! REQUIREMENTS.md, the contract: parsed from the copy embedded in the binary so
//! that the suite can refuse a case naming an unknown requirement and list the
//! must/should requirements that have no case yet.

use std::collections::BTreeMap;
use std::fmt;

/// REQUIREMENTS.md as it was when this binary was built.
pub const REQUIREMENTS_MD: &str = include_str!("../../REQUIREMENTS.md");

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Priority {
    Must,
    Should,
    Later,
    /// Won't do, with the reason.
    Wont(String),
}

impl Priority {
    /// The name used in reports: must, should, later or won't.
    pub fn name(&self) -> &'static str {
        match self {
            Priority::Must => "must",
            Priority::Should => "should",
            Priority::Later => "later",
            Priority::Wont(_) => "won't",
        }
    }

    fn parse(cell: &str) -> Result<Priority, String> {
        let lower = cell.trim();
        match lower {
            "must" => return Ok(Priority::Must),
            "should" => return Ok(Priority::Should),
            "later" => return Ok(Priority::Later),
            _ => {}
        }
        for prefix in ["won't:", "wont:", "won’t:"] {
            if let Some(reason) = lower.strip_prefix(prefix) {
                let reason = reason.trim();
                if reason.is_empty() {
                    return Err("won't needs a reason: `won't: REASON`".into());
                }
                return Ok(Priority::Wont(reason.to_string()));
            }
        }
        Err(format!(
            "unknown priority {cell:?} (must, should, later, or `won't: REASON`)"
        ))
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Priority::Wont(r) => write!(f, "won't: {r}"),
            p => f.write_str(p.name()),
        }
    }
}

/// One row of a requirement table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub id: String,
    pub state: String,
    pub priority: Priority,
    /// The trials that prove it, `ID::case`.
    pub tests: Vec<String>,
    pub status: String,
    /// 1-based line in REQUIREMENTS.md, for error messages.
    pub line: usize,
}

/// The columns a requirement table has, in this order.
pub const COLUMNS: [&str; 5] = ["ID", "state", "priority", "tests", "status"];

fn cells(line: &str) -> Option<Vec<String>> {
    let t = line.trim();
    let inner = t.strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_string()).collect())
}

fn is_separator(cells: &[String]) -> bool {
    cells
        .iter()
        .all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':' | ' ')))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.contains('-')
        && id
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// Parses every table of REQUIREMENTS.md whose header row is [`COLUMNS`];
/// other tables (a results matrix, say) are left alone.
pub fn parse(text: &str) -> Result<BTreeMap<String, Requirement>, String> {
    let mut out = BTreeMap::new();
    let mut in_table = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some(row) = cells(line) else {
            in_table = false;
            continue;
        };
        if row.first().map(String::as_str) == Some("ID") {
            if row != COLUMNS {
                return Err(format!(
                    "line {n}: a requirement table has the columns {COLUMNS:?}, found {row:?}"
                ));
            }
            in_table = true;
            continue;
        }
        if !in_table || is_separator(&row) {
            continue;
        }
        if row.len() != COLUMNS.len() {
            return Err(format!(
                "line {n}: {} cells, expected {}",
                row.len(),
                COLUMNS.len()
            ));
        }
        let id = row[0].trim_matches('`').to_string();
        if !valid_id(&id) {
            return Err(format!(
                "line {n}: bad requirement ID {id:?} (AREA-NAME, upper case)"
            ));
        }
        let priority = Priority::parse(&row[2]).map_err(|e| format!("line {n}: {id}: {e}"))?;
        let tests: Vec<String> = row[3]
            .split(',')
            .map(|t| t.trim().trim_matches('`').to_string())
            .filter(|t| !t.is_empty() && t != "—" && t != "-")
            .collect();
        for t in &tests {
            if t.split_once("::").map(|(r, _)| r) != Some(id.as_str()) {
                return Err(format!(
                    "line {n}: test {t:?} of {id} must be named `{id}::case`"
                ));
            }
        }
        let req = Requirement {
            id: id.clone(),
            state: row[1].clone(),
            priority,
            tests,
            status: row[4].clone(),
            line: n,
        };
        if let Some(prev) = out.insert(id.clone(), req) {
            return Err(format!(
                "line {n}: {id} is already defined on line {}",
                prev.line
            ));
        }
    }
    if out.is_empty() {
        return Err(
            "no requirement table found (header: | ID | state | priority | tests | status |)"
                .into(),
        );
    }
    Ok(out)
}

/// Rewrites the status column of every requirement row (and the `Status
/// below:` line) from a run: `status_of(ID)` gives the new cell. Everything
/// else in the file stays byte for byte.
pub fn with_status(
    text: &str,
    note: &str,
    status_of: impl Fn(&str) -> String,
) -> Result<String, String> {
    parse(text)?;
    let mut out = String::with_capacity(text.len());
    let mut in_table = false;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let row = cells(body);
        let replaced = match &row {
            None => {
                in_table = false;
                if body.starts_with("Status below:") {
                    Some(format!("Status below: {note}"))
                } else {
                    None
                }
            }
            Some(r) if r.first().map(String::as_str) == Some("ID") => {
                in_table = true;
                None
            }
            Some(r) if in_table && !is_separator(r) && r.len() == COLUMNS.len() => {
                let id = r[0].trim_matches('`');
                let mut r = r.clone();
                r[4] = status_of(id);
                Some(format!("| {} |", r.join(" | ")))
            }
            Some(_) => None,
        };
        match replaced {
            Some(new) => {
                out.push_str(&new);
                if line.ends_with('\n') {
                    out.push('\n');
                }
            }
            None => out.push_str(line),
        }
    }
    Ok(out)
}

/// The embedded REQUIREMENTS.md, parsed. Panics only if the build embedded a
/// broken file, which the unit tests catch first.
pub fn embedded() -> BTreeMap<String, Requirement> {
    parse(REQUIREMENTS_MD).unwrap_or_else(|e| panic!("REQUIREMENTS.md: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const SAMPLE: &str = "\
# Title

| ID | state | priority | tests | status |
|---|---|---|---|---|
| PIPE-CONTENTS | pipes with unread data | must | `PIPE-CONTENTS::3k-unread`, `PIPE-CONTENTS::fifo` | pass |
| FILE-LOCK | locks | later | — | no test |

Some text.

| kernel | result |
|---|---|
| 6.1 | x |

| ID | state | priority | tests | status |
|:--|---|---|---|---|
| MPI-MULTINODE | several hosts | won't: needs a cluster | | — |
";

    #[test]
    fn parses_all_requirement_tables_and_skips_others() {
        let reqs = parse(SAMPLE).unwrap();
        assert_eq!(reqs.len(), 3);
        let p = &reqs["PIPE-CONTENTS"];
        assert_eq!(p.priority, Priority::Must);
        assert_eq!(
            p.tests,
            vec!["PIPE-CONTENTS::3k-unread", "PIPE-CONTENTS::fifo"]
        );
        assert_eq!(p.line, 5);
        assert!(reqs["FILE-LOCK"].tests.is_empty());
        assert_eq!(
            reqs["MPI-MULTINODE"].priority,
            Priority::Wont("needs a cluster".into())
        );
    }

    #[rstest]
    #[case("| ID | state | priority | tests | status |\n|---|---|---|---|---|\n| X-Y | s | maybe | | |\n", "unknown priority")]
    #[case("| ID | state | priority | tests | status |\n|---|---|---|---|---|\n| X-Y | s | won't: | | |\n", "needs a reason")]
    #[case("| ID | state | priority | tests | status |\n|---|---|---|---|---|\n| x-y | s | must | | |\n", "bad requirement ID")]
    #[case("| ID | state | priority | tests | status |\n|---|---|---|---|---|\n| X-Y | s | must | | |\n| X-Y | t | must | | |\n", "already defined on line 3")]
    #[case("| ID | state | priority | tests | status |\n|---|---|---|---|---|\n| X-Y | s | must | `X-Z::a` | |\n", "must be named `X-Y::case`")]
    #[case(
        "| ID | state | priority | tests | status |\n|---|---|---|---|---|\n| X-Y | s | must | |\n",
        "4 cells, expected 5"
    )]
    #[case("| ID | state | prio |\n|---|---|---|\n", "has the columns")]
    #[case("no tables here\n", "no requirement table")]
    fn rejects_malformed_tables(#[case] text: &str, #[case] error: &str) {
        let e = parse(text).unwrap_err();
        assert!(e.contains(error), "{e:?} should contain {error:?}");
    }

    #[test]
    fn status_column_is_rewritten_and_nothing_else() {
        let text = format!("Status below: not run yet.\n\n{SAMPLE}");
        let out = with_status(&text, "run X.", |id| format!("st-{id}")).unwrap();
        assert!(out.starts_with("Status below: run X.\n"));
        assert!(out.contains("| PIPE-CONTENTS | pipes with unread data | must | `PIPE-CONTENTS::3k-unread`, `PIPE-CONTENTS::fifo` | st-PIPE-CONTENTS |\n"));
        assert!(
            out.contains("| 6.1 | x |\n"),
            "other tables stay as they were"
        );
        assert_eq!(out.lines().count(), text.lines().count());
        assert_eq!(parse(&out).unwrap()["FILE-LOCK"].status, "st-FILE-LOCK");
    }

    #[test]
    fn the_embedded_file_parses() {
        let reqs = embedded();
        assert!(reqs.contains_key("PIPE-CONTENTS"));
        assert!(
            reqs.values().all(|r| !r.state.is_empty()),
            "every requirement says what state it covers"
        );
    }
}
