//! How the admin commands print: `--output table` (aligned columns under a header on a
//! terminal, tab-separated rows with no header when piped, so `cut` and `awk` read them)
//! or `--output json` (one document). No colours: nothing to strip in a log.

use std::io::{IsTerminal, Write};

use serde::Serialize;

use crate::config::Output;

/// Prints `rows` under `header` as `--output table` says.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut out = std::io::stdout().lock();
    if !std::io::stdout().is_terminal() {
        for row in rows {
            let _ = writeln!(out, "{}", row.join("\t"));
        }
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> =
            cells.zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(&mut header.iter().copied()));
    for row in rows {
        let _ = writeln!(out, "{}", line(&mut row.iter().map(String::as_str)));
    }
}

/// Prints `value` as JSON (pretty on a terminal, one line otherwise).
pub fn json(value: &impl Serialize) {
    let text = match std::io::stdout().is_terminal() {
        true => serde_json::to_string_pretty(value),
        false => serde_json::to_string(value),
    };
    println!("{}", text.unwrap_or_default());
}

/// Prints `value` as JSON, or as `rows` under `header`, as `output` says.
pub fn either(output: Output, value: &impl Serialize, header: &[&str], rows: &[Vec<String>]) {
    match output {
        Output::Json => json(value),
        Output::Table => table(header, rows),
    }
}
