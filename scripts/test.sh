#!/usr/bin/env bash
# The one test command: installs what the tests need when it is missing, then checks
# formatting, builds every target and runs the tests, then the cross builds under
# emulation (scripts/cross.sh) and every fuzz target (scripts/fuzz.sh).
#
#   scripts/test.sh
#
# Needs Rust (cargo, rustfmt) and, on first run, apt (Debian/Ubuntu) with root or sudo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# mosquitto lives in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

current="setup"
step() {
    current="$*"
    printf '\n==> %s\n' "$*"
}
trap 'printf "\nscripts/test.sh: FAILED during: %s\n" "$current" >&2' ERR

# --- 1. System packages: mosquitto broker and clients (interop tests), strace (tests/durability_strace.rs), systemd-analyze
#        (unit verification). Installed only when a binary is missing.
# QEMU, busybox, cpio, e2fsprogs and dmsetup: the VM tests (scripts/vm.sh, tests/power_cut.rs).
# chromium and chromedriver: the admin page in a real browser (tests/web_admin.rs).
needed=(mosquitto mosquitto_pub mosquitto_sub systemd-analyze strace qemu-system-x86_64 busybox
    cpio mkfs.ext4 e2fsck dmsetup log2long chromium chromedriver)
missing=()
for bin in "${needed[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
# PostgreSQL's server binaries (tests/inventory.rs starts a throw-away cluster with them).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(initdb)
if ((${#missing[@]})); then
    step "installing test dependencies (missing: ${missing[*]})"
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "scripts/test.sh: missing ${missing[*]} and not root (no sudo either)." >&2
        echo "Install them: apt-get install mosquitto mosquitto-clients systemd strace" \
            "qemu-system-x86 busybox-static cpio e2fsprogs dmsetup can-utils postgresql" \
            "chromium chromium-driver" >&2
        exit 1
    fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-upgrade mosquitto mosquitto-clients systemd \
        qemu-system-x86 busybox-static cpio e2fsprogs dmsetup strace can-utils postgresql \
        chromium chromium-driver
    # The packages may have started a system broker on 1883 and a system PostgreSQL: the
    # tests start their own instances, so stop them (and only them: their own units or init
    # scripts).
    if [[ -d /run/systemd/system ]]; then
        "${SUDO[@]}" systemctl stop mosquitto.service 2>/dev/null || true
        "${SUDO[@]}" systemctl stop postgresql.service 2>/dev/null || true
    else
        for svc in mosquitto postgresql; do
            if [[ -x /etc/init.d/$svc ]]; then
                "${SUDO[@]}" "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
            fi
        done
    fi
fi

# The CAN evaluation set's generator (scripts/can-eval/gen.py, tests/can_eval.rs): real DBCs
# from opendbc, encoded with cantools. Pinned; pip skips what is already installed.
if ! python3 -c 'import cantools, opendbc' 2>/dev/null; then
    step "installing the CAN evaluation generator's Python packages"
    python3 -m pip install --user --quiet cantools==45.1.0 opendbc==0.3.1
fi

# --- 2. Formatting.
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# --- 3. Build everything (lib, binary, tests, benchmarks), warnings included.
step "cargo build --all-targets"
cargo build --all-targets

# --- 4. Tests: unit tests, the binary's tests and tests/*.rs (which start the real
#        binary). Benchmarks are built above but not run: benches/broker.rs is a full load
#        run (`cargo bench`), not something to repeat in every test run.
step "cargo test --lib --bins --tests"
cargo test --lib --bins --tests

# The vendored routing core's own unit tests, with Outpost's patches (connection generations:
# vendor/rumqttd/OUTPOST.md, change 3).
step "cargo test -p rumqttd --lib"
cargo test -p rumqttd --lib

# --- 5. Cross builds for aarch64 and armv7, smoke-tested and unit-tested under qemu-user
#        (scripts/cross.sh installs the cross gcc, qemu-user-static and the rustup targets).
step "scripts/cross.sh (aarch64 + armv7 release builds, emulated smoke and unit tests)"
cross_start=$SECONDS
scripts/cross.sh
echo "test.sh: scripts/cross.sh took $((SECONDS - cross_start)) s"

# --- 6. Every fuzz target built and run briefly on its committed corpus (nightly +
#        cargo-fuzz, installed by scripts/fuzz.sh when missing).
step "scripts/fuzz.sh (build every fuzz target, run each ${FUZZ_SECONDS:-20} s)"
fuzz_start=$SECONDS
scripts/fuzz.sh
echo "test.sh: scripts/fuzz.sh took $((SECONDS - fuzz_start)) s"

printf '\nscripts/test.sh: ALL CHECKS PASSED (fmt, build --all-targets, tests, cross, fuzz)\n'
