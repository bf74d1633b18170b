//! The DBC format (Vector's CAN database), the part a detector needs: messages (`BO_`: id,
//! name, length, transmitter), their signals (`SG_`: position, byte order, sign, scale,
//! offset, range, unit, multiplexing), extra transmitters (`BO_TX_BU_`), nodes (`BU_`) and
//! the cycle time attribute (`BA_ "GenMsgCycleTime" BO_`). Everything else (comments, value
//! tables, attribute definitions, environment variables) is skipped, quoted strings over
//! several lines included. A leaf: text in, a [`Dbc`] or an error naming the line out.
//!
//! Real DBCs (opendbc's) are not all by the book; accepted on purpose: an identifier over
//! 11 bits without the extended flag (bit 31) is an extended id; names that start with a
//! digit; a message or signal name used twice (the later one wins for lookups); a bare `m`
//! as multiplexer indicator (multiplexed, value unknown: `Mux::When(u32::MAX)`). Messages
//! with bit 30 of the id set (Vector's `VECTOR__INDEPENDENT_SIG_MSG` pseudo-message, or no
//! CAN id at all) are skipped with their signals.

use super::payload::Field;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum DbcError {
    #[error("line {line}: {what}")]
    Syntax { line: usize, what: String },
    #[error("line {line}: a signal outside a message (SG_ before any BO_)")]
    Orphan { line: usize },
    #[error("no message in the DBC")]
    Empty,
}

/// Bit 31 of a DBC message id: the id is extended (29 bits).
pub const DBC_EXTENDED: u32 = 0x8000_0000;

#[derive(Debug, Clone, PartialEq)]
pub enum Mux {
    None,
    /// The multiplexor switch (`M`).
    Switch,
    /// Present when the switch has this value (`m3`; `m3M` too).
    When(u32),
}

/// What a signal is for the detector, by its name: a rolling counter, a checksum, or a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Value,
    Counter,
    Checksum,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub name: String,
    /// The DBC's start bit and length, byte order (`@0` Motorola is big-endian) and sign.
    pub start: u16,
    pub len: u8,
    pub big_endian: bool,
    pub signed: bool,
    pub scale: f64,
    pub offset: f64,
    pub min: f64,
    pub max: f64,
    pub unit: String,
    pub mux: Mux,
    /// `None` when the position does not fit in 8 bytes (then the signal is not checked).
    pub field: Option<Field>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: u32,
    pub extended: bool,
    pub name: String,
    pub len: u8,
    /// The transmitter node (`Vector__XXX` / `XXX`, meaning none, is `None`); `BO_TX_BU_`
    /// adds others.
    pub transmitters: Vec<String>,
    pub cycle_ms: Option<u32>,
    pub signals: Vec<Signal>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dbc {
    pub nodes: Vec<String>,
    pub messages: Vec<Message>,
}

fn upper_has(name: &str, words: &[&str]) -> bool {
    let u = name.to_ascii_uppercase();
    words.iter().any(|w| u.contains(w))
}

impl Signal {
    /// A counter: 2..=8 bits named like one (COUNTER, CNT, ALIVE, ROLLING, VW's BZ
    /// "Botschaftszähler", SEQ); a checksum: 4 or 8 bits named CHECKSUM, CHKSUM, CRC,
    /// PARITY or ending in `_CS`. Names are the only evidence a DBC gives.
    pub fn role(&self) -> Role {
        let u = self.name.to_ascii_uppercase();
        if (2..=8).contains(&self.len)
            && (upper_has(
                &u,
                &["COUNTER", "_CNT", "ALIVE", "ROLLING", "ZAEHLER", "SEQ"],
            ) || u.ends_with("CNT")
                || u.ends_with("_BZ")
                || u.starts_with("BZ"))
        {
            return Role::Counter;
        }
        if (self.len == 4 || self.len == 8)
            && (upper_has(&u, &["CHECKSUM", "CHKSUM", "CHK_SUM", "_CRC", "PARITY"])
                || u.starts_with("CRC")
                || u.ends_with("CRC")
                || u.ends_with("_CS"))
        {
            return Role::Checksum;
        }
        Role::Value
    }

    /// The physical value of a raw one.
    pub fn phys(&self, raw: i64) -> f64 {
        raw as f64 * self.scale + self.offset
    }
}

impl Dbc {
    pub fn message(&self, id: u32, extended: bool) -> Option<&Message> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.id == id && m.extended == extended)
    }
}

/// Tokens of one statement: words, numbers, punctuation `: | @ ( ) [ ] , ;` and quoted
/// strings (quotes removed).
fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            let mut q = String::from("\"");
            for d in chars.by_ref() {
                if d == '"' {
                    break;
                }
                q.push(d);
            }
            out.push(q);
        } else if c.is_whitespace() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if ":|@()[],;".contains(c) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.push(c.to_string());
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Cursor<'a> {
    t: &'a [String],
    i: usize,
    line: usize,
}

impl Cursor<'_> {
    fn err(&self, what: impl Into<String>) -> DbcError {
        DbcError::Syntax {
            line: self.line,
            what: what.into(),
        }
    }
    fn next(&mut self, what: &str) -> Result<&str, DbcError> {
        let t = self
            .t
            .get(self.i)
            .ok_or_else(|| self.err(format!("ends before {what}")))?;
        self.i += 1;
        Ok(t)
    }
    fn expect(&mut self, p: &str) -> Result<(), DbcError> {
        let t = self.next(&format!("'{p}'"))?.to_string();
        if t != p {
            return Err(self.err(format!("expected '{p}', found '{t}'")));
        }
        Ok(())
    }
    fn num<T: std::str::FromStr>(&mut self, what: &str) -> Result<T, DbcError> {
        let t = self.next(what)?.to_string();
        t.parse()
            .map_err(|_| self.err(format!("{what}: '{t}' is not a number")))
    }
    fn float(&mut self, what: &str) -> Result<f64, DbcError> {
        let v: f64 = self.num(what)?;
        if !v.is_finite() {
            return Err(self.err(format!("{what}: not finite")));
        }
        Ok(v)
    }
}

fn ident_ok(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('"') && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Bit 30 of a DBC message id: not a CAN id (Vector's pseudo-message for signals of no
/// message).
const PSEUDO: u32 = 0x4000_0000;

/// A message, or `None` for a pseudo-message (skipped).
fn parse_bo(c: &mut Cursor) -> Result<Option<Message>, DbcError> {
    c.expect("BO_")?;
    let raw: u64 = c.num("the message id")?;
    let raw = u32::try_from(raw).map_err(|_| c.err("the message id is over 32 bits"))?;
    if raw & PSEUDO != 0 {
        return Ok(None);
    }
    let name = c.next("the message name")?.to_string();
    if !ident_ok(&name) {
        return Err(c.err(format!("'{name}' is not a message name")));
    }
    c.expect(":")?;
    let len: u32 = c.num("the message length")?;
    if len > 64 {
        return Err(c.err(format!("message length {len} is over 64")));
    }
    let tx = c
        .next("the transmitter")
        .unwrap_or("Vector__XXX")
        .to_string();
    let (id, extended) = if raw & DBC_EXTENDED != 0 {
        (raw & !DBC_EXTENDED, true)
    } else {
        (raw, raw > 0x7ff)
    };
    if id > 0x1fff_ffff {
        return Err(c.err(format!("message id {raw:#x} is over 29 bits")));
    }
    let transmitters = if tx == "Vector__XXX" || tx == "XXX" {
        Vec::new()
    } else {
        vec![tx]
    };
    Ok(Some(Message {
        id,
        extended,
        name,
        len: len as u8,
        transmitters,
        cycle_ms: None,
        signals: Vec::new(),
    }))
}

fn parse_sg(c: &mut Cursor) -> Result<Signal, DbcError> {
    c.expect("SG_")?;
    let name = c.next("the signal name")?.to_string();
    if !ident_ok(&name) {
        return Err(c.err(format!("'{name}' is not a signal name")));
    }
    let mut mux = Mux::None;
    let t = c.next("':'")?.to_string();
    if t != ":" {
        if t == "M" {
            mux = Mux::Switch;
        } else if t == "m" {
            mux = Mux::When(u32::MAX);
        } else if let Some(v) = t.strip_prefix('m') {
            let v = v.trim_end_matches('M');
            mux = Mux::When(
                v.parse()
                    .map_err(|_| c.err(format!("'{t}' is not a multiplexer indicator")))?,
            );
        } else {
            return Err(c.err(format!("expected ':' after the signal name, found '{t}'")));
        }
        c.expect(":")?;
    }
    let start: u16 = c.num("the start bit")?;
    c.expect("|")?;
    let len: u16 = c.num("the signal length")?;
    if len == 0 || len > 64 {
        return Err(c.err(format!("signal length {len} is not 1..=64")));
    }
    c.expect("@")?;
    let order = c.next("the byte order")?.to_string();
    // The byte order and the sign come as one token ("1+", "0-") or two.
    // (Characters, not bytes: the token may be anything; found by the fuzz target.)
    let mut ch = order.chars();
    let (o, sign) = if let (Some(a), Some(b), None) = (ch.next(), ch.next(), ch.next()) {
        (a.to_string(), b.to_string())
    } else {
        (order, c.next("the sign")?.to_string())
    };
    let big_endian = match o.as_str() {
        "0" => true,
        "1" => false,
        x => return Err(c.err(format!("byte order '{x}' is not 0 or 1"))),
    };
    let signed = match sign.as_str() {
        "-" => true,
        "+" => false,
        x => return Err(c.err(format!("sign '{x}' is not + or -"))),
    };
    c.expect("(")?;
    let scale = c.float("the scale")?;
    c.expect(",")?;
    let offset = c.float("the offset")?;
    c.expect(")")?;
    c.expect("[")?;
    let min = c.float("the minimum")?;
    c.expect("|")?;
    let max = c.float("the maximum")?;
    c.expect("]")?;
    let unit =
        c.t.get(c.i)
            .filter(|u| u.starts_with('"'))
            .map(|u| u[1..].to_string())
            .unwrap_or_default();
    let field = if start <= 63 {
        Field::of_dbc(start, len as u8, big_endian, signed)
    } else {
        None
    };
    Ok(Signal {
        name,
        start,
        len: len as u8,
        big_endian,
        signed,
        scale,
        offset,
        min,
        max,
        unit,
        mux,
        field,
    })
}

/// Parse a DBC's text.
pub fn parse(text: &str) -> Result<Dbc, DbcError> {
    let mut dbc = Dbc::default();
    let mut lines = text.lines().enumerate().peekable();
    let mut cycle: Vec<(u32, u32)> = Vec::new();
    let mut tx: Vec<(u32, Vec<String>)> = Vec::new();
    // Inside a skipped pseudo-message: its signals go nowhere.
    let mut skipping = false;
    while let Some((n, line)) = lines.next() {
        let lineno = n + 1;
        let mut stmt = line.to_string();
        // A quoted string may run over several lines (comments): read on to its end.
        while stmt.matches('"').count() % 2 == 1 {
            match lines.next() {
                Some((_, more)) => {
                    stmt.push('\n');
                    stmt.push_str(more);
                }
                None => {
                    return Err(DbcError::Syntax {
                        line: lineno,
                        what: "a quoted string is not closed".into(),
                    })
                }
            }
        }
        let trimmed = stmt.trim_start();
        let first = trimmed.split_whitespace().next().unwrap_or("");
        let toks = match first {
            "BO_" | "SG_" | "BU_" | "BU_:" | "BA_" | "BO_TX_BU_" => tokens(trimmed),
            _ => continue,
        };
        if toks.len() == 1 {
            // A keyword alone: the new-symbols list (NS_) names them one a line.
            continue;
        }
        let mut c = Cursor {
            t: &toks,
            i: 0,
            line: lineno,
        };
        match first {
            "BO_" => match parse_bo(&mut c)? {
                Some(m) => {
                    dbc.messages.push(m);
                    skipping = false;
                }
                None => skipping = true,
            },
            "SG_" => {
                let s = parse_sg(&mut c)?;
                if skipping {
                    continue;
                }
                dbc.messages
                    .last_mut()
                    .ok_or(DbcError::Orphan { line: lineno })?
                    .signals
                    .push(s);
            }
            "BU_" | "BU_:" => {
                dbc.nodes = toks
                    .iter()
                    .filter(|t| *t != "BU_" && *t != ":" && ident_ok(t))
                    .cloned()
                    .collect();
            }
            // BA_ "GenMsgCycleTime" BO_ <id> <ms>;
            "BA_"
                if toks.get(1).map(String::as_str) == Some("\"GenMsgCycleTime")
                    && toks.get(2).map(String::as_str) == Some("BO_") =>
            {
                c.i = 3;
                let id: u64 = c.num("the message id")?;
                let ms: f64 = c.float("the cycle time")?;
                if (0.0..=u32::MAX as f64).contains(&ms) && ms > 0.0 {
                    cycle.push((id as u32, ms as u32));
                }
            }
            "BO_TX_BU_" => {
                c.i = 1;
                let id: u64 = c.num("the message id")?;
                c.expect(":")?;
                let names: Vec<String> = toks[c.i..]
                    .iter()
                    .filter(|t| ident_ok(t))
                    .cloned()
                    .collect();
                tx.push((id as u32, names));
            }
            _ => {}
        }
    }
    if dbc.messages.is_empty() {
        return Err(DbcError::Empty);
    }
    let key = |raw: u32| {
        if raw & DBC_EXTENDED != 0 {
            (raw & !DBC_EXTENDED, true)
        } else {
            (raw, raw > 0x7ff)
        }
    };
    for (raw, ms) in cycle {
        let (id, ext) = key(raw);
        for m in dbc
            .messages
            .iter_mut()
            .filter(|m| m.id == id && m.extended == ext)
        {
            m.cycle_ms = Some(ms);
        }
    }
    for (raw, names) in tx {
        let (id, ext) = key(raw);
        for m in dbc
            .messages
            .iter_mut()
            .filter(|m| m.id == id && m.extended == ext)
        {
            for n in &names {
                if !m.transmitters.contains(n) {
                    m.transmitters.push(n.clone());
                }
            }
        }
    }
    Ok(dbc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"VERSION ""

NS_ :
    CM_
    BA_
    BO_TX_BU_
    SG_MUL_VAL_

BS_:

BU_: ECM ABS XXX

BO_ 384 WHEEL_SPEEDS: 8 ABS
 SG_ WHEEL_SPEED_FL : 7|16@0+ (0.01,-67.67) [0|250] "kph" XXX
 SG_ COUNTER : 51|4@0+ (1,0) [0|15] "" XXX
 SG_ CHECKSUM : 63|8@0+ (1,0) [0|255] "" XXX

BO_ 2566844926 DM1: 8 Vector__XXX
 SG_ MODE M : 0|2@1+ (1,0) [0|3] "" XXX
 SG_ TEMP m1 : 8|8@1- (0.5,-40) [-50|80] "degC" ECM

BO_ 420 GEAR: 2 ECM

BO_ 3221225472 VECTOR__INDEPENDENT_SIG_MSG: 0 Vector__XXX
 SG_ LOOSE m : 0|8@1+ (1,0) [0|255] "" XXX

CM_ SG_ 384 WHEEL_SPEED_FL "front left;
still the comment BO_ 1 NOT_A_MESSAGE: 8 X";
BA_ "GenMsgCycleTime" BO_ 384 20;
BO_TX_BU_ 420 : ECM,TCM;
"#;

    #[test]
    fn messages_signals_cycle_times_and_transmitters() {
        let d = parse(SAMPLE).unwrap();
        assert_eq!(d.nodes, ["ECM", "ABS", "XXX"]);
        assert_eq!(d.messages.len(), 3);
        let m = &d.messages[0];
        assert_eq!(
            (m.id, m.extended, m.name.as_str(), m.len, m.cycle_ms),
            (384, false, "WHEEL_SPEEDS", 8, Some(20))
        );
        assert_eq!(m.transmitters, ["ABS"]);
        let s = &m.signals[0];
        assert_eq!(
            (s.start, s.len, s.big_endian, s.signed),
            (7, 16, true, false)
        );
        assert_eq!(
            (s.scale, s.offset, s.min, s.max),
            (0.01, -67.67, 0.0, 250.0)
        );
        assert_eq!(s.unit, "kph");
        assert_eq!(s.role(), Role::Value);
        assert_eq!(m.signals[1].role(), Role::Counter);
        assert_eq!(m.signals[2].role(), Role::Checksum);
        let j = &d.messages[1];
        assert_eq!((j.id, j.extended), (2_566_844_926 - 0x8000_0000, true));
        assert!(j.transmitters.is_empty());
        assert_eq!(j.signals[0].mux, Mux::Switch);
        assert_eq!(j.signals[1].mux, Mux::When(1));
        assert!(j.signals[1].signed);
        assert_eq!(d.messages[2].transmitters, ["ECM", "TCM"]);
        assert!(d.message(420, false).is_some());
        // The raw value of the big-endian speed: bytes 0..2.
        let f = s.field.unwrap();
        assert_eq!(f.raw(&[0x1a, 0x0b, 0, 0, 0, 0, 0, 0]), Some(0x1a0b));
        assert!((s.phys(0x1a0b) - (0x1a0b as f64 * 0.01 - 67.67)).abs() < 1e-9);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("BO_ 1 A: 8 X\n SG_ S : 7|16@2+ (1,0) [0|1] \"\" X\n").unwrap_err();
        assert_eq!(
            e,
            DbcError::Syntax {
                line: 2,
                what: "byte order '2' is not 0 or 1".into()
            }
        );
        assert_eq!(
            parse(" SG_ S : 0|1@1+ (1,0) [0|1] \"\" X\n").unwrap_err(),
            DbcError::Orphan { line: 1 }
        );
        let e = parse("BO_ x A: 8 X\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("not a number"), "{e}");
        let e = parse("BO_ 1 A: 8 X\n SG_ S : 0|99@1+ (1,0) [0|1] \"\" X\n").unwrap_err();
        assert!(e.to_string().contains("not 1..=64"), "{e}");
        assert!(matches!(
            parse("CM_ \"open\n"),
            Err(DbcError::Syntax { line: 1, .. })
        ));
        assert_eq!(parse("VERSION \"\"\n"), Err(DbcError::Empty));
        // A multi-byte character where the byte order is (cargo fuzz found this one).
        let e = parse("BO_ 1 A: 8 X\n SG_ S : 0|8@\u{7bf}+ (1,0) [0|1] \"\" X\n").unwrap_err();
        assert!(e.to_string().contains("byte order"), "{e}");
        let e = parse("BO_ 1 A: 8 X\n SG_ S : 0|8@1+ (1,0) [0|1e999] \"\" X\n").unwrap_err();
        assert!(
            e.to_string().contains("finite") || e.to_string().contains("number"),
            "{e}"
        );
    }
}
