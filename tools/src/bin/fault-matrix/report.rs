//! The matrix's results: a Markdown table, the cells that failed, totals, and JSON.

use crate::cell::Row;

/// Counts over all cells; `FAULT_JSON` carries them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Totals {
    pub cells: usize,
    pub injected: usize,
    pub survived: usize,
    pub lost: usize,
    pub unrecoverable_documented: usize,
    pub check_failures: usize,
    /// Cells with any problem (lost, failed check, hang, nothing injected, survivor silent).
    pub failed_cells: usize,
    pub seconds: f64,
}

impl Totals {
    pub fn of(rows: &[Row], seconds: f64) -> Totals {
        let count = |f: &dyn Fn(&Row) -> bool| rows.iter().filter(|r| f(r)).count();
        Totals {
            cells: rows.len(),
            injected: count(&|r| r.injected.is_some()),
            survived: count(&|r| r.survived),
            lost: count(&|r| r.lost),
            unrecoverable_documented: count(&|r| r.unrecoverable_documented),
            check_failures: count(&|r| r.memory_check == "fail"),
            failed_cells: count(&|r| !r.problems.is_empty()),
            seconds,
        }
    }

    pub fn passed(&self) -> bool {
        self.failed_cells == 0 && self.lost == 0 && self.check_failures == 0
    }
}

/// How `popek migrate` ended, for the table.
pub fn migrate_result(row: &Row) -> String {
    match row.migrate_status {
        Some(0) => "ok".into(),
        Some(18) => "failed (18)".into(),
        Some(s) if s > 128 => format!("killed ({s})"),
        Some(s) => format!("status {s}"),
        None => "hung".into(),
    }
}

fn survived(row: &Row) -> &'static str {
    if row.survived {
        "yes"
    } else if row.unrecoverable_documented {
        "unrecoverable (documented)"
    } else {
        "**LOST**"
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| mode | phase | fault | fault hit | migrate | VM runs on | survived | memory check |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let runs_on = if r.runs_on == "both" { "both (Running lost)" } else { r.runs_on };
        let check = match r.memory_check {
            "fail" => "**FAIL**",
            other => other,
        };
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.mode,
            r.phase,
            r.fault,
            r.injected.as_deref().unwrap_or("**not injected**"),
            migrate_result(r),
            runs_on,
            survived(r),
            check
        );
    }
    t
}

/// The table, the failed cells with what went wrong, and the totals line.
pub fn markdown(rows: &[Row], totals: &Totals) -> String {
    let mut md = table(rows);
    for r in rows.iter().filter(|r| !r.problems.is_empty()) {
        md += &format!("\nFAILED {}: {}", r.cell().name(), r.problems.join("; "));
    }
    md += &format!(
        "\n{} cells, {} injected: {} VMs survived, {} lost, {} unrecoverable (documented), {} memory check failures ({:.0} s)\n",
        totals.cells,
        totals.injected,
        totals.survived,
        totals.lost,
        totals.unrecoverable_documented,
        totals.check_failures,
        totals.seconds
    );
    md
}

pub fn json(rows: &[Row], totals: &Totals) -> serde_json::Value {
    serde_json::json!({ "cells": rows, "totals": totals })
}

/// One line per cell for the progress output.
pub fn progress(index: usize, count: usize, row: &Row) -> String {
    let verdict = if row.problems.is_empty() { "ok" } else { "FAILED" };
    let mut line = format!(
        "fault-matrix: [{}/{count}] {}: {verdict}: fault at {}, migrate {}, VM runs on {}, survived {}, memory check {} ({:.1} s)",
        index + 1,
        row.cell().name(),
        row.injected.as_deref().unwrap_or("-"),
        migrate_result(row),
        row.runs_on,
        survived(row),
        row.memory_check,
        row.seconds
    );
    for p in &row.problems {
        line += &format!("\n    {p}");
    }
    line
}
