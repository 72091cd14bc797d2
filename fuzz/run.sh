#!/usr/bin/env bash
# Runs snapguard's fuzz targets, each for a bounded time, and prints what each did.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      (default: 60 seconds, every target)
#   FUZZ_SECONDS=300 fuzz/run.sh
#
# Environment:
#   FUZZ_SECONDS              seconds per target when no SECONDS argument is given (60)
#   FUZZ_SANITIZER            cargo-fuzz sanitizer: none (default; works on stable Rust) or
#                             address (needs RUSTC_BOOTSTRAP=1, which this script then sets)
#   SNAPGUARD_FUZZ_SKIP_KNOWN 1 = skip inputs that only re-find the known findings listed in
#                             fuzz/README.md, to look for new ones (default: every finding fails)
#
# Works on the stable toolchain: cargo-fuzz's instrumentation flags are all stable `-C` flags,
# only its default AddressSanitizer needs `-Z`. Runs niced, stops by itself (libFuzzer's
# -max_total_time, with `timeout` as a backstop), exits 1 if any target found a crash.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

seconds="${FUZZ_SECONDS:-60}"
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    seconds="$1"
    shift
fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(police classify)
fi
sanitizer="${FUZZ_SANITIZER:-none}"
if [[ "$sanitizer" != none ]]; then
    export RUSTC_BOOTSTRAP=1
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    nice -n 19 cargo install cargo-fuzz --locked
fi

nice -n 19 cargo fuzz build --sanitizer "$sanitizer"

logs="$here/artifacts/logs"
mkdir -p "$logs"
failed=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    args=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
    if [[ -f "$target.dict" ]]; then
        args+=(-dict="$target.dict")
    fi
    log="$logs/$target.log"
    echo "== $target: fuzzing for ${seconds}s (log: $log)"
    set +e
    timeout --kill-after=30 "$((seconds + 120))" \
        nice -n 19 cargo fuzz run --sanitizer "$sanitizer" "$target" -- "${args[@]}" >"$log" 2>&1
    rc=$?
    set -e
    # (`|| true`: a crash while loading the corpus leaves no status line to find.)
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1 || true)"
    new="$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1 || true)"
    corpus="$( (grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" || true) | tail -1 | sed 's/corp: //')"
    if [[ -z "$execs" ]]; then
        # A crash ends the run before the final stats: take the last status line.
        execs="$( (grep -oE '^#[0-9]+' "$log" || true) | tail -1 | tr -d '#')"
        rate="$( (grep -oE 'exec/s: [0-9]+' "$log" || true) | tail -1 | sed 's/exec\/s: //')"
    fi
    if [[ $rc -eq 0 ]]; then
        result="no crash"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        result="TIMED OUT (killed by the backstop)"
        failed=1
    else
        artifact="$( (grep -oE 'Test unit written to [^ ]+' "$log" || true) | tail -1 | sed 's/Test unit written to //')"
        result="CRASH (exit $rc) ${artifact:-see log}"
        (grep -m1 -A1 'panicked at' "$log" || true) | sed 's/^/    /' 
        failed=1
    fi
    line="$target: ${execs:-?} executions, ${rate:-?} exec/s, corpus ${corpus:-?} (${new:-?} new), ${seconds}s: $result"
    echo "$line"
    summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
