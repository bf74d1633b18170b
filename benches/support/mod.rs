//! What the benches share: parameters from the environment and facts about the machine
//! (CPU model, load, CPU time of processes), so that every bench prints them the same way.
//! Each bench uses part of it.
#![allow(dead_code)]

use std::str::FromStr;

/// `name` from the environment, parsed; `default` when unset. A value that does not parse
/// stops the bench (a typo must not silently measure something else).
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A command's standard output, trimmed (empty if it cannot run).
pub fn cmd_out(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// True when started by `cargo bench` (which passes `--bench`); `cargo test --benches` and
/// `--list` run the bench binary too, and it must then do nothing.
pub fn run_by_cargo_bench() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list")
}

/// Print a bench's title line with the date and time.
pub fn print_title(title: &str) {
    println!();
    println!(
        "{title} ({})",
        cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
}

/// "N CPUs, model; load avg a b c": what a bench states about the machine it ran on.
pub fn machine() -> String {
    format!(
        "{} CPUs, {}; load avg {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model(),
        loadavg()
    )
}

/// Clock ticks per second of `/proc` CPU times.
pub const TICKS_PER_S: f64 = 100.0;

/// utime + stime (clock ticks) of a process: a pid, or `"self"`.
pub fn proc_ticks(pid: impl std::fmt::Display) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let g = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    g(14) + g(15)
}

/// (busy, steal) ticks of the whole machine (busy excludes idle, iowait and steal).
pub fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(l) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (f(0) + f(1) + f(2) + f(5) + f(6), f(7))
}

/// The pid of the process whose command line contains `needle` (e.g. our own Mosquitto:
/// its config file lives in our temp dir).
pub fn pid_with_cmdline(needle: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) {
                return Some(pid);
            }
        }
    }
    None
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (benches with many connections hold both
/// ends of each in one process); returns the soft limit (before, after).
pub fn raise_nofile() -> (libc::rlim_t, libc::rlim_t) {
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        let before = r.rlim_cur;
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
        (before, r.rlim_cur)
    }
}
