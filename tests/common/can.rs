//! CAN test support: a small vehicle's normal traffic as a candump log, and its profile.

use std::path::Path;
use std::process::Command;

/// Normal traffic of three ECUs as candump -L lines on `iface`, `secs` long from `t0_us`:
/// 0x1a0 every 10 ms (constant byte, 4-bit counter, slowly varying speed), 0x2b0 every
/// 20 ms (counter in byte 7), 0x3c0 every 100 ms; each with up to ±0.3 ms of jitter.
pub fn normal_log(iface: &str, t0_us: u64, secs: u64) -> String {
    let mut lines = Vec::new();
    let mut push = |ts: u64, text: String| lines.push((ts, text));
    let jitter = |n: u64| (n.wrapping_mul(2_654_435_761) % 600) as i64 - 300;
    for n in 0..secs * 100 {
        let ts = (t0_us + n * 10_000) as i64 + jitter(n);
        let speed = 80 + ((n / 50) % 40) as u8;
        push(
            ts as u64,
            format!("1A0#A5{:02X}{speed:02X}0000000000", (n % 16) as u8),
        );
    }
    for n in 0..secs * 50 {
        let ts = (t0_us + 4_000 + n * 20_000) as i64 + jitter(n + 7);
        push(ts as u64, format!("2B0#1122334455667{:X}", (n % 16) as u8));
    }
    for n in 0..secs * 10 {
        let ts = (t0_us + 7_000 + n * 100_000) as i64 + jitter(n + 13);
        push(ts as u64, "3C0#0102030405".to_string());
    }
    lines.sort_by_key(|(ts, _)| *ts);
    let mut out = String::new();
    for (ts, text) in lines {
        out.push_str(&format!(
            "({}.{:06}) {iface} {text}\n",
            ts / 1_000_000,
            ts % 1_000_000
        ));
    }
    out
}

/// Learn a profile of [`normal_log`] (two minutes of it) into `out` with `outpost can learn`.
pub fn learn(out: &Path) {
    let train = out.with_extension("train.log");
    std::fs::write(&train, normal_log("can0", 1_000_000_000, 120)).unwrap();
    let learned = Command::new(super::BIN)
        .args(["can", "learn", "--log"])
        .arg(&train)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        learned.status.success(),
        "{}",
        String::from_utf8_lossy(&learned.stderr)
    );
}
