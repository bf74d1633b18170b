//! `cargo bench --bench can`: issue 12, acceptance point 6, side by side in one run, on the
//! evaluation set of `tests/can_eval.rs` (scripts/can-eval/gen.py: real DBCs of three makes,
//! a 60 s attack-free capture to learn from, a 44 s trace with every attack kind):
//!
//! * **Throughput**, frames/s per core (CPU time of the grading thread): the detector with a
//!   DBC-learned profile, without one, and the plain baseline (`src/can/baseline.rs`), each
//!   grading the same in-memory trace `BENCH_CAN_REPS` times (a fresh detector each time).
//! * **Latency** of one `grade()` call (monotonic clock around each call, its own ~20 ns
//!   included): p50, p99, p99.9, max over every frame of the trace, for each of the three.
//!   This is the CPU from a frame in memory to its level, not the socket's read.
//! * **Memory** per learned id: the detector's tables and state (`Detector::memory_bytes`)
//!   over its ids, and the profile's JSON per id.
//! * **Scores** per attack kind (recall at level ≥ 0.5), false-positive rate, masquerade
//!   windows caught within 1 s, F1: ours with and without the DBC against the baseline.
//!
//! Environment: BENCH_CAN_REPS (20), BENCH_CAN_DIR (a directory to keep/reuse the traces).
//! Needs python3 with cantools and opendbc (scripts/test.sh installs them).
//! Does nothing unless run by `cargo bench` (`--bench`), and nothing for `--list`.

#[path = "../tests/can_eval_support/mod.rs"]
mod eval;
mod support;

use eval::{Score, Spec};
use outpost::can::baseline::Baseline;
use outpost::can::detect::Detector;
use outpost::can::frame::Frame;
use outpost::can::profile::Profile;
use std::time::Instant;
use support::env_or;

const VEHICLES: [&str; 3] = ["toyota_nodsu_pt_generated", "vw_mqb", "hyundai_2015_ccan"];

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

trait Grader {
    fn level(&mut self, f: &Frame) -> f64;
}
impl Grader for Detector {
    fn level(&mut self, f: &Frame) -> f64 {
        self.grade(f).level
    }
}
impl Grader for Baseline {
    fn level(&mut self, f: &Frame) -> f64 {
        self.grade(f).level
    }
}

/// Frames per CPU second over `reps` passes, and the per-call latencies of one more pass.
fn measure<G: Grader>(make: &dyn Fn() -> G, frames: &[Frame], reps: usize) -> (f64, Vec<u64>) {
    let mut sink = 0.0;
    let cpu0 = thread_cpu_s();
    for _ in 0..reps {
        let mut g = make();
        for f in frames {
            sink += g.level(f);
        }
    }
    let cpu = thread_cpu_s() - cpu0;
    let mut g = make();
    let mut lat = Vec::with_capacity(frames.len());
    for f in frames {
        let t = Instant::now();
        sink += g.level(f);
        lat.push(t.elapsed().as_nanos() as u64);
    }
    std::hint::black_box(sink);
    lat.sort_unstable();
    ((frames.len() * reps) as f64 / cpu, lat)
}

fn q(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn grade_all<G: Grader>(mut g: G, frames: &[Frame]) -> Vec<(f64, Vec<&'static str>)> {
    frames.iter().map(|f| (g.level(f), Vec::new())).collect()
}

fn main() {
    if !support::run_by_cargo_bench() {
        return;
    }
    eval::require_python_deps();
    let reps: usize = env_or("BENCH_CAN_REPS", 20);
    support::print_title("CAN detector (issue 12)");
    println!("{}", support::machine());
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = std::env::var_os("BENCH_CAN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("the trace dir");
    if std::env::var_os("BENCH_CAN_DIR").is_some() {
        std::env::set_var("OUTPOST_CAN_EVAL_DIR", &dir);
    }
    let mut specs = Vec::new();
    for v in VEHICLES {
        specs.push(Spec {
            dbc: v,
            seed: 1,
            duration: 60.0,
            attacks: "none",
            masquerade_windows: 0,
        });
        specs.push(Spec {
            dbc: v,
            seed: 2,
            duration: 44.0,
            attacks: "all",
            masquerade_windows: 2,
        });
    }
    let files = eval::generate_all(&dir, &specs);

    let (mut ours, mut nodbc, mut base) = (Score::default(), Score::default(), Score::default());
    let mut rows = Vec::new();
    let (mut mem, mut ids, mut json) = (0usize, 0usize, 0usize);
    for (n, v) in VEHICLES.iter().enumerate() {
        let (train, test) = (&files[2 * n], &files[2 * n + 1]);
        let train_frames = eval::read_log(&train.log);
        let frames = eval::read_log(&test.log);
        let labels = eval::read_labels(&test.labels);
        let t = Instant::now();
        let with: Profile = eval::learn(&train_frames, Some(&train.dbc));
        let learn_dbc = t.elapsed();
        let without: Profile = eval::learn(&train_frames, None);
        let d = Detector::new(&with);
        mem += d.memory_bytes();
        ids += d.ids();
        json += serde_json::to_string(&with).map(|s| s.len()).unwrap_or(0);
        ours.add(&eval::score(
            &frames,
            &labels,
            &grade_all(Detector::new(&with), &frames),
            0.5,
        ));
        nodbc.add(&eval::score(
            &frames,
            &labels,
            &grade_all(Detector::new(&without), &frames),
            0.5,
        ));
        base.add(&eval::score(
            &frames,
            &labels,
            &grade_all(Baseline::new(&without), &frames),
            0.5,
        ));
        let (a, la) = measure(&|| Detector::new(&with), &frames, reps);
        let (b, lb) = measure(&|| Detector::new(&without), &frames, reps);
        let (c, lc) = measure(&|| Baseline::new(&without), &frames, reps);
        rows.push((
            v.to_string(),
            frames.len(),
            learn_dbc,
            [(a, la), (b, lb), (c, lc)],
        ));
    }

    println!();
    println!(
        "Throughput (frames per CPU second, one thread, {reps} passes) and grade() latency (µs, \
         every frame of one pass):"
    );
    println!();
    println!("| trace | frames | detector | frames/s | p50 | p99 | p99.9 | max |");
    println!("|---|---|---|---|---|---|---|---|");
    for (v, n, _, r) in &rows {
        for (name, (fps, lat)) in ["ours + DBC", "ours, no DBC", "baseline"].iter().zip(r) {
            println!(
                "| {v} | {n} | {name} | {:.2} M | {:.2} | {:.2} | {:.2} | {:.1} |",
                fps / 1e6,
                q(lat, 0.5),
                q(lat, 0.99),
                q(lat, 0.999),
                q(lat, 1.0)
            );
        }
    }
    println!();
    for (v, _, learn, _) in &rows {
        println!(
            "learning with the DBC from 60 s of {v}: {:.2} s",
            learn.as_secs_f64()
        );
    }
    println!(
        "memory: {} B per learned id in the detector ({} ids, {} B), {} B of profile JSON per id",
        mem / ids.max(1),
        ids,
        mem,
        json / ids.max(1)
    );
    println!();
    println!("Scores on the three traces together (recall per kind at level >= 0.5):");
    println!();
    print!(
        "{}",
        eval::table(&[("ours+DBC", &ours), ("ours", &nodbc), ("baseline", &base)])
    );
}
