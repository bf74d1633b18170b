//! Where frames come from: a kernel CAN interface through `socketcan` (its tokio sockets,
//! with the kernel's receive timestamps and every error frame), or a candump log replayed
//! through the same pipeline. Each source is a task that sends batches of frames and its
//! state changes to the CAN owner; none ever stops the gateway.
//!
//! A socket source opens its interface, and if that fails (missing, no CAN in the kernel)
//! retries with jittered exponential backoff (250 ms to 5 s), reporting each change of
//! state once. An interface taken down reports `ENETDOWN` on its bound socket: the source
//! reports it down and keeps the socket, which receives again once the interface is up.
//! Any other read error (the interface was deleted) closes the socket and starts over.

use super::candump::Reader;
use super::frame::{Frame, Kind, CAN_EFF_FLAG, CAN_EFF_MASK, CAN_ERR_FLAG, CAN_SFF_MASK};
use rand::Rng;
use socketcan::{CanAnyFrame, EmbeddedFrame, Frame as _, SocketOptions};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Frames per batch sent to the owner, at most.
pub const BATCH: usize = 256;

/// What a source tells the owner.
#[derive(Debug)]
pub enum Input {
    Frames {
        bus: usize,
        frames: Vec<Frame>,
    },
    /// The source's interface is usable (`up`) or not, and why.
    State {
        bus: usize,
        up: bool,
        reason: String,
    },
    /// Lines of a replayed log that were not frames (counted; the first reasons kept).
    Skipped {
        bus: usize,
        lines: u64,
        first: Vec<String>,
    },
    /// A replayed log has been read to its end.
    Ended {
        bus: usize,
    },
}

/// Our frame of a socket's frame, stamped `ts_us`.
pub fn from_socket(f: &CanAnyFrame, ts_us: u64) -> Option<Frame> {
    let word = f.id_word();
    let extended = word & CAN_EFF_FLAG != 0;
    let id = if extended {
        word & CAN_EFF_MASK
    } else {
        word & CAN_SFF_MASK
    };
    match f {
        CanAnyFrame::Normal(d) => {
            Frame::new(ts_us, id, extended, Kind::Data { raw_dlc: None }, d.data())
        }
        CanAnyFrame::Remote(r) => {
            let dlc = u8::try_from(r.dlc()).ok()?;
            Frame::new(ts_us, id, extended, Kind::Remote { dlc }, &[])
        }
        CanAnyFrame::Error(e) => Frame::new(
            ts_us,
            0,
            false,
            Kind::Error {
                class: word & !CAN_ERR_FLAG & CAN_EFF_MASK,
            },
            e.data(),
        ),
        CanAnyFrame::Fd(d) => Frame::new(
            ts_us,
            id,
            extended,
            Kind::Fd {
                flags: d.flags().bits(),
            },
            d.data(),
        ),
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Jittered exponential backoff between reopen attempts.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(5);
    fn new() -> Backoff {
        Backoff { next: Self::MIN }
    }
    fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

enum Sock {
    Fd(socketcan::tokio::CanFdSocket),
    Classic(socketcan::tokio::CanSocket),
}

impl Sock {
    fn open(name: &str, fd: bool) -> std::io::Result<Sock> {
        let s = if fd {
            Sock::Fd(socketcan::tokio::CanFdSocket::open(name)?)
        } else {
            Sock::Classic(socketcan::tokio::CanSocket::open(name)?)
        };
        match &s {
            Sock::Fd(s) => {
                s.set_recv_timestamp(true)?;
                s.set_error_filter_accept_all()?;
            }
            Sock::Classic(s) => {
                s.set_recv_timestamp(true)?;
                s.set_error_filter_accept_all()?;
            }
        }
        Ok(s)
    }

    async fn read(&self) -> std::io::Result<(CanAnyFrame, SystemTime)> {
        match self {
            Sock::Fd(s) => s.read_frame_with_timestamp().await,
            Sock::Classic(s) => {
                let (f, t) = s.read_frame_with_timestamp().await?;
                Ok((CanAnyFrame::from(f), t))
            }
        }
    }
}

/// How often a socket source checks that its interface is up.
const LINK_CHECK: Duration = Duration::from_millis(250);

/// Whether interface `name` is administratively up (`IFF_UP` in its sysfs flags); `None`
/// if there is no such interface.
pub fn link_up(name: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).ok()?;
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()?;
    Some(flags & 1 != 0)
}

/// Read interface `name` until `shutdown`, sending to `out` as bus `bus`.
pub async fn socket(
    bus: usize,
    name: String,
    fd: bool,
    out: mpsc::Sender<Input>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut up: Option<bool> = None;
    let mut state = |up_now: bool, reason: String| {
        let changed = up != Some(up_now);
        up = Some(up_now);
        changed.then_some(Input::State {
            bus,
            up: up_now,
            reason,
        })
    };
    loop {
        let sock = match Sock::open(&name, fd) {
            Ok(s) => s,
            Err(e) => {
                if let Some(m) = state(false, format!("cannot open: {e}")) {
                    if out.send(m).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.take()) => continue,
                }
            }
        };
        let at_open = match link_up(&name) {
            Some(false) => (false, "interface down"),
            _ => (true, "open"),
        };
        if let Some(m) = state(at_open.0, at_open.1.into()) {
            if out.send(m).await.is_err() {
                return;
            }
        }
        // A raw CAN socket signals a downed interface with EPOLLERR alone, which a read
        // waiting for readability does not see until the next frame: the link is also
        // checked on a timer.
        let mut check = tokio::time::interval(LINK_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = sock.read() => r,
                _ = check.tick() => {
                    let m = match link_up(&name) {
                        Some(true) => state(true, "up".into()),
                        Some(false) => state(false, "interface down".into()),
                        None => {
                            if let Some(m) = state(false, "interface gone".into()) {
                                if out.send(m).await.is_err() {
                                    return;
                                }
                            }
                            break;
                        }
                    };
                    if let Some(m) = m {
                        if out.send(m).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
            };
            match first {
                Ok((f, t)) => {
                    backoff = Backoff::new();
                    if let Some(m) = state(true, "receiving".into()) {
                        if out.send(m).await.is_err() {
                            return;
                        }
                    }
                    let mut frames = Vec::with_capacity(16);
                    frames.extend(from_socket(&f, micros(t)));
                    // Whatever else is already waiting, each with its own kernel stamp: a
                    // zero timeout polls the read once and gives up if it would wait.
                    while frames.len() < BATCH {
                        match tokio::time::timeout(Duration::ZERO, sock.read()).await {
                            Ok(Ok((f, t))) => frames.extend(from_socket(&f, micros(t))),
                            _ => break,
                        }
                    }
                    if out.send(Input::Frames { bus, frames }).await.is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NetworkDown => {
                    // Taken down: the socket stays bound and receives again once it is up.
                    // The error is read only when the socket next wakes, which may be after
                    // the interface is back: then it is stale.
                    if link_up(&name) == Some(true) {
                        continue;
                    }
                    if let Some(m) = state(false, "interface down".into()) {
                        if out.send(m).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if let Some(m) = state(false, format!("read failed: {e}")) {
                        if out.send(m).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.take()) => {}
        }
    }
}

/// Replay the candump log `path` as bus `bus` (paced by its timestamps when `realtime`),
/// on a thread of its own.
pub fn replay(
    bus: usize,
    path: PathBuf,
    realtime: bool,
    out: mpsc::Sender<Input>,
    shutdown: CancellationToken,
) {
    let send = |m: Input| out.blocking_send(m).is_ok();
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            send(Input::State {
                bus,
                up: false,
                reason: format!("cannot open {}: {e}", path.display()),
            });
            return;
        }
    };
    if !send(Input::State {
        bus,
        up: true,
        reason: format!("replaying {}", path.display()),
    }) {
        return;
    }
    let mut reader = Reader::new(std::io::BufReader::with_capacity(1 << 16, file));
    let started = std::time::Instant::now();
    let mut first_ts: Option<u64> = None;
    let mut frames = Vec::with_capacity(BATCH);
    let mut reported = 0;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let next = reader.next();
        let done = match next {
            None => true,
            Some(Err(e)) => {
                send(Input::State {
                    bus,
                    up: false,
                    reason: format!("reading {}: {e}", path.display()),
                });
                true
            }
            Some(Ok(logged)) => {
                let f = logged.frame;
                if realtime {
                    let t0 = *first_ts.get_or_insert(f.ts_us);
                    let due = Duration::from_micros(f.ts_us.saturating_sub(t0));
                    let now = started.elapsed();
                    if due > now + Duration::from_millis(2) {
                        if !frames.is_empty()
                            && !send(Input::Frames {
                                bus,
                                frames: std::mem::take(&mut frames),
                            })
                        {
                            return;
                        }
                        // Sleep in slices so a shutdown is seen.
                        let mut left = due - now;
                        while left > Duration::ZERO {
                            if shutdown.is_cancelled() {
                                return;
                            }
                            let step = left.min(Duration::from_millis(100));
                            std::thread::sleep(step);
                            left -= step;
                        }
                    }
                }
                frames.push(f);
                false
            }
        };
        if reader.skipped.lines > reported {
            reported = reader.skipped.lines;
            let first = reader.errors.iter().map(|(n, e)| format!("line {n}: {e}"));
            if !send(Input::Skipped {
                bus,
                lines: reader.skipped.lines,
                first: first.take(3).collect(),
            }) {
                return;
            }
        }
        if (done || frames.len() >= BATCH)
            && !frames.is_empty()
            && !send(Input::Frames {
                bus,
                frames: std::mem::take(&mut frames),
            })
        {
            return;
        }
        if done {
            send(Input::Ended { bus });
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socketcan::{
        CanDataFrame, CanErrorFrame, CanFdFrame, CanRemoteFrame, ExtendedId, StandardId,
    };

    #[test]
    fn socket_frames_become_ours_with_their_flags() {
        let id = StandardId::new(0x1a0).unwrap();
        let d = CanDataFrame::new(id, &[1, 2, 3]).unwrap();
        let f = from_socket(&CanAnyFrame::Normal(d), 7).unwrap();
        assert_eq!(
            (f.ts_us, f.id, f.extended, f.data()),
            (7, 0x1a0, false, &[1, 2, 3][..])
        );
        let ext = ExtendedId::new(0x18fe_f100).unwrap();
        let d = CanFdFrame::new(ext, &[9; 12]).unwrap();
        let f = from_socket(&CanAnyFrame::Fd(d), 8).unwrap();
        assert!(f.extended && f.id == 0x18fe_f100 && f.data().len() == 12);
        assert!(matches!(f.kind, Kind::Fd { .. }));
        let r = CanRemoteFrame::new_remote(id, 4).unwrap();
        let f = from_socket(&CanAnyFrame::Remote(r), 9).unwrap();
        assert_eq!(f.kind, Kind::Remote { dlc: 4 });
        let e = CanErrorFrame::new_error(super::super::frame::CAN_ERR_BUSOFF, &[0; 8]).unwrap();
        let f = from_socket(&CanAnyFrame::Error(e), 10).unwrap();
        assert!(f.is_error());
        assert_eq!(
            f.kind,
            Kind::Error {
                class: super::super::frame::CAN_ERR_BUSOFF
            }
        );
    }

    #[tokio::test]
    async fn a_missing_interface_is_reported_down_and_retried_not_fatal() {
        let (tx, mut rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let task = tokio::spawn(socket(0, "nosuchcan9".into(), true, tx, stop.clone()));
        match rx.recv().await {
            Some(Input::State {
                up: false, reason, ..
            }) => {
                assert!(reason.starts_with("cannot open"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Still retrying, quietly (one report per change of state).
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(rx.try_recv().is_err());
        assert!(!task.is_finished());
        stop.cancel();
        task.await.unwrap();
    }
}
