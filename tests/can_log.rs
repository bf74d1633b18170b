//! The candump log format against can-utils (issue 12): lines Outpost writes are read by
//! can-utils' own parser (`log2long`, Debian's can-utils) as the same frames, and Outpost
//! reads them back as the same frames. Frames of every kind: standard and extended data,
//! remote, CAN FD with flags, error frames.

use outpost::can::candump::{format_line, parse_line};
use outpost::can::frame::{Frame, Kind, FD_LENGTHS};
use std::io::Write;
use std::process::{Command, Stdio};

/// A deterministic spread of frames (xorshift), 600 of them.
fn frames() -> Vec<Frame> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..600u64)
        .map(|i| {
            let r = next();
            let extended = r & 1 == 1;
            let id = if extended {
                (r >> 8) as u32 & 0x1fff_ffff
            } else {
                (r >> 8) as u32 & 0x7ff
            };
            let ts = 1_700_000_000_000_000 + i * 1_337;
            let bytes: Vec<u8> = (0..64).map(|k| (r >> (k % 56)) as u8 ^ k as u8).collect();
            let (kind, len) = match (r >> 40) % 5 {
                0 => (
                    Kind::Remote {
                        dlc: ((r >> 44) % 9) as u8,
                    },
                    0,
                ),
                1 => (
                    Kind::Fd {
                        flags: ((r >> 44) % 4) as u8,
                    },
                    FD_LENGTHS[((r >> 48) % 16) as usize] as usize,
                ),
                2 => (
                    Kind::Error {
                        class: ((r >> 44) as u32) & 0x1ff,
                    },
                    8,
                ),
                _ => (Kind::Data { raw_dlc: None }, ((r >> 44) % 9) as usize),
            };
            let (id, extended) = if matches!(kind, Kind::Error { .. }) {
                (0, false)
            } else {
                (id, extended)
            };
            Frame::new(ts, id, extended, kind, &bytes[..len]).expect("a valid frame")
        })
        .collect()
}

#[test]
fn can_utils_reads_what_outpost_writes_and_outpost_reads_it_back() {
    let frames = frames();
    let lines: Vec<String> = frames.iter().map(|f| format_line("vcan0", f)).collect();
    for (l, f) in lines.iter().zip(&frames) {
        assert_eq!(&parse_line(l).expect(l).frame, f, "{l}");
    }
    let mut child = match Command::new("log2long")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            panic!("log2long (Debian can-utils) is required: {e}; scripts/test.sh installs it")
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let long: Vec<&str> = text.lines().collect();
    assert_eq!(
        long.len(),
        frames.len(),
        "log2long printed {} lines",
        long.len()
    );
    for (line, f) in long.iter().zip(&frames) {
        // (ts)  iface  ID  [len]  data... | remote request
        let w: Vec<&str> = line.split_whitespace().collect();
        let id = u32::from_str_radix(w[2], 16).expect(line);
        let want_id = match f.kind {
            Kind::Error { .. } => f.can_id(),
            _ => f.id,
        };
        assert_eq!(id, want_id, "{line}");
        let len: usize = w[3]
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .expect(line);
        match f.kind {
            Kind::Remote { dlc } => {
                assert_eq!(len, usize::from(dlc), "{line}");
                assert!(line.contains("remote request"), "{line}");
            }
            _ => {
                assert_eq!(len, f.data().len(), "{line}");
                let data: Vec<u8> = w[4..4 + len]
                    .iter()
                    .map(|b| u8::from_str_radix(b, 16).expect(line))
                    .collect();
                assert_eq!(data, f.data(), "{line}");
                if f.is_error() {
                    assert!(line.ends_with("ERRORFRAME"), "{line}");
                }
            }
        }
    }
}
