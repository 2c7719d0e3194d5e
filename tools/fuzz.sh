#!/usr/bin/env bash
# Fuzzes Popek's untrusted-input decoders on stable Rust (docs/security.md, "Fuzzing").
#
#   tools/fuzz.sh [--seconds N] [--targets a,b] [--build-only]
#
# Builds the cargo-fuzz crate tools/fuzz/ with libFuzzer's coverage instrumentation through
# stable rustc flags (no nightly, no cargo-fuzz, no sanitizer: safe Rust needs none to turn
# a memory error into a panic), then runs each target for N seconds (default 60) on a fresh
# copy of its committed seed corpus and regression inputs. Prints, per target, the
# executions and whether it crashed, then one line `FUZZ_JSON {...}`. Exits 1 if any target
# crashed; the input that did it is left in tools/fuzz/artifacts/TARGET/. Fix the bug, then
# copy the input to tools/fuzz/regressions/TARGET/ (tests/fuzz_corpus.rs replays it in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
targets="migration_stream,machine_state,control_request,kernel_image,hypercall"
build_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --targets) targets="$2"; shift 2 ;;
        --build-only) build_only=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "fuzz: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$seconds" in ''|*[!0-9]*) echo "fuzz: --seconds needs a whole number" >&2; exit 2 ;; esac

fuzz=tools/fuzz
host=$(rustc -vV | sed -n 's/^host: //p')
# cargo-fuzz's instrumentation, minus its nightly-only sanitizer flag. An explicit --target
# keeps these flags off build scripts and proc macros (they do not link libFuzzer).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
started=$(date +%s)
cargo build --release --quiet --manifest-path "$fuzz/Cargo.toml" --target "$host" --target-dir "$fuzz/target" \
    $(printf -- '--bin %s ' ${targets//,/ })
echo "fuzz: built in $(($(date +%s) - started)) s"
[ "$build_only" = 1 ] && exit 0

json=""
crashed=0
for target in ${targets//,/ }; do
    bin="$fuzz/target/$host/release/$target"
    work="$fuzz/work/$target"
    artifacts="$fuzz/artifacts/$target"
    rm -rf "$work"
    mkdir -p "$work" "$artifacts"
    # The run adds what it finds to its working copy only: the committed corpus stays small.
    for dir in "$fuzz/corpus/$target" "$fuzz/regressions/$target"; do
        if [ -d "$dir" ]; then cp "$dir"/* "$work"/ 2>/dev/null || true; fi
    done
    dict=()
    if [ -f "$fuzz/dict/$target.dict" ]; then dict=("-dict=$fuzz/dict/$target.dict"); fi
    log="$work.log"
    before=$(ls "$artifacts" | wc -l)
    status=0
    t0=$(date +%s)
    "$bin" "$work" "${dict[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - t0))
    after=$(ls "$artifacts" | wc -l)
    # (`|| true`: a log without a match is an answer, not a reason to stop.)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    # A crash ends the run before the final stats: the last status line has the count.
    if [ -z "$execs" ]; then execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true); fi
    execs=${execs:-0}
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | sed 's/cov: //' || true)
    corpus=$(ls "$work" | wc -l)
    crashes=$((after - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi
    if [ "$crashes" -gt 0 ]; then
        crashed=1
        echo "fuzz: $target CRASHED after $execs executions (log $log, input in $artifacts/):" >&2
        grep -m 20 -E 'panicked|ERROR|SUMMARY|deadly signal|Test unit written' "$log" >&2 || tail -20 "$log" >&2
    fi
    printf 'fuzz: %-18s %10s executions in %s s, coverage %s, corpus %s, crashes %s\n' \
        "$target" "$execs" "$elapsed" "${cov:-?}" "$corpus" "$crashes"
    json="$json${json:+,}{\"target\":\"$target\",\"seconds\":$elapsed,\"executions\":$execs,\"coverage\":${cov:-0},\"corpus\":$corpus,\"crashes\":$crashes}"
done
echo "FUZZ_JSON {\"targets\":[$json],\"crashed\":$([ "$crashed" = 1 ] && echo true || echo false)}"
exit "$crashed"
