#!/usr/bin/env bash
# Cross builds, proven under emulation (called by scripts/test.sh; runs on its own too):
#
#   scripts/cross.sh
#
# Installs what it needs when missing (the rustup targets, Debian's cross gcc and C
# libraries, qemu-user-static; apt with sudo when not root), builds `outpost` for
# aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf once, then for each target:
#
#   - a smoke test of the binary under qemu-user: `outpost run` on loopback ports in a
#     temporary data dir; two devices issued with `outpost ca issue-device`; stock mosquitto
#     clients over mTLS publish (a local subscriber gets it) and receive (a device subscriber
#     gets what a local client sends); the ACL refuses a foreign topic; `outpost ca revoke`
#     cuts a live session off and its certificate is refused afterwards; SIGTERM exits 0.
#     The gateway's idle RSS under emulation is printed (qemu's, not a speed figure).
#   - the library's unit tests under qemu-user (CARGO_TARGET_<TARGET>_RUNNER), built with
#     the release profile so that the dependencies compiled for the binaries are reused
#     (a dev-profile build would compile all of them again, per target). aarch64 runs all
#     of them, armv7 the ones about bytes, sizes and offsets (`ARMV7_UNIT_TESTS`), to keep
#     the emulated time of a CI run small.
#
# The binaries are the real release profile (fat LTO, one codegen unit): what is shipped
# is what is smoke-tested, and their stripped sizes are printed (docs/benchmarks.md).
#
# A target that cannot be installed or built fails the script, loudly: nothing is skipped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
# armv7's emulated unit tests (name filters, as `cargo test` takes them): the codecs and
# the byte/offset arithmetic, where a 32-bit usize and alignment differences show.
ARMV7_UNIT_TESTS=(frontdoor:: uplink::queue:: fdo_wire::cbor fdo_wire::types fdo_wire::voucher fdo_wire::cose
    fdo_wire::credential fdo_wire::msg duration:: config:: sessions::)

current="setup"
step() {
    current="$*"
    printf '\n==> cross: %s\n' "$*"
}
fail() {
    printf '\nscripts/cross.sh: FAILED: %s\n' "$*" >&2
    exit 1
}
trap 'printf "\nscripts/cross.sh: FAILED during: %s\n" "$current" >&2' ERR

# Per target: rustup name -> gcc triple, qemu binary, sysroot.
gcc_of() { case $1 in aarch64-*) echo aarch64-linux-gnu ;; armv7-*) echo arm-linux-gnueabihf ;; esac; }
qemu_of() { case $1 in aarch64-*) echo qemu-aarch64-static ;; armv7-*) echo qemu-arm-static ;; esac; }
sysroot_of() { echo "/usr/$(gcc_of "$1")"; }

# --- 1. Toolchains: Debian cross gcc + C library, qemu-user-static, rustup targets.
missing=()
for t in "${TARGETS[@]}"; do
    command -v "$(gcc_of "$t")-gcc" >/dev/null 2>&1 || missing+=("$(gcc_of "$t")-gcc")
    command -v "$(qemu_of "$t")" >/dev/null 2>&1 || missing+=("$(qemu_of "$t")")
    [[ -e "$(sysroot_of "$t")/lib/libc.so.6" ]] || missing+=("$(sysroot_of "$t")/lib/libc.so.6")
done
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
    step "installing cross toolchains (missing: ${missing[*]})"
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        fail "missing ${missing[*]} and not root (no sudo either). Install them:" \
            "apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf" \
            "libc6-dev-arm64-cross libc6-dev-armhf-cross qemu-user-static"
    fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-upgrade \
        gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross \
        libc6-dev-armhf-cross qemu-user-static curl
    for t in "${TARGETS[@]}"; do
        command -v "$(gcc_of "$t")-gcc" >/dev/null 2>&1 || fail "$(gcc_of "$t")-gcc still missing after apt-get: target $t cannot be built"
        command -v "$(qemu_of "$t")" >/dev/null 2>&1 || fail "$(qemu_of "$t") still missing after apt-get: target $t cannot be tested"
        [[ -e "$(sysroot_of "$t")/lib/libc.so.6" ]] || fail "$(sysroot_of "$t") has no C library after apt-get: target $t cannot be linked or run"
    done
fi
installed=$(rustup target list --installed) || fail "rustup is needed to add the cross targets"
for t in "${TARGETS[@]}"; do
    if ! grep -qx "$t" <<<"$installed"; then
        step "rustup target add $t"
        rustup target add "$t" || fail "rustup target add $t failed: target $t cannot be built"
    fi
done
for bin in mosquitto_pub mosquitto_sub curl; do
    command -v "$bin" >/dev/null 2>&1 || fail "$bin is needed for the smoke test (scripts/test.sh installs mosquitto-clients; curl: apt-get install curl)"
done

# Linker, C compiler (ring's assembly, psm) and runner of each target.
for t in "${TARGETS[@]}"; do
    up=$(tr 'a-z-' 'A-Z_' <<<"$t")
    under=${t//-/_}
    g=$(gcc_of "$t")
    export "CARGO_TARGET_${up}_LINKER=$g-gcc"
    export "CARGO_TARGET_${up}_RUNNER=$(qemu_of "$t") -L $(sysroot_of "$t")"
    export "CC_${under}=$g-gcc" "AR_${under}=$g-ar"
done

# --- 2. Build both binaries, once.
work_strip=$(mktemp)
step "cargo build --release --bin outpost (${TARGETS[*]})"
target_args=()
for t in "${TARGETS[@]}"; do target_args+=(--target "$t"); done
start=$SECONDS
cargo build --locked --release "${target_args[@]}" --bin outpost
echo "cross: built both release binaries in $((SECONDS - start)) s"
for t in "${TARGETS[@]}"; do
    f="target/$t/release/outpost"
    [[ -x $f ]] || fail "no binary at $f"
    # The release profile strips symbols already; the stripped copy checks it.
    "$(gcc_of "$t")-strip" -o "$work_strip" "$f" || fail "$(gcc_of "$t")-strip $f"
    echo "cross: $t release binary $(stat -c %s "$f") bytes ($(stat -c %s "$work_strip") stripped)"
done
rm -f "$work_strip"

# --- 3. Smoke test of each binary under qemu-user.
work=$(mktemp -d)
bg_pids=()
cleanup() {
    for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# wait_for SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
    local limit=$1
    shift
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# json_addr FILE KEY: "127.0.0.1:PORT" from endpoints.json.
json_addr() { sed -n "s/.*\"$2\": *\"\\([^\"]*\\)\".*/\\1/p" "$1"; }

smoke() {
    local t=$1
    local run=("$(qemu_of "$t")" -L "$(sysroot_of "$t")" "$PWD/target/$t/release/outpost")
    local dir="$work/$t"
    local data="$dir/data"
    mkdir -p "$dir"
    cat >"$dir/outpost.toml" <<EOF
[gateway]
id = "gw-cross"
data_dir = "$data"

[listeners]
mqtts = "127.0.0.1:0"
plain = "127.0.0.1:0"

[metrics]
listen = "127.0.0.1:0"

[mdns]
enabled = false

[fdo]
listen = "127.0.0.1:0"
EOF
    local cli=("${run[@]}")
    step "$t: outpost run under $(qemu_of "$t")"
    "${run[@]}" run --config "$dir/outpost.toml" 2>"$dir/gateway.log" &
    local gw=$!
    bg_pids+=("$gw")
    local ep="$data/endpoints.json"
    endpoints_ready() {
        kill -0 "$gw" 2>/dev/null || return 0 # exited: stop waiting, reported below
        [[ -s $ep ]] && grep -q "\"pid\": *$gw\b" "$ep"
    }
    if ! wait_for 120 endpoints_ready || ! kill -0 "$gw" 2>/dev/null; then
        cat "$dir/gateway.log" >&2
        fail "$t: the gateway exited or did not come up within 120 s (its log is above)"
    fi
    local mqtts plain metrics
    mqtts=$(json_addr "$ep" mqtts)
    plain=$(json_addr "$ep" plain)
    metrics=$(json_addr "$ep" metrics)
    echo "cross: $t gateway up: mqtts $mqtts, plain $plain, metrics $metrics"
    sleep 2
    local rss
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$gw/status")
    echo "cross: $t idle RSS under emulation: $((rss / 1024)) MiB ($rss kB; qemu-user's, translated code included)"
    echo "$t $rss" >>"$work/rss"

    step "$t: devices over mTLS"
    for id in sensor-1 sensor-2; do
        "${cli[@]}" ca issue-device --id "$id" --out "$dir/devices" --config "$dir/outpost.toml" ||
            fail "$t: ca issue-device --id $id"
    done
    local host=${mqtts%:*} port=${mqtts##*:}
    tls() {
        echo --cafile "$dir/devices/ca.crt" --cert "$dir/devices/$1.crt" --key "$dir/devices/$1.key" \
            -h "$host" -p "$port" -V mqttv311
    }
    # Device -> local subscriber. The subscriber may not be subscribed yet when the first
    # publish arrives, so the device publishes until the subscriber has its message.
    mosquitto_sub -h "${plain%:*}" -p "${plain##*:}" -t 'devices/#' -v -C 1 -W 90 >"$dir/up.txt" &
    local sub=$!
    bg_pids+=("$sub")
    local n=0
    while kill -0 "$sub" 2>/dev/null && ((n < 60)); do
        # shellcheck disable=SC2046
        mosquitto_pub $(tls sensor-1) -t devices/sensor-1/temperature -m 21.5 -q 1 ||
            fail "$t: mosquitto_pub over mTLS as sensor-1 failed"
        n=$((n + 1))
        sleep 1
    done
    wait "$sub" || fail "$t: the local subscriber got nothing from sensor-1"
    grep -qx 'devices/sensor-1/temperature 21.5' "$dir/up.txt" ||
        fail "$t: the subscriber got $(cat "$dir/up.txt"), not sensor-1's publish"
    echo "cross: $t device publish reached the subscriber: $(cat "$dir/up.txt")"

    # Local -> device subscriber over mTLS; this session is the one revoked below.
    # shellcheck disable=SC2046
    mosquitto_sub $(tls sensor-2) -t 'devices/sensor-2/#' -v -q 1 >"$dir/down.txt" 2>"$dir/down.err" &
    local dsub=$!
    bg_pids+=("$dsub")
    got_cmd() { mosquitto_pub -h "${plain%:*}" -p "${plain##*:}" -t devices/sensor-2/cmd -m reboot -q 1 &&
        grep -qx 'devices/sensor-2/cmd reboot' "$dir/down.txt"; }
    wait_for 90 got_cmd || fail "$t: device subscriber sensor-2 got nothing over mTLS"
    echo "cross: $t device sensor-2 received over mTLS: $(head -1 "$dir/down.txt")"

    # The ACL: sensor-1 may not subscribe to another device's topics (SUBACK 0x80).
    local denied
    # shellcheck disable=SC2046
    denied=$(mosquitto_sub $(tls sensor-1) -t 'devices/sensor-2/#' -C 1 -W 10 2>&1) && true
    grep -qi 'denied' <<<"$denied" || fail "$t: sensor-1 subscribing to devices/sensor-2/# was not denied: $denied"
    echo "cross: $t ACL refused sensor-1's subscription to devices/sensor-2/#"

    step "$t: revoke sensor-2 while connected"
    "${cli[@]}" ca revoke --id sensor-2 --config "$dir/outpost.toml" || fail "$t: ca revoke --id sensor-2"
    revoked() {
        curl -sf "http://$metrics/metrics" | grep -q '^outpost_forced_disconnects_total{reason="revoked"} 1$'
    }
    wait_for 30 revoked || fail "$t: sensor-2's live session was not cut off after ca revoke"
    kill "$dsub" 2>/dev/null || true
    wait "$dsub" 2>/dev/null || true
    # shellcheck disable=SC2046
    if mosquitto_pub $(tls sensor-2) -t devices/sensor-2/x -m after -q 1 2>"$dir/refused.err"; then
        fail "$t: the revoked certificate still connects"
    fi
    # ... and it was the gateway that refused it, in the TLS handshake.
    handshake_refused() {
        curl -sf "http://$metrics/metrics" | grep -Eq '^outpost_tls_handshake_failures_total [1-9]'
    }
    wait_for 10 handshake_refused || fail "$t: the revoked certificate's connection failed, but not in the TLS handshake"
    echo "cross: $t revoked session cut off; a new connection is refused ($(head -1 "$dir/refused.err"))"

    step "$t: SIGTERM"
    kill -TERM "$gw"
    local rc=0
    wait "$gw" || rc=$?
    if ((rc != 0)); then
        cat "$dir/gateway.log" >&2
        fail "$t: outpost exited with $rc on SIGTERM (expected 0)"
    fi
    grep -q 'stopped' "$dir/gateway.log" || fail "$t: no 'stopped' line in the gateway log"
    echo "cross: $t SIGTERM: exit status 0"
}

for t in "${TARGETS[@]}"; do
    smoke "$t"
done

# --- 4. Unit tests under emulation (the runner set above runs each test binary in qemu).
for t in "${TARGETS[@]}"; do
    filters=()
    [[ $t == armv7-* ]] && filters=("${ARMV7_UNIT_TESTS[@]}")
    step "$t: unit tests under $(qemu_of "$t") (${filters[*]:-all})"
    start=$SECONDS
    cargo test --locked --release --target "$t" --lib -- "${filters[@]}"
    echo "cross: $t unit tests built and run in $((SECONDS - start)) s"
done

printf '\nscripts/cross.sh: PASSED (%s: built, smoke-tested and unit-tested under qemu-user)\n' "${TARGETS[*]}"
