//! The CAN evaluation set (issue 12, acceptance points 2, 3 and 6), shared by
//! `tests/can_eval.rs` and `benches/can.rs`: run the generator (`scripts/can-eval/gen.py`),
//! read its log and labels, learn, grade, score per attack kind.
#![allow(dead_code)]

use outpost::can::candump::Reader;
use outpost::can::dbc;
use outpost::can::frame::Frame;
use outpost::can::profile::{Learner, Profile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const KINDS: [&str; 8] = [
    "dos",
    "fuzzy",
    "spoofing",
    "fabrication",
    "masquerade",
    "replay",
    "dlc",
    "range",
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> String {
    std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails with what to install when the generator's Python packages are missing.
pub fn require_python_deps() {
    let out = Command::new(python())
        .args(["-c", "import cantools, opendbc"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the CAN evaluation generator needs cantools and opendbc (scripts/test.sh installs \
             them): python3 -m pip install --user cantools==45.1.0 opendbc==0.3.1\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "the CAN evaluation generator needs python3 ({}): {e}",
            python()
        ),
    }
}

pub struct Spec<'a> {
    pub dbc: &'a str,
    pub seed: u64,
    pub duration: f64,
    pub attacks: &'a str,
    pub masquerade_windows: u32,
}

pub struct Files {
    pub log: PathBuf,
    pub labels: PathBuf,
    pub dbc: PathBuf,
}

/// Start the generator for `spec` into `dir` (files named after the DBC and seed).
pub fn spawn(dir: &Path, spec: &Spec) -> (std::process::Child, Files) {
    let base = format!(
        "{}-{}-{}",
        spec.dbc,
        spec.seed,
        spec.attacks.replace(',', "+")
    );
    let files = Files {
        log: dir.join(format!("{base}.log")),
        labels: dir.join(format!("{base}.json")),
        dbc: dir.join(format!("{}.dbc", spec.dbc)),
    };
    let child = Command::new(python())
        .arg(repo().join("scripts/can-eval/gen.py"))
        .args(["--dbc", spec.dbc, "--seed", &spec.seed.to_string()])
        .args([
            "--duration",
            &spec.duration.to_string(),
            "--attacks",
            spec.attacks,
        ])
        .args(["--masquerade-windows", &spec.masquerade_windows.to_string()])
        .arg("--log")
        .arg(&files.log)
        .arg("--labels")
        .arg(&files.labels)
        .arg("--dbc-out")
        .arg(&files.dbc)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the generator");
    (child, files)
}

/// Generate every spec (in parallel, two at a time), reusing files already there when
/// `OUTPOST_CAN_EVAL_DIR` names the directory.
pub fn generate_all(dir: &Path, specs: &[Spec]) -> Vec<Files> {
    let mut out = Vec::new();
    let mut running: Vec<(std::process::Child, String)> = Vec::new();
    for s in specs {
        let (child, files) =
            if std::env::var_os("OUTPOST_CAN_EVAL_DIR").is_some() && spawn_name_exists(dir, s) {
                (None, files_of(dir, s))
            } else {
                let (c, f) = spawn(dir, s);
                (Some(c), f)
            };
        if let Some(c) = child {
            running.push((c, s.dbc.to_string()));
        }
        out.push(files);
        while running.len() >= 2 {
            wait_one(&mut running);
        }
    }
    while !running.is_empty() {
        wait_one(&mut running);
    }
    out
}

fn files_of(dir: &Path, spec: &Spec) -> Files {
    let base = format!(
        "{}-{}-{}",
        spec.dbc,
        spec.seed,
        spec.attacks.replace(',', "+")
    );
    Files {
        log: dir.join(format!("{base}.log")),
        labels: dir.join(format!("{base}.json")),
        dbc: dir.join(format!("{}.dbc", spec.dbc)),
    }
}

fn spawn_name_exists(dir: &Path, spec: &Spec) -> bool {
    let f = files_of(dir, spec);
    f.log.exists() && f.labels.exists() && f.dbc.exists()
}

fn wait_one(running: &mut Vec<(std::process::Child, String)>) {
    let (c, name) = running.remove(0);
    let out = c.wait_with_output().expect("wait for the generator");
    assert!(
        out.status.success(),
        "gen.py --dbc {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

pub fn read_log(path: &Path) -> Vec<Frame> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = Reader::new(std::io::BufReader::new(f));
    let frames: Vec<Frame> = r.by_ref().map(|l| l.expect("read the log").frame).collect();
    assert_eq!(
        r.skipped.lines,
        0,
        "{}: the generator's lines parse",
        path.display()
    );
    frames
}

#[derive(Debug, Clone)]
pub struct Window {
    pub kind: String,
    pub id: Option<u32>,
    pub start_us: u64,
    pub end_us: u64,
}

pub struct Labels {
    pub frames: Vec<String>,
    pub windows: Vec<Window>,
}

pub fn read_labels(path: &Path) -> Labels {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("labels are JSON");
    let frames = v["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|x| x.as_str().expect("a label").to_string())
        .collect();
    let windows = v["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| Window {
            kind: w["kind"].as_str().unwrap_or_default().to_string(),
            id: w["id"].as_u64().map(|x| x as u32),
            start_us: (w["start"].as_f64().unwrap_or(0.0) * 1e6).round() as u64,
            end_us: (w["end"].as_f64().unwrap_or(0.0) * 1e6).round() as u64,
        })
        .collect();
    Labels { frames, windows }
}

pub fn learn(frames: &[Frame], dbc_path: Option<&Path>) -> Profile {
    let mut l = match dbc_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).expect("read the DBC");
            Learner::with_dbc(dbc::parse(&text).expect("the DBC parses"))
        }
        None => Learner::default(),
    };
    for f in frames {
        l.add(f);
    }
    l.finish()
}

/// Recall per kind, false positives, masquerade windows caught within 1 s.
#[derive(Debug, Default, Clone)]
pub struct Score {
    pub caught: BTreeMap<String, (u64, u64)>,
    pub fp: u64,
    pub normal: u64,
    pub windows: (u64, u64),
    pub fp_reasons: BTreeMap<&'static str, u64>,
    pub missed_reasons: BTreeMap<String, u64>,
}

impl Score {
    pub fn add(&mut self, o: &Score) {
        for (k, (c, t)) in &o.caught {
            let e = self.caught.entry(k.clone()).or_default();
            e.0 += c;
            e.1 += t;
        }
        self.fp += o.fp;
        self.normal += o.normal;
        self.windows.0 += o.windows.0;
        self.windows.1 += o.windows.1;
        for (k, v) in &o.fp_reasons {
            *self.fp_reasons.entry(k).or_default() += v;
        }
        for (k, v) in &o.missed_reasons {
            *self.missed_reasons.entry(k.clone()).or_default() += v;
        }
    }

    pub fn recall(&self, kind: &str) -> f64 {
        match self.caught.get(kind) {
            Some(&(c, t)) if t > 0 => c as f64 / t as f64,
            _ => f64::NAN,
        }
    }

    pub fn fp_rate(&self) -> f64 {
        self.fp as f64 / self.normal.max(1) as f64
    }

    /// F1 over all attack frames against normal ones.
    pub fn f1(&self) -> f64 {
        let tp: u64 = self.caught.values().map(|c| c.0).sum();
        let all: u64 = self.caught.values().map(|c| c.1).sum();
        let p = tp as f64 / (tp + self.fp).max(1) as f64;
        let r = tp as f64 / all.max(1) as f64;
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

/// Score verdicts (level, reasons) against the labels.
pub fn score(
    frames: &[Frame],
    labels: &Labels,
    verdicts: &[(f64, Vec<&'static str>)],
    alert: f64,
) -> Score {
    assert_eq!(frames.len(), labels.frames.len(), "one label per frame");
    assert_eq!(frames.len(), verdicts.len(), "one verdict per frame");
    let mut s = Score::default();
    for ((f, l), (level, reasons)) in frames.iter().zip(&labels.frames).zip(verdicts) {
        let hit = *level >= alert;
        if l == "normal" {
            s.normal += 1;
            if hit {
                s.fp += 1;
                for r in reasons {
                    *s.fp_reasons.entry(r).or_default() += 1;
                }
            }
        } else {
            let e = s.caught.entry(l.clone()).or_default();
            e.1 += 1;
            e.0 += u64::from(hit);
            if !hit {
                *s.missed_reasons
                    .entry(format!("{l}:{}", reasons.join("+")))
                    .or_default() += 1;
            }
        }
        let _ = f;
    }
    for w in labels.windows.iter().filter(|w| w.kind == "masquerade") {
        s.windows.1 += 1;
        let caught = frames
            .iter()
            .zip(&labels.frames)
            .zip(verdicts)
            .any(|((f, l), (level, _))| {
                l == "masquerade"
                    && f.ts_us >= w.start_us
                    && f.ts_us <= w.start_us + 1_000_000
                    && *level >= alert
            });
        s.windows.0 += u64::from(caught);
    }
    s
}

pub fn table(rows: &[(&str, &Score)]) -> String {
    const W: usize = 24;
    let mut out = format!("{:<12}", "kind");
    for (name, _) in rows {
        out += &format!(" {name:>W$}");
    }
    out += "\n";
    for k in KINDS {
        out += &format!("{k:<12}");
        for (_, s) in rows {
            let (c, t) = s.caught.get(k).copied().unwrap_or_default();
            out += &format!(" {:>W$}", format!("{:.4} ({c}/{t})", s.recall(k)));
        }
        out += "\n";
    }
    out += &format!("{:<12}", "FP rate");
    for (_, s) in rows {
        out += &format!(
            " {:>W$}",
            format!("{:.4}% ({}/{})", s.fp_rate() * 100.0, s.fp, s.normal)
        );
    }
    out += &format!("\n{:<12}", "masq. win.");
    for (_, s) in rows {
        out += &format!(" {:>W$}", format!("{}/{} in 1 s", s.windows.0, s.windows.1));
    }
    out += &format!("\n{:<12}", "F1");
    for (_, s) in rows {
        out += &format!(" {:>W$.4}", s.f1());
    }
    out + "\n"
}
