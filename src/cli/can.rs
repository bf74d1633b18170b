//! `outpost can learn | detect`: the CAN profile and the per-frame grading, on candump logs
//! (`candump -L`), without a bus (issue 12).

use anyhow::{bail, Context};
use clap::Subcommand;
use outpost::can::candump::Reader;
use outpost::can::detect::Detector;
use outpost::can::profile::{Learner, Profile, PROFILE_VERSION};
use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum CanCmd {
    /// Learn a profile of normal traffic from an attack-free capture.
    Learn {
        /// The capture: a candump log (`candump -L`); `-` reads standard input.
        #[arg(long)]
        log: PathBuf,
        /// Where to write the profile (JSON).
        #[arg(long)]
        out: PathBuf,
        /// A DBC of the vehicle's bus: also learn its signals (ranges, steps, relations
        /// between them), counters, checksums and the transmitter ECU of each id.
        #[arg(long)]
        dbc: Option<PathBuf>,
    },
    /// Grade every frame of a log against a profile.
    Detect {
        /// A profile from `outpost can learn`.
        #[arg(long)]
        profile: PathBuf,
        /// The log to grade (`candump -L`); `-` reads standard input.
        #[arg(long)]
        log: PathBuf,
        /// One JSON line per input frame, in input order:
        /// {"ts", "id", "level", "reasons"} (and "ext": true for an extended id).
        #[arg(long)]
        jsonl: bool,
        /// Frames at or above this level count as anomalous in the summary.
        #[arg(long, default_value_t = 0.5)]
        alert_level: f64,
    },
}

fn open(path: &Path) -> anyhow::Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 16, f)))
}

fn report_skipped<R>(r: &Reader<R>, path: &Path) {
    if r.skipped.lines > 0 {
        eprintln!(
            "outpost: {}: {} line(s) skipped ({} too long); first: {}",
            path.display(),
            r.skipped.lines,
            r.skipped.too_long,
            r.errors
                .iter()
                .take(3)
                .map(|(n, e)| format!("line {n}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

pub fn can_command(cmd: CanCmd) -> anyhow::Result<()> {
    match cmd {
        CanCmd::Learn { log, out, dbc } => {
            let mut l = match &dbc {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let d = outpost::can::dbc::parse(&text)
                        .with_context(|| format!("{} is not a DBC", path.display()))?;
                    Learner::with_dbc(d)
                }
                None => Learner::default(),
            };
            let mut r = Reader::new(open(&log)?);
            for f in r.by_ref() {
                l.add(
                    &f.with_context(|| format!("reading {}", log.display()))?
                        .frame,
                );
            }
            report_skipped(&r, &log);
            let p = l.finish();
            if p.frames == 0 {
                bail!("{}: no frames to learn from", log.display());
            }
            let text = serde_json::to_string_pretty(&p)?;
            std::fs::write(&out, text + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
            let signals: usize = p.ids.values().map(|i| i.signals.len()).sum();
            let relations: usize = p.ids.values().map(|i| i.relations.len()).sum();
            println!(
                "learned {} ids from {} frames over {:.1} s -> {}{}",
                p.ids.len(),
                p.frames,
                p.duration_us as f64 / 1e6,
                out.display(),
                if dbc.is_some() {
                    format!(" ({signals} signals, {relations} relations from the DBC)")
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        CanCmd::Detect {
            profile,
            log,
            jsonl,
            alert_level,
        } => {
            let text = std::fs::read_to_string(&profile)
                .with_context(|| format!("reading {}", profile.display()))?;
            // The version first: an older profile gets that said, not a missing field.
            let version = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("version").and_then(|v| v.as_u64()));
            if let Some(v) = version.filter(|&v| v != u64::from(PROFILE_VERSION)) {
                bail!(
                    "{}: profile version {v} (this build reads {PROFILE_VERSION}: learn it again)",
                    profile.display(),
                );
            }
            let p: Profile = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a profile", profile.display()))?;
            let mut d = Detector::new(&p);
            let mut r = Reader::new(open(&log)?);
            let stdout = std::io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let (mut frames, mut anomalous) = (0u64, 0u64);
            let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
            for l in r.by_ref() {
                let f = l
                    .with_context(|| format!("reading {}", log.display()))?
                    .frame;
                let v = d.grade(&f);
                frames += 1;
                if v.level >= alert_level {
                    anomalous += 1;
                }
                for r in &v.reasons {
                    *reasons.entry(r).or_default() += 1;
                }
                if jsonl {
                    let mut line = serde_json::json!({
                        "ts": f.ts_us as f64 / 1e6,
                        "id": format!("{:#x}", f.id),
                        "level": v.level,
                        "reasons": v.reasons,
                    });
                    if f.extended {
                        line["ext"] = serde_json::Value::Bool(true);
                    }
                    if f.is_error() {
                        line["error"] = serde_json::Value::Bool(true);
                    }
                    writeln!(out, "{line}")?;
                }
            }
            out.flush()?;
            report_skipped(&r, &log);
            if !jsonl {
                println!("{frames} frames, {anomalous} at level >= {alert_level}");
                for (r, n) in reasons {
                    println!("  {r}: {n}");
                }
            }
            Ok(())
        }
    }
}
