//! Result rows: printed as a markdown table and as one JSON object per line, and appended as
//! JSON to a file when one is given.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// One scenario run's result, printable as a markdown table row.
pub trait Row: Serialize {
    /// Column headers of the markdown table.
    fn columns(&self) -> Vec<&'static str>;
    /// Cells of this run, one per column.
    fn cells(&self) -> Vec<String>;
}

/// Formats the markdown header, separator and this row.
pub fn markdown(row: &impl Row) -> String {
    let columns = row.columns();
    let header = format!("| {} |", columns.join(" | "));
    let separator = format!("|{}", "---|".repeat(columns.len()));
    let cells = format!("| {} |", row.cells().join(" | "));
    format!("{header}\n{separator}\n{cells}")
}

/// Prints the row as markdown and JSON, and appends the JSON line to `json_path` when set.
///
/// # Errors
/// Fails when the row cannot be serialized or the file cannot be written.
pub fn emit(row: &impl Row, json_path: Option<&Path>) -> anyhow::Result<()> {
    let json = serde_json::to_string(row)?;
    println!("{}\n\n{json}", markdown(row));
    if let Some(path) = json_path {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        writeln!(file, "{json}").with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Formats a number with `decimals` digits after the point, or `-` when absent.
pub fn number(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Example {
        sockets: u64,
    }

    impl Row for Example {
        fn columns(&self) -> Vec<&'static str> {
            vec!["sockets", "note"]
        }
        fn cells(&self) -> Vec<String> {
            vec![self.sockets.to_string(), number(None, 1)]
        }
    }

    #[test]
    fn markdown_has_header_separator_and_row() {
        let table = markdown(&Example { sockets: 5 });
        assert_eq!(table, "| sockets | note |\n|---|---|\n| 5 | - |");
    }
}
