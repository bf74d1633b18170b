//! The candump log format (`candump -L`, what `canplayer` replays), read and written
//! (a leaf). One frame per line:
//!
//! ```text
//! (1436509052.249713) vcan0 044#2A366C2BBA
//! ```
//!
//! a timestamp in seconds with a fraction, the interface name, and the frame in can-utils'
//! compact form (its `lib.h` documents it; the examples of that comment are the known-answer
//! tests below):
//!
//! * `123#11223344` a standard frame (3 hex digits), `12345678#...` an extended one (8);
//!   data as hex byte pairs, optionally separated by `.`; at most 8 bytes;
//! * `123#R` / `123#R5` a remote frame (with its DLC);
//! * `123##1AABB` a CAN FD frame: `##`, one hex digit of flags, then up to 64 bytes;
//! * `20000080#...` (8 digits with `CAN_ERR_FLAG` 0x20000000 set) an error frame;
//! * `123#1122334455667788_E` a classic 8-byte frame whose DLC is 9..=15 (newer can-utils).
//!
//! Reading never panics and bounds what it holds: a line longer than [`MAX_LINE`] is an
//! error (and skipped, not buffered whole), as is anything that is not a valid frame. A
//! reader counts what it skipped and goes on.

use super::frame::{Frame, Kind, CANFD_MAX_DLEN, CAN_ERR_FLAG, CAN_ERR_MASK, FD_LENGTHS};
use std::io::BufRead;

/// The longest line accepted: a 64-byte FD frame with separators is about 220 characters.
pub const MAX_LINE: usize = 512;
/// Interface names are at most 15 bytes on Linux (IFNAMSIZ - 1).
pub const MAX_IFACE: usize = 15;

/// Why a line is not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("not UTF-8")]
    NotText,
    #[error("no `(seconds.fraction)` timestamp")]
    Timestamp,
    #[error("no interface name (1..=15 bytes)")]
    Interface,
    #[error("no frame after the interface")]
    NoFrame,
    #[error("identifier: {0}")]
    Id(&'static str),
    #[error("data: {0}")]
    Data(&'static str),
    #[error("unexpected text after the frame")]
    Trailing,
}

/// One logged frame and the interface it was seen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub iface: String,
    pub frame: Frame,
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_u32(s: &[u8]) -> Option<u32> {
    s.iter()
        .try_fold(0u32, |acc, &c| Some((acc << 4) | u32::from(nibble(c)?)))
}

/// `(seconds.fraction)` → microseconds (1 to 9 fraction digits; beyond 6 are truncated).
fn timestamp(s: &str) -> Result<u64, LineError> {
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or(LineError::Timestamp)?;
    let (sec, frac) = inner.split_once('.').ok_or(LineError::Timestamp)?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(sec) || !digits(frac) || sec.len() > 12 || frac.len() > 9 {
        return Err(LineError::Timestamp);
    }
    let sec: u64 = sec.parse().map_err(|_| LineError::Timestamp)?;
    let mut us: u64 = 0;
    for (i, b) in frac.bytes().take(6).enumerate() {
        us += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
    }
    sec.checked_mul(1_000_000)
        .and_then(|v| v.checked_add(us))
        .ok_or(LineError::Timestamp)
}

/// Data bytes as hex pairs with optional `.` separators, at most `max`.
fn data(s: &[u8], max: usize) -> Result<Vec<u8>, LineError> {
    let mut out = Vec::with_capacity(max.min(s.len() / 2));
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'.' {
            i += 1;
            continue;
        }
        if out.len() == max {
            return Err(LineError::Data("more bytes than the frame can carry"));
        }
        let hi = nibble(s[i]).ok_or(LineError::Data("not a hex digit"))?;
        let lo = s
            .get(i + 1)
            .copied()
            .and_then(nibble)
            .ok_or(LineError::Data("odd number of hex digits"))?;
        out.push(hi << 4 | lo);
        i += 2;
    }
    Ok(out)
}

/// The compact frame form (`123#...`), with its timestamp.
pub fn parse_frame(s: &str, ts_us: u64) -> Result<Frame, LineError> {
    let b = s.as_bytes();
    let hash = b
        .iter()
        .position(|&c| c == b'#')
        .ok_or(LineError::Id("no `#`"))?;
    let id = hex_u32(&b[..hash]).ok_or(LineError::Id("not hex"))?;
    let (id, extended, error) = match hash {
        3 if id <= 0x7ff => (id, false, false),
        3 => return Err(LineError::Id("standard identifier over 0x7FF")),
        8 if id & CAN_ERR_FLAG != 0 => {
            if id & !(CAN_ERR_FLAG | CAN_ERR_MASK) != 0 {
                return Err(LineError::Id("error frame with other flag bits"));
            }
            (id & CAN_ERR_MASK, true, true)
        }
        8 if id <= 0x1fff_ffff => (id, true, false),
        8 => return Err(LineError::Id("extended identifier over 29 bits")),
        _ => return Err(LineError::Id("3 or 8 hex digits before `#`")),
    };
    let rest = &b[hash + 1..];
    let bad = |e| LineError::Data(e);
    if error {
        let d = data(rest, 8)?;
        return Frame::new(ts_us, 0, false, Kind::Error { class: id }, &d)
            .ok_or(bad("error frame"));
    }
    match rest.first() {
        Some(b'R' | b'r') => {
            let dlc = match &rest[1..] {
                [] => 0,
                [d] => nibble(*d)
                    .filter(|&d| d <= 8)
                    .ok_or(bad("remote frame DLC over 8"))?,
                _ => return Err(LineError::Trailing),
            };
            Frame::new(ts_us, id, extended, Kind::Remote { dlc }, &[]).ok_or(bad("remote frame"))
        }
        Some(b'#') => {
            let flags = rest
                .get(1)
                .copied()
                .and_then(nibble)
                .ok_or(bad("CAN FD frame without its flags digit"))?;
            let d = data(&rest[2..], CANFD_MAX_DLEN)?;
            if !FD_LENGTHS.contains(&(d.len() as u8)) {
                return Err(bad(
                    "not a CAN FD length (0..8, 12, 16, 20, 24, 32, 48, 64)",
                ));
            }
            Frame::new(ts_us, id, extended, Kind::Fd { flags }, &d).ok_or(bad("CAN FD frame"))
        }
        _ => {
            let (body, raw_dlc) = match rest.iter().position(|&c| c == b'_') {
                Some(u) => {
                    let dlc = match &rest[u + 1..] {
                        [d] => nibble(*d)
                            .filter(|d| (9..=15).contains(d))
                            .ok_or(bad("`_` DLC must be 9..F"))?,
                        _ => return Err(bad("`_` takes one hex digit")),
                    };
                    (&rest[..u], Some(dlc))
                }
                None => (rest, None),
            };
            let d = data(body, 8)?;
            if raw_dlc.is_some() && d.len() != 8 {
                return Err(bad("`_` DLC with fewer than 8 bytes"));
            }
            Frame::new(ts_us, id, extended, Kind::Data { raw_dlc }, &d).ok_or(bad("data frame"))
        }
    }
}

/// One log line (without its newline).
pub fn parse_line(line: &str) -> Result<Logged, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    let mut words = line.split_ascii_whitespace();
    let ts = timestamp(words.next().ok_or(LineError::Timestamp)?)?;
    let iface = words.next().ok_or(LineError::Interface)?;
    if iface.len() > MAX_IFACE || iface.contains('#') {
        return Err(LineError::Interface);
    }
    let frame = parse_frame(words.next().ok_or(LineError::NoFrame)?, ts)?;
    // candump -x adds a direction: R (received) or T (sent by this host).
    match (words.next(), words.next()) {
        (None, _) | (Some("R" | "T"), None) => {}
        _ => return Err(LineError::Trailing),
    }
    Ok(Logged {
        iface: iface.to_string(),
        frame,
    })
}

/// The compact form of a frame, as candump writes it (upper-case hex, no separators).
pub fn format_frame(f: &Frame) -> String {
    let mut s = match f.kind {
        Kind::Error { class } => format!("{:08X}#", CAN_ERR_FLAG | class),
        _ if f.extended => format!("{:08X}#", f.id),
        _ => format!("{:03X}#", f.id),
    };
    match f.kind {
        Kind::Remote { dlc: 0 } => s.push('R'),
        Kind::Remote { dlc } => s.push_str(&format!("R{dlc}")),
        Kind::Fd { flags } => s.push_str(&format!("#{flags:X}")),
        _ => {}
    }
    if !matches!(f.kind, Kind::Remote { .. }) {
        for b in f.data() {
            s.push_str(&format!("{b:02X}"));
        }
    }
    if let Kind::Data { raw_dlc: Some(d) } = f.kind {
        s.push_str(&format!("_{d:X}"));
    }
    s
}

/// A log line for `f` on `iface` (what `candump -L` prints).
pub fn format_line(iface: &str, f: &Frame) -> String {
    format!(
        "({}.{:06}) {iface} {}",
        f.ts_us / 1_000_000,
        f.ts_us % 1_000_000,
        format_frame(f)
    )
}

/// What a [`Reader`] skipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    pub lines: u64,
    pub too_long: u64,
}

/// Frames of a candump log, in order; bad lines are skipped and counted (the first few
/// reasons kept), blank lines ignored. Holds at most one line of [`MAX_LINE`] bytes.
pub struct Reader<R> {
    input: R,
    buf: Vec<u8>,
    line_no: u64,
    pub skipped: Skipped,
    /// (line number, why) of the first [`Reader::KEPT_ERRORS`] bad lines.
    pub errors: Vec<(u64, LineError)>,
}

impl<R: BufRead> Reader<R> {
    pub const KEPT_ERRORS: usize = 16;

    pub fn new(input: R) -> Reader<R> {
        Reader {
            input,
            buf: Vec::with_capacity(128),
            line_no: 0,
            skipped: Skipped::default(),
            errors: Vec::new(),
        }
    }

    /// Read one line of at most `MAX_LINE` bytes; a longer one is consumed to its end and
    /// reported as too long. `Ok(false)` at the end of the input.
    fn next_line(&mut self) -> std::io::Result<Option<bool>> {
        self.buf.clear();
        let mut too_long = false;
        loop {
            let chunk = self.input.fill_buf()?;
            if chunk.is_empty() {
                return Ok(if self.buf.is_empty() && !too_long {
                    None
                } else {
                    Some(!too_long)
                });
            }
            let (take, done) = match chunk.iter().position(|&c| c == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if !too_long {
                if self.buf.len() + take > MAX_LINE {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.input.consume(if done { take + 1 } else { take });
            if done {
                return Ok(Some(!too_long));
            }
        }
    }

    fn skip(&mut self, e: LineError) {
        self.skipped.lines += 1;
        if e == LineError::TooLong {
            self.skipped.too_long += 1;
        }
        if self.errors.len() < Self::KEPT_ERRORS {
            self.errors.push((self.line_no, e));
        }
    }
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = std::io::Result<Logged>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let fits = match self.next_line() {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            self.line_no += 1;
            if !fits {
                self.skip(LineError::TooLong);
                continue;
            }
            let text = match std::str::from_utf8(&self.buf) {
                Ok(t) => t.trim_end_matches('\r'),
                Err(_) => {
                    self.skip(LineError::NotText);
                    continue;
                }
            };
            if text.trim().is_empty() {
                continue;
            }
            match parse_line(text) {
                Ok(l) => return Some(Ok(l)),
                Err(e) => self.skip(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Frame {
        parse_frame(s, 0).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// The examples of can-utils `lib.h` (the comment above `parse_canframe`).
    #[test]
    fn can_utils_examples_known_answers() {
        let f = frame("123#DEADBEEF");
        assert_eq!(
            (f.id, f.extended, f.data()),
            (0x123, false, &[0xde, 0xad, 0xbe, 0xef][..])
        );
        let f = frame("5AA#");
        assert_eq!((f.id, f.data().len()), (0x5aa, 0));
        let f = frame("1F334455#11223344");
        assert_eq!(
            (f.id, f.extended, f.can_id()),
            (0x1f33_4455, true, 0x9f33_4455)
        );
        let f = frame("123#R");
        assert_eq!(f.kind, Kind::Remote { dlc: 0 });
        let f = frame("123#R7");
        assert_eq!((f.kind, f.can_id()), (Kind::Remote { dlc: 7 }, 0x4000_0123));
        let f = frame("123#11.22.33.44.55.66.77.88");
        assert_eq!(f.data(), &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        let f = frame("32345678#112233");
        assert!(f.is_error(), "32345678 has CAN_ERR_FLAG");
        assert_eq!(
            (f.kind, f.can_id()),
            (Kind::Error { class: 0x1234_5678 }, 0x3234_5678)
        );
        let f = frame("123##0112233");
        assert_eq!(
            (f.kind, f.data()),
            (Kind::Fd { flags: 0 }, &[0x11, 0x22, 0x33][..])
        );
        let f = frame("123##2112233");
        assert_eq!(f.kind, Kind::Fd { flags: 2 }, "CANFD_ESI");
        let f = frame("123#1122334455667788_E");
        assert_eq!((f.kind, f.dlc()), (Kind::Data { raw_dlc: Some(0xe) }, 0xe));
    }

    #[test]
    fn log_lines_parse_and_format_back() {
        for line in [
            "(1436509052.249713) vcan0 044#2A366C2BBA",
            "(0000000001.000001) can1 12345678#R",
            "(1.500000) vcan0 7FF##3000102030405060708090A0B",
            "(1.000000) vcan0 20000040#0000000000000000",
            "(1.000000) vcan0 123#1122334455667788_9",
        ] {
            let l = parse_line(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            let again = parse_line(&format_line(&l.iface, &l.frame)).unwrap();
            assert_eq!(again, l, "{line}");
        }
        let l = parse_line("(1436509052.249713) vcan0 044#2A366C2BBA").unwrap();
        assert_eq!(l.frame.ts_us, 1_436_509_052_249_713);
        assert_eq!(l.iface, "vcan0");
        assert_eq!(
            format_line(&l.iface, &l.frame),
            "(1436509052.249713) vcan0 044#2A366C2BBA"
        );
        // candump -x direction, nanosecond fractions.
        assert!(parse_line("(1.0 ) vcan0 044#").is_err());
        assert_eq!(
            parse_line("(1.123456789) vcan0 044# T")
                .unwrap()
                .frame
                .ts_us,
            1_123_456
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let cases: &[(&str, LineError)] = &[
            ("vcan0 044#00", LineError::Timestamp),
            ("(1) vcan0 044#00", LineError::Timestamp),
            ("(1.x) vcan0 044#00", LineError::Timestamp),
            ("(1.0)", LineError::Interface),
            ("(1.0) vcan0", LineError::NoFrame),
            ("(1.0) averyveryverylongname 044#00", LineError::Interface),
            (
                "(1.0) vcan0 800#00",
                LineError::Id("standard identifier over 0x7FF"),
            ),
            (
                "(1.0) vcan0 44#00",
                LineError::Id("3 or 8 hex digits before `#`"),
            ),
            ("(1.0) vcan0 G44#00", LineError::Id("not hex")),
            ("(1.0) vcan0 044", LineError::Id("no `#`")),
            (
                "(1.0) vcan0 E0000000#00",
                LineError::Id("error frame with other flag bits"),
            ),
            (
                "(1.0) vcan0 044#001",
                LineError::Data("odd number of hex digits"),
            ),
            (
                "(1.0) vcan0 044#0011223344556677889",
                LineError::Data("more bytes than the frame can carry"),
            ),
            (
                "(1.0) vcan0 044##0001122334455667788",
                LineError::Data("not a CAN FD length (0..8, 12, 16, 20, 24, 32, 48, 64)"),
            ),
            (
                "(1.0) vcan0 044#R9",
                LineError::Data("remote frame DLC over 8"),
            ),
            (
                "(1.0) vcan0 044#0011_E",
                LineError::Data("`_` DLC with fewer than 8 bytes"),
            ),
            ("(1.0) vcan0 044#00 X", LineError::Trailing),
        ];
        for (line, want) in cases {
            assert_eq!(parse_line(line).as_ref().err(), Some(want), "{line}");
        }
    }

    #[test]
    fn the_reader_skips_counts_and_bounds() {
        let long = "x".repeat(MAX_LINE * 3);
        let mut text =
            format!("(1.000000) vcan0 044#01\n\ngarbage\n{long}\n(2.000000) vcan0 044#02\r\n")
                .into_bytes();
        text.extend_from_slice(b"\xff\xfe\n(3.000000) vcan0 045#03");
        let mut r = Reader::new(std::io::BufReader::with_capacity(64, &text[..]));
        let got: Vec<u64> = r.by_ref().map(|l| l.unwrap().frame.ts_us).collect();
        assert_eq!(got, [1_000_000, 2_000_000, 3_000_000]);
        assert_eq!(
            r.skipped,
            Skipped {
                lines: 3,
                too_long: 1
            }
        );
        assert_eq!(r.errors[0], (3, LineError::Timestamp));
        assert_eq!(r.errors[1], (4, LineError::TooLong));
        assert_eq!(r.errors[2], (6, LineError::NotText));
        assert!(
            r.buf.capacity() <= MAX_LINE + 64,
            "held {} bytes",
            r.buf.capacity()
        );
    }
}
