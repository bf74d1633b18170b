#!/usr/bin/env bash
# Build every fuzz target and run each briefly on its committed corpus (called by
# scripts/test.sh; runs on its own too):
#
#   scripts/fuzz.sh                 # FUZZ_SECONDS per target [20]
#
# Installs what it needs when missing: the nightly toolchain (rustup, minimal profile) and
# cargo-fuzz. Each target starts from fuzz/corpus/<target>/ (committed, read-only here: new
# inputs go to a temporary directory) and runs for FUZZ_SECONDS, at most FUZZ_RUNS
# executions, in one process. A crash fails the script and leaves the input in
# fuzz/artifacts/<target>/. Long runs are by hand:
#
#   cd fuzz && mkdir -p /tmp/corpus && cargo +nightly fuzz run mqtt_stream /tmp/corpus corpus/mqtt_stream -- -max_total_time=3600
#
# (the first corpus directory receives the new inputs; without any, cargo fuzz adds them to
# the committed corpus/<target>/).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_RUNS=${FUZZ_RUNS:-2000000}

fail() {
    printf '\nscripts/fuzz.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal || fail "rustup toolchain install nightly"
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked || fail "cargo install cargo-fuzz"
fi

# Every [[bin]] of fuzz/Cargo.toml, each of which must have a corpus directory.
mapfile -t targets < <(cargo +nightly fuzz list)
((${#targets[@]})) || fail "cargo fuzz list found no targets"
for t in "${targets[@]}"; do
    [[ -d corpus/$t ]] && compgen -G "corpus/$t/*" >/dev/null ||
        fail "fuzz target $t has no committed corpus in fuzz/corpus/$t/"
done

echo "fuzz: building ${targets[*]}"
start=$SECONDS
# One build for all targets (the outpost library and its dependencies are compiled once).
cargo +nightly fuzz build
echo "fuzz: built in $((SECONDS - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    log="$scratch/$t.log"
    echo "fuzz: $t for ${FUZZ_SECONDS} s (at most $FUZZ_RUNS runs)"
    # New inputs go to the scratch directory (first), the committed corpus is only read.
    if ! cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -runs="$FUZZ_RUNS" \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        fail "fuzz target $t crashed or failed: the input is in fuzz/artifacts/$t/"
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [[ -n $execs && $execs -gt 0 ]] || {
        tail -n 30 "$log" >&2
        fail "fuzz target $t ran no inputs"
    }
    echo "fuzz: $t: $execs runs, no crash"
done
printf '\nscripts/fuzz.sh: PASSED (%s)\n' "${targets[*]}"
