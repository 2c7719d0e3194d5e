//! The fault injection matrix, whole, through the real binaries on real KVM: every
//! mode x phase x fault cell injected its fault, no VM was lost, every memory check
//! passed, and the cells behaved as docs/migration.md says (a fault before the
//! destination's Running fails the migration and leaves the source running; a cut after
//! it in post-copy is recovered; a killed side then is the documented unrecoverable case).

use serde_json::Value;
use std::process::Command;

fn cells_where<'a>(cells: &'a [Value], f: impl Fn(&Value) -> bool + 'a) -> impl Iterator<Item = &'a Value> + 'a {
    cells.iter().filter(move |c| f(c))
}

#[test]
fn no_vm_is_lost_at_any_phase_of_any_mode() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is missing: this test drives real KVM");
    let popek = popek_tools::default_popek();
    assert!(popek.is_file(), "{} missing: build the workspace in release mode first", popek.display());
    let dir = std::env::temp_dir().join(format!("popek-fault-matrix-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("matrix.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fault-matrix")).arg("--json").arg(&json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    let line = stdout.lines().find_map(|l| l.strip_prefix("FAULT_JSON ")).expect("a FAULT_JSON line");
    let totals: Value = serde_json::from_str(line).unwrap();
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["totals"], totals, "the JSON file and the closing line agree");
    // 4 modes: 13 cells each for stop-copy and pre-copy, 23 each for post-copy and hybrid.
    assert_eq!(totals["cells"], 72, "{totals}");
    assert_eq!(totals["injected"], 72, "every cell's fault fired: {totals}");
    assert_eq!(totals["lost"], 0, "{stdout}");
    assert_eq!(totals["check_failures"], 0, "{stdout}");
    assert_eq!(totals["failed_cells"], 0, "{stdout}");
    assert!(stdout.contains("| postcopy | running | cut | PostcopyPages from src | ok | destination | yes | pass |"));

    let cells = report["cells"].as_array().unwrap();
    // A source killed "at running" as it sends the last pages the destination lacked (a
    // hybrid guest that dirtied little since its last round: the relay kills on that
    // frame, which still goes through) leaves the whole VM on the destination, which
    // keeps it: such a cell must have verified every page there.
    let kept_at_running: Vec<&Value> =
        cells_where(cells, |c| c["phase"] == "running" && c["fault"] == "kill-src" && c["survived"] == true).collect();
    for c in &kept_at_running {
        assert_eq!((&c["runs_on"], &c["memory_check"]), (&"destination".into(), &"pass".into()), "{c}");
    }
    // Kill-dst after Running, kill-src at state and running: 8, less the cells kept
    // above (9 or 10 when an answer was still on its way as the source was killed at
    // Complete).
    let documented = totals["unrecoverable_documented"].as_u64().unwrap();
    assert!((8 - kept_at_running.len() as u64..=10).contains(&documented), "{totals}");
    assert_eq!(totals["survived"].as_u64().unwrap() + documented, 72, "{totals}");

    let before_running = |c: &Value| !["running", "complete"].contains(&c["phase"].as_str().unwrap());
    // Cut, killed destination and refusal before Running: the migration fails (18) and
    // the source runs the VM, whose memory then moves intact.
    for c in cells_where(cells, |c| {
        before_running(c) && ["cut", "kill-dst", "refuse"].contains(&c["fault"].as_str().unwrap())
    }) {
        assert_eq!(c["migrate_status"], 18, "{c}");
        assert!(c["runs_on"] == "source" || c["runs_on"] == "both", "{c}");
        assert_eq!(c["memory_check"], "pass", "{c}");
        assert!(c["check_detail"].as_str().unwrap().contains("moved again"), "{c}");
    }
    // A stall completes the move: the guest verified its memory on the destination.
    for c in cells_where(cells, |c| c["fault"] == "delay") {
        assert_eq!(
            (&c["migrate_status"], &c["runs_on"], &c["memory_check"]),
            (&0.into(), &"destination".into(), &"pass".into()),
            "{c}"
        );
    }
    // After Running, a cut or a refusal is recovered over a new connection.
    for c in cells_where(cells, |c| !before_running(c) && (c["fault"] == "cut" || c["fault"] == "refuse")) {
        assert_eq!(c["migrate_status"], 0, "{c}");
        assert!(c["reconnects"].as_u64().unwrap() >= 1, "recovered: {c}");
        assert_eq!(c["memory_check"], "pass", "{c}");
    }
    // A source killed once every page was sent: the destination has the whole VM and
    // keeps it (unless an answer was still on its way, then it says so).
    let kept = cells_where(cells, |c| c["phase"] == "complete" && c["fault"] == "kill-src")
        .filter(|c| c["runs_on"] == "destination" && c["memory_check"] == "pass")
        .count();
    assert!(kept >= 1, "{stdout}");
    // The documented unrecoverable case: the survivor said so and exited 18.
    for c in cells_where(cells, |c| c["unrecoverable_documented"] == true) {
        let survivor = if c["fault"] == "kill-src" { "destination_status" } else { "source_status" };
        assert_eq!(c[survivor], 18, "{c}");
        assert!(c["notes"].to_string().contains("unrecoverable"), "{c}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
