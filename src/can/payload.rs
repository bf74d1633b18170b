//! Bit fields in a classic CAN payload (a DBC signal's position: Intel little-endian or
//! Motorola big-endian "sawtooth" numbering) and the checksum families ECUs put in them.
//! A leaf: bytes in, numbers out; nothing allocates.

use serde::{Deserialize, Serialize};

/// Where a field sits in the (up to 8-byte) payload, ready to extract with one shift: the
/// payload is read as a `u64`, little-endian for Intel fields and big-endian for Motorola
/// ones, and the field is `len` bits from bit `shift` up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub big_endian: bool,
    pub shift: u8,
    pub len: u8,
    pub signed: bool,
    /// Payload bytes the field needs (a shorter payload does not carry it).
    pub bytes: u8,
}

impl Field {
    /// The field of a DBC signal: `start` as the DBC gives it (Intel: the least significant
    /// bit; Motorola: the most significant bit, in the sawtooth numbering). `None` if it does
    /// not fit in 8 bytes or has no bits.
    pub fn of_dbc(start: u16, len: u8, big_endian: bool, signed: bool) -> Option<Field> {
        if len == 0 || len > 64 || start > 63 {
            return None;
        }
        if big_endian {
            // Bit index from the first byte's most significant bit (0) on.
            let msb = (start / 8) * 8 + (7 - start % 8);
            let lsb = msb + u16::from(len) - 1;
            if lsb > 63 {
                return None;
            }
            Some(Field {
                big_endian,
                shift: (63 - lsb) as u8,
                len,
                signed,
                bytes: (lsb / 8 + 1) as u8,
            })
        } else {
            let end = start + u16::from(len);
            if end > 64 {
                return None;
            }
            Some(Field {
                big_endian,
                shift: start as u8,
                len,
                signed,
                bytes: end.div_ceil(8) as u8,
            })
        }
    }

    /// A whole byte or a nibble of byte `byte` (the fields learned without a DBC).
    pub fn bits_of_byte(byte: u8, lo_bit: u8, len: u8) -> Field {
        Field {
            big_endian: false,
            shift: byte * 8 + lo_bit,
            len,
            signed: false,
            bytes: byte + 1,
        }
    }

    fn word(&self, data: &[u8]) -> u64 {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        }
    }

    fn mask(&self) -> u64 {
        if self.len >= 64 {
            u64::MAX
        } else {
            (1u64 << self.len) - 1
        }
    }

    /// The field's raw bits (unsigned); `None` when the payload is too short for it.
    pub fn bits(&self, data: &[u8]) -> Option<u64> {
        if data.len() < usize::from(self.bytes) {
            return None;
        }
        Some((self.word(data) >> self.shift) & self.mask())
    }

    /// The raw value, sign-extended for a signed field.
    pub fn raw(&self, data: &[u8]) -> Option<i64> {
        let v = self.bits(data)?;
        if self.signed && self.len < 64 && v >> (self.len - 1) & 1 == 1 {
            Some((v | !self.mask()) as i64)
        } else {
            Some(v as i64)
        }
    }

    /// The payload with this field's bits cleared (a checksum is computed over that).
    pub fn cleared(&self, data: &[u8]) -> [u8; 8] {
        let w = self.word(data) & !(self.mask() << self.shift);
        let b = if self.big_endian {
            w.to_be_bytes()
        } else {
            w.to_le_bytes()
        };
        let mut out = [0u8; 8];
        let n = data.len().min(8);
        out[..n].copy_from_slice(&b[..n]);
        out
    }

    /// The payload bits this field covers, as a per-byte mask (8 bytes).
    pub fn byte_mask(&self) -> [u8; 8] {
        let m = self.mask() << self.shift;
        if self.big_endian {
            m.to_be_bytes()
        } else {
            m.to_le_bytes()
        }
    }
}

/// Checksum families seen on vehicle buses, each over the payload with the checksum field
/// cleared. The learner keeps the one (if any) that every training frame of an id satisfies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algo {
    /// Length + bytes + the identifier's bytes, mod 256 (Toyota, Subaru style).
    SumId,
    /// Sum of the bytes mod 256.
    Sum,
    /// XOR of the bytes.
    Xor,
    /// CRC-8 SAE J1850 (poly 0x1D, init and final XOR 0xFF).
    Crc8J1850,
    /// CRC-8 AUTOSAR (poly 0x2F, init and final XOR 0xFF).
    Crc8Autosar,
    /// Minus the sum of the nibbles of the identifier and the bytes, mod 16 (Honda style).
    Nibble,
}

pub const ALGOS: [Algo; 6] = [
    Algo::SumId,
    Algo::Sum,
    Algo::Xor,
    Algo::Crc8J1850,
    Algo::Crc8Autosar,
    Algo::Nibble,
];

const fn crc8_table(poly: u8) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u8;
        let mut k = 0;
        while k < 8 {
            c = if c & 0x80 != 0 {
                (c << 1) ^ poly
            } else {
                c << 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static J1850: [u8; 256] = crc8_table(0x1d);
static AUTOSAR: [u8; 256] = crc8_table(0x2f);

fn nibbles(mut v: u64) -> u64 {
    let mut s = 0;
    while v != 0 {
        s += v & 0xf;
        v >>= 4;
    }
    s
}

impl Algo {
    /// The checksum of `data` (the checksum field cleared) of identifier `id`.
    pub fn compute(self, data: &[u8], id: u32) -> u64 {
        match self {
            Algo::SumId => {
                let s: u64 = data.iter().map(|&b| u64::from(b)).sum::<u64>()
                    + data.len() as u64
                    + id.to_le_bytes().iter().map(|&b| u64::from(b)).sum::<u64>();
                s & 0xff
            }
            Algo::Sum => data.iter().map(|&b| u64::from(b)).sum::<u64>() & 0xff,
            Algo::Xor => u64::from(data.iter().fold(0u8, |x, &b| x ^ b)),
            Algo::Crc8J1850 => {
                u64::from(data.iter().fold(0xffu8, |c, &b| J1850[usize::from(c ^ b)]) ^ 0xff)
            }
            Algo::Crc8Autosar => u64::from(
                data.iter()
                    .fold(0xffu8, |c, &b| AUTOSAR[usize::from(c ^ b)])
                    ^ 0xff,
            ),
            Algo::Nibble => {
                let s = nibbles(u64::from(id))
                    + data.iter().map(|&b| nibbles(u64::from(b))).sum::<u64>();
                (16 - s % 16) % 16
            }
        }
    }

    /// Whether `data` of `id` carries this checksum in `field`.
    pub fn holds(self, field: &Field, data: &[u8], id: u32) -> bool {
        let Some(have) = field.bits(data) else {
            return false;
        };
        let clear = field.cleared(data);
        let n = data.len().min(8);
        let want = self.compute(&clear[..n], id) & field.mask();
        have == want
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intel_and_motorola_fields_extract_as_cantools_packs_them() {
        // Intel: start 12, 10 bits. 0x2AB << 12 in little-endian bytes.
        let f = Field::of_dbc(12, 10, false, false).unwrap();
        let v: u64 = 0x2ab << 12;
        assert_eq!(f.raw(&v.to_le_bytes()), Some(0x2ab));
        assert_eq!(f.bytes, 3);
        // Motorola: start 7 (MSB of byte 0), 16 bits: bytes 0..2 big-endian.
        let f = Field::of_dbc(7, 16, true, false).unwrap();
        assert_eq!(f.raw(&[0x12, 0x34, 0xff]), Some(0x1234));
        // Motorola: start 63 (byte 7 bit 7), 8 bits: the last byte (Toyota CHECKSUM).
        let f = Field::of_dbc(63, 8, true, false).unwrap();
        assert_eq!(f.raw(&[0, 0, 0, 0, 0, 0, 0, 0xab]), Some(0xab));
        // Motorola: start 3, 4 bits = low nibble of byte 0.
        let f = Field::of_dbc(3, 4, true, false).unwrap();
        assert_eq!(f.raw(&[0xa5]), Some(5));
        // Signed.
        let f = Field::of_dbc(0, 8, false, true).unwrap();
        assert_eq!(f.raw(&[0xfe]), Some(-2));
        // Too short a payload, and fields off the end.
        assert_eq!(
            Field::of_dbc(63, 8, true, false).unwrap().raw(&[0; 4]),
            None
        );
        assert!(Field::of_dbc(60, 8, false, false).is_none());
        assert!(Field::of_dbc(56, 16, true, false).is_none());
    }

    #[test]
    fn clearing_a_field_leaves_the_rest() {
        let f = Field::of_dbc(63, 8, true, false).unwrap();
        let d = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(f.cleared(&d), [1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(f.byte_mask(), [0, 0, 0, 0, 0, 0, 0, 0xff]);
        let f = Field::bits_of_byte(1, 4, 4);
        assert_eq!(f.cleared(&[0xff, 0xff]), [0xff, 0x0f, 0, 0, 0, 0, 0, 0]);
    }

    /// Known answers: CRC-8 SAE J1850 of "123456789" is 0x4B, CRC-8 AUTOSAR (0x2F) 0xDF
    /// (the AUTOSAR CRC library specification's check values); Toyota's sum: length + id
    /// bytes + data.
    #[test]
    fn checksums_match_known_answers() {
        assert_eq!(Algo::Crc8J1850.compute(b"123456789", 0), 0x4b);
        assert_eq!(Algo::Crc8Autosar.compute(b"123456789", 0), 0xdf);
        assert_eq!(
            Algo::SumId.compute(&[1, 2, 3], 0x2e4),
            (3 + 6 + 0xe4 + 2) & 0xff
        );
        assert_eq!(Algo::Xor.compute(&[0xf0, 0x0f, 0x01], 0), 0xfe);
        // Nibbles of 0x1a0 (1 + 10 + 0) and of 0x21 (2 + 1): 14, so 16 - 14 = 2.
        assert_eq!(Algo::Nibble.compute(&[0x21], 0x1a0), 2);
        let f = Field::of_dbc(63, 8, true, false).unwrap();
        let mut d = [9, 8, 7, 6, 5, 4, 3, 0];
        d[7] = Algo::SumId.compute(&d, 0x2e4) as u8;
        assert!(Algo::SumId.holds(&f, &d, 0x2e4));
        d[0] ^= 1;
        assert!(!Algo::SumId.holds(&f, &d, 0x2e4));
    }
}
