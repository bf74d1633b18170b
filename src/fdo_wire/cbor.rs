//! CBOR for FDO: bounded decoding, deterministic encoding and raw item spans.
//!
//! - [`decode`] parses exactly one item into a [`ciborium`] `Value`. The input size is checked
//!   first, then a scan of the item's structure (nesting depth, truncation, reserved codes)
//!   runs before ciborium sees it; ciborium itself grows containers element by element, so a
//!   header that claims 2^60 elements allocates nothing. Trailing bytes are an error.
//! - [`encode`] writes the shortest (preferred) serialization with definite lengths: what
//!   FDO peers hash and sign must be reproducible, so encoding never depends on a library's
//!   choices and never fails.
//! - [`item_end`] and [`array_items`] give the exact bytes of items as received, so hashes
//!   that cover "the encoded previous entry" cover the very bytes that were signed.

use super::FdoError;
pub use ciborium::value::Value;

/// Deepest nesting accepted (tags count as a level). FDO structures nest about 6 deep.
pub const MAX_DEPTH: usize = 24;

/// Decode exactly one CBOR item that makes up all of `bytes` (at most `max` bytes).
pub fn decode(bytes: &[u8], max: usize, what: &'static str) -> Result<Value, FdoError> {
    if bytes.len() > max {
        return Err(FdoError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    let end = item_end(bytes, 0, what)?;
    if end != bytes.len() {
        return Err(FdoError::malformed(
            what,
            format!("{} bytes after the end of the item", bytes.len() - end),
        ));
    }
    let mut rd = bytes;
    ciborium::de::from_reader_with_recursion_limit::<Value, _>(&mut rd, MAX_DEPTH + 2).map_err(
        |e| match e {
            ciborium::de::Error::Io(_) => FdoError::Truncated { what },
            other => FdoError::malformed(what, other.to_string()),
        },
    )
}

/// The encoded form of a value (preferred serialization, definite lengths).
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(v, &mut out);
    out
}

/// Append the encoded form of `v` to `out`.
pub fn encode_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Integer(i) => {
            let n = i128::from(*i);
            if n >= 0 {
                write_head(0, n as u64, out);
            } else {
                write_head(1, (-1 - n) as u64, out);
            }
        }
        Value::Bytes(b) => {
            write_head(2, b.len() as u64, out);
            out.extend_from_slice(b);
        }
        Value::Text(s) => {
            write_head(3, s.len() as u64, out);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(items) => {
            write_head(4, items.len() as u64, out);
            for i in items {
                encode_into(i, out);
            }
        }
        Value::Map(pairs) => {
            write_head(5, pairs.len() as u64, out);
            for (k, v) in pairs {
                encode_into(k, out);
                encode_into(v, out);
            }
        }
        Value::Tag(tag, inner) => {
            write_head(6, *tag, out);
            encode_into(inner, out);
        }
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Null => out.push(0xf6),
        Value::Float(f) => {
            out.push(0xfb);
            out.extend_from_slice(&f.to_be_bytes());
        }
        // `Value` is non-exhaustive; FDO uses none of any future variant.
        _ => out.push(0xf7), // undefined
    }
}

/// Append an item head (major type and argument) in its shortest form.
pub fn write_head(major: u8, arg: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= u8::MAX as u64 {
        out.push(m | 24);
        out.push(arg as u8);
    } else if arg <= u16::MAX as u64 {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= u32::MAX as u64 {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

/// An item head: major type, argument, indefinite-length flag and the offset after it.
struct Head {
    major: u8,
    arg: u64,
    indefinite: bool,
    next: usize,
}

fn head(b: &[u8], pos: usize, what: &'static str) -> Result<Head, FdoError> {
    let ib = *b.get(pos).ok_or(FdoError::Truncated { what })?;
    let major = ib >> 5;
    let ai = ib & 0x1f;
    let start = pos + 1;
    let n = match ai {
        0..=23 => {
            return Ok(Head {
                major,
                arg: ai as u64,
                indefinite: false,
                next: start,
            })
        }
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        31 => {
            return match major {
                2..=5 | 7 => Ok(Head {
                    major,
                    arg: 0,
                    indefinite: true,
                    next: start,
                }),
                _ => Err(FdoError::malformed(
                    what,
                    format!("indefinite length on major type {major}"),
                )),
            }
        }
        _ => {
            return Err(FdoError::malformed(
                what,
                format!("reserved additional information {ai}"),
            ))
        }
    };
    let bytes = b
        .get(start..start + n)
        .ok_or(FdoError::Truncated { what })?;
    let mut arg = 0u64;
    for x in bytes {
        arg = (arg << 8) | *x as u64;
    }
    Ok(Head {
        major,
        arg,
        indefinite: false,
        next: start + n,
    })
}

/// Offset just past the CBOR item that starts at `pos`.
pub fn item_end(bytes: &[u8], pos: usize, what: &'static str) -> Result<usize, FdoError> {
    scan(bytes, pos, 0, what)
}

fn skip(b: &[u8], pos: usize, len: u64, what: &'static str) -> Result<usize, FdoError> {
    let len = usize::try_from(len).map_err(|_| FdoError::Truncated { what })?;
    let end = pos.checked_add(len).ok_or(FdoError::Truncated { what })?;
    if end > b.len() {
        return Err(FdoError::Truncated { what });
    }
    Ok(end)
}

fn scan(b: &[u8], pos: usize, depth: usize, what: &'static str) -> Result<usize, FdoError> {
    if depth > MAX_DEPTH {
        return Err(FdoError::malformed(what, "nested too deeply"));
    }
    let h = head(b, pos, what)?;
    let mut pos = h.next;
    match h.major {
        0 | 1 => Ok(pos),
        2 | 3 if h.indefinite => loop {
            // Chunks of the same major type with definite lengths, then a break.
            match b.get(pos) {
                None => return Err(FdoError::Truncated { what }),
                Some(0xff) => return Ok(pos + 1),
                Some(_) => {
                    let c = head(b, pos, what)?;
                    if c.major != h.major || c.indefinite {
                        return Err(FdoError::malformed(what, "bad chunk in indefinite string"));
                    }
                    pos = skip(b, c.next, c.arg, what)?;
                }
            }
        },
        2 | 3 => skip(b, pos, h.arg, what),
        4 | 5 => {
            let per = if h.major == 5 { 2 } else { 1 };
            if h.indefinite {
                loop {
                    match b.get(pos) {
                        None => return Err(FdoError::Truncated { what }),
                        Some(0xff) => return Ok(pos + 1),
                        Some(_) => {
                            for _ in 0..per {
                                pos = scan(b, pos, depth + 1, what)?;
                            }
                        }
                    }
                }
            } else {
                // Every item takes at least one byte, so this loop ends (with Truncated) after
                // at most `b.len()` rounds whatever the claimed count.
                for _ in 0..h.arg {
                    for _ in 0..per {
                        pos = scan(b, pos, depth + 1, what)?;
                    }
                }
                Ok(pos)
            }
        }
        6 => scan(b, pos, depth + 1, what),
        _ => {
            if h.indefinite {
                Err(FdoError::malformed(what, "unexpected break"))
            } else {
                Ok(pos)
            }
        }
    }
}

/// The raw encoded elements of the array that makes up all of `bytes`.
pub fn array_items<'a>(bytes: &'a [u8], what: &'static str) -> Result<Vec<&'a [u8]>, FdoError> {
    let h = head(bytes, 0, what)?;
    if h.major != 4 {
        return Err(FdoError::malformed(
            what,
            format!("expected an array, found major type {}", h.major),
        ));
    }
    let mut pos = h.next;
    let mut out = Vec::new();
    if h.indefinite {
        loop {
            match bytes.get(pos) {
                None => return Err(FdoError::Truncated { what }),
                Some(0xff) => {
                    pos += 1;
                    break;
                }
                Some(_) => {
                    let end = scan(bytes, pos, 1, what)?;
                    out.push(&bytes[pos..end]);
                    pos = end;
                }
            }
        }
    } else {
        for _ in 0..h.arg {
            let end = scan(bytes, pos, 1, what)?;
            out.push(&bytes[pos..end]);
            pos = end;
        }
    }
    if pos != bytes.len() {
        return Err(FdoError::malformed(
            what,
            format!("{} bytes after the end of the array", bytes.len() - pos),
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Typed accessors: each consumes the value and names the structure in its error.

/// A short name of the value's CBOR type, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Integer(_) => "integer",
        Value::Bytes(_) => "bstr",
        Value::Text(_) => "tstr",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Tag(..) => "tag",
        Value::Bool(_) => "bool",
        Value::Null => "null",
        Value::Float(_) => "float",
        _ => "simple value",
    }
}

fn unexpected(what: &'static str, want: &str, v: &Value) -> FdoError {
    FdoError::malformed(what, format!("expected {want}, found {}", kind(v)))
}

pub fn array(v: Value, what: &'static str) -> Result<Vec<Value>, FdoError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(unexpected(what, "an array", &other)),
    }
}

/// An array of exactly `N` items.
pub fn array_n<const N: usize>(v: Value, what: &'static str) -> Result<[Value; N], FdoError> {
    let a = array(v, what)?;
    let len = a.len();
    <[Value; N]>::try_from(a).map_err(|_| {
        FdoError::malformed(what, format!("expected an array of {N} items, found {len}"))
    })
}

pub fn bytes(v: Value, what: &'static str) -> Result<Vec<u8>, FdoError> {
    match v {
        Value::Bytes(b) => Ok(b),
        other => Err(unexpected(what, "a bstr", &other)),
    }
}

pub fn text(v: Value, what: &'static str) -> Result<String, FdoError> {
    match v {
        Value::Text(s) => Ok(s),
        other => Err(unexpected(what, "a tstr", &other)),
    }
}

pub fn uint(v: Value, what: &'static str) -> Result<u64, FdoError> {
    match v {
        Value::Integer(i) => {
            u64::try_from(i).map_err(|_| FdoError::malformed(what, "expected an unsigned integer"))
        }
        other => Err(unexpected(what, "an unsigned integer", &other)),
    }
}

pub fn int(v: Value, what: &'static str) -> Result<i64, FdoError> {
    match v {
        Value::Integer(i) => {
            i64::try_from(i).map_err(|_| FdoError::malformed(what, "integer out of range"))
        }
        other => Err(unexpected(what, "an integer", &other)),
    }
}

pub fn boolean(v: Value, what: &'static str) -> Result<bool, FdoError> {
    match v {
        Value::Bool(b) => Ok(b),
        other => Err(unexpected(what, "a bool", &other)),
    }
}

pub fn uint_value(n: u64) -> Value {
    Value::Integer(n.into())
}

pub fn int_value(n: i64) -> Value {
    Value::Integer(n.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shortest_form_heads() {
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (23, &[0x17]),
            (24, &[0x18, 24]),
            (255, &[0x18, 0xff]),
            (256, &[0x19, 1, 0]),
            (65536, &[0x1a, 0, 1, 0, 0]),
            (1 << 32, &[0x1b, 0, 0, 0, 1, 0, 0, 0, 0]),
        ];
        for (n, want) in cases {
            assert_eq!(encode(&uint_value(*n)), *want, "{n}");
        }
        assert_eq!(encode(&int_value(-16)), [0x2f]);
        assert_eq!(encode(&int_value(-43)), [0x38, 42]);
        assert_eq!(
            encode(&Value::Integer((-(1i128 << 64)).try_into().unwrap())),
            [0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn decode_rejects_trailing_truncated_deep_and_large() {
        assert!(matches!(
            decode(&[0x01, 0x02], 10, "t"),
            Err(FdoError::Malformed { .. })
        ));
        assert!(matches!(
            decode(&[0x82, 0x01], 10, "t"),
            Err(FdoError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[0x5a, 0xff, 0xff, 0xff, 0xff], 10, "t"),
            Err(FdoError::Truncated { .. })
        ));
        let deep = vec![0x81; 100];
        assert!(matches!(
            decode(&deep, 1000, "t"),
            Err(FdoError::Malformed { .. })
        ));
        assert!(matches!(
            decode(&[0u8; 11], 10, "t"),
            Err(FdoError::TooLarge { .. })
        ));
        // A huge claimed array length allocates nothing and fails as truncated.
        assert!(matches!(
            decode(
                &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00],
                100,
                "t"
            ),
            Err(FdoError::Truncated { .. })
        ));
        // Indefinite containers and strings are understood.
        let v = decode(
            &[0x9f, 0x01, 0x5f, 0x41, 0xaa, 0x41, 0xbb, 0xff, 0xff],
            100,
            "t",
        )
        .unwrap();
        assert_eq!(
            v,
            Value::Array(vec![uint_value(1), Value::Bytes(vec![0xaa, 0xbb])])
        );
    }

    #[test]
    fn array_items_gives_exact_spans() {
        let v = Value::Array(vec![
            uint_value(1),
            Value::Bytes(vec![1, 2, 3]),
            Value::Tag(18, Box::new(Value::Array(vec![Value::Null]))),
        ]);
        let bytes = encode(&v);
        let items = array_items(&bytes, "t").unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], [0x01]);
        assert_eq!(items[1], [0x43, 1, 2, 3]);
        assert_eq!(items[2], [0xd2, 0x81, 0xf6]);
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(int_value),
            any::<u64>().prop_map(uint_value),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            ".{0,20}".prop_map(Value::Text),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner.clone()), 0..4)
                    .prop_map(Value::Map),
                (6u64..100_000, inner).prop_map(|(t, v)| Value::Tag(t, Box::new(v))),
            ]
        })
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrip(v in arb_value()) {
            let bytes = encode(&v);
            prop_assert_eq!(item_end(&bytes, 0, "t").unwrap(), bytes.len());
            let back = decode(&bytes, 1 << 20, "t").unwrap();
            prop_assert_eq!(encode(&back), bytes);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, 1 << 20, "t");
            let _ = array_items(&bytes, "t");
        }
    }
}
