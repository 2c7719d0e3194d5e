//! The migration benchmark's CI gate: a real sweep cell (Popek, real KVM) that fails the
//! gate when the limit is below anything possible, and passes a generous one; the JUnit
//! report says the same, and the table of the downtime's parts adds up.

use std::process::Command;

fn sweep(limit_ms: &str, junit: &std::path::Path) -> (i32, String) {
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is missing: this test drives real KVM");
    let popek = popek_tools::default_popek();
    assert!(popek.is_file(), "{} missing: build the workspace in release mode first", popek.display());
    let out = Command::new(env!("CARGO_BIN_EXE_migration-bench"))
        .args(["--runs", "1", "--memory", "256M", "--workloads", "idle", "--modes", "precopy", "--quiet"])
        .args(["--max-downtime-ms", limit_ms, "--junit"])
        .arg(junit)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_downtime_gate_fails_when_it_should_and_passes_otherwise() {
    let dir = std::env::temp_dir().join(format!("popek-gate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junit = dir.join("junit.xml");

    let (status, out) = sweep("0.000001", &junit);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("gate: FAILED popek precopy 256M idle loopback: median downtime"), "{out}");
    assert!(out.contains("| popek | precopy | 256M | idle | loopback | 1 |"), "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("failures=\"1\"") && xml.contains("<failure message=\"median downtime"), "{xml}");

    let (status, out) = sweep("1000", &junit);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("gate: passed"), "{out}");
    // Where the downtime went: the parts of the one run add up to its downtime.
    let row = out
        .lines()
        .skip_while(|l| !l.starts_with("Where Popek's downtime goes"))
        .find(|l| l.starts_with("| popek | precopy | 256M | idle | loopback |"))
        .expect("a row of the downtime's parts");
    let parts: Vec<f64> = row.split('|').skip(6).filter_map(|c| c.trim().parse().ok()).collect();
    assert_eq!(parts.len(), 6, "{row}");
    let (downtime, sum) = (parts[0], parts[1..5].iter().sum::<f64>());
    assert!(parts.iter().all(|&v| v >= 0.0) && parts[5] > 0.0, "{row}");
    assert!((sum - downtime).abs() <= downtime * 0.02 + 0.01, "the parts add up to {sum} ms: {row}");
    let json = out.lines().find_map(|l| l.strip_prefix("BENCH_JSON ")).expect("the JSON summary");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    let pause = &json["cells"][0]["downtime_breakdown_ms"]["pause"]["median"];
    assert!(pause.as_f64().is_some_and(|p| p > 0.0 && p <= downtime), "{json}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("failures=\"0\"") && !xml.contains("<failure"), "{xml}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_sweep_runs_the_same_cell_under_qemu_side_by_side() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is missing: this test drives real KVM");
    let out = Command::new(env!("CARGO_BIN_EXE_migration-bench"))
        .args(["--runs", "1", "--memory", "256M", "--workloads", "idle", "--modes", "postcopy", "--quiet"])
        .args(["--compare", "qemu", "--pin"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Both VMMs' sources and destinations ran under taskset, on the two halves.
    assert!(stdout.contains("--pin: sources on CPUs 0"), "{stdout}");
    assert!(stdout.contains("| qemu | postcopy | 256M | idle | loopback | 1 |"), "{stdout}");
    assert!(stdout.contains("Popek against QEMU"), "{stdout}");
    let row = stdout.lines().find(|l| l.starts_with("| postcopy | 256M | idle | loopback |")).expect("a ratio row");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let ratio: f64 = cells[7].parse().unwrap();
    assert!(ratio > 0.0 && ratio.is_finite(), "{row}");
    // By events (pause here -> resume there, as QEMU measures its own), Popek's downtime
    // leaves out Running's way back: shorter than end to end, and still there.
    let (end_to_end, by_events): (f64, f64) = (cells[5].parse().unwrap(), cells[8].parse().unwrap());
    assert!(by_events > 0.0 && by_events < end_to_end, "{row}");
    // The target column follows from the ratios (at most half the downtime, total no
    // worse), and the JSON summary says the same.
    let total_ratio: f64 = cells[12].parse().unwrap();
    let met = ratio <= 0.5 && total_ratio <= 1.0;
    assert_eq!(cells[13] == "met", met, "{row}");
    assert!(stdout.contains(&format!("met in {} of 1 cells end to end", u8::from(met))), "{stdout}");
    let json = stdout.lines().find_map(|l| l.strip_prefix("BENCH_JSON ")).expect("the JSON summary");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    let versus = &json["comparison"][0];
    assert_eq!(versus["mode"], "postcopy", "{json}");
    assert_eq!(versus["meets_target"].as_bool(), Some(met), "{json}");
    let json_ratio = versus["downtime_ratio"].as_f64().unwrap();
    assert!((json_ratio - ratio).abs() < 0.006, "{json_ratio} vs {row}");
}

#[test]
fn a_stop_and_copy_of_all_memory_is_set_against_loopback_probes_before_and_after() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is missing: this test drives real KVM");
    let out = Command::new(env!("CARGO_BIN_EXE_migration-bench"))
        .args(["--runs", "1", "--memory", "256M", "--workloads", "write-all", "--modes", "stop-copy", "--quiet"])
        .arg("--loopback-probe")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for when in ["before", "after"] {
        assert!(stdout.contains(&format!("TCP loopback, one stream, {when} the sweep: ")), "{stdout}");
    }
    let row = stdout.lines().find(|l| l.starts_with("| popek | 256M | write all | loopback |")).expect("a share row");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // 240 MiB stamped above 16 MiB: that much at least moved (on the wire or taken out
    // of it by compression).
    let (moved, wire): (f64, f64) = (cells[5].parse().unwrap(), cells[6].parse().unwrap());
    assert!(moved > 240.0 && wire > 0.0 && wire <= moved, "{row}");
    let (slower, faster): (f64, f64) =
        (cells[9].trim_end_matches('%').parse().unwrap(), cells[10].trim_end_matches('%').parse().unwrap());
    assert!(slower >= faster && faster > 0.0, "{row}");
    let json = stdout.lines().find_map(|l| l.strip_prefix("BENCH_JSON ")).expect("the JSON summary");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(json["loopback_probes_gb_s"].as_array().map(Vec::len), Some(2), "{json}");
    // The guest stamped all of its memory before and after the move, and says how fast.
    let throughput = &json["cells"][0]["guest_throughput_pages_per_ms"];
    for when in ["before", "first_pass_after", "after"] {
        assert!(throughput[when]["median"].as_f64().is_some_and(|v| v > 0.0), "{when}: {json}");
    }
    assert!(stdout.contains("The guest's own throughput around the move"), "{stdout}");
}
