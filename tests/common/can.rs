//! CAN test support: a small vehicle's normal traffic as a candump log, and its profile.

use std::path::Path;
use std::process::Command;

/// Normal traffic of four ECUs as candump -L lines on `iface`, `secs` long from `t0_us`:
/// 0x1a0 every 10 ms (constant byte, 4-bit counter, slowly varying speed), 0x2b0 every
/// 20 ms (counter in byte 7), 0x4d0 every 50 ms (a payload that looks random, as a MAC
/// does), 0x3c0 every 100 ms; each with up to ±0.3 ms of jitter.
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
    // A SecOC-style id: its payload (a MAC) looks random, so no profile can constrain it.
    for n in 0..secs * 20 {
        let ts = (t0_us + 9_000 + n * 50_000) as i64 + jitter(n + 17);
        let mac = (n ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        push(ts as u64, format!("4D0#{mac:016X}"));
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

/// `normal` with `extra` candump lines merged in by time.
pub fn merged(normal: &str, extra: &[String]) -> String {
    let ts = |l: &str| -> f64 {
        l.trim_start_matches('(')
            .split(')')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0.0)
    };
    let mut lines: Vec<&str> = normal.lines().collect();
    lines.extend(extra.iter().map(String::as_str));
    lines.sort_by(|a, b| ts(a).total_cmp(&ts(b)));
    lines.join("\n") + "\n"
}

/// `log` with the data of every `id` frame (`"4D0"`) from `from_us` on replaced by `data`
/// (hex): a masquerade, the genuine ECU silenced and an attacker sending in its place at
/// its period.
pub fn masquerade(log: &str, id: &str, from_us: u64, data: &str) -> String {
    let mut out = String::new();
    for l in log.lines() {
        let ts = l
            .trim_start_matches('(')
            .split(')')
            .next()
            .and_then(|t| t.split_once('.'))
            .and_then(|(s, us)| Some(s.parse::<u64>().ok()? * 1_000_000 + us.parse::<u64>().ok()?))
            .unwrap_or(0);
        match l.split_once(&format!(" {id}#")) {
            Some((head, _)) if ts >= from_us => out.push_str(&format!("{head} {id}#{data}\n")),
            _ => {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}
