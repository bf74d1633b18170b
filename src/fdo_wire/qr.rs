//! Vouchers on printed media: a QR code in a PNG image.
//!
//! A manufacturer prints the voucher of a device as a QR code
//! (`outpost voucher qr --voucher V.pem --out V.png`); the installer photographs or scans it
//! and imports the PNG (`outpost voucher import V.png`, recognised by the PNG signature).
//!
//! - Content: the voucher's CBOR in one byte-mode segment (the smallest form: PEM armour
//!   adds a third). On import the QR content may also be the PEM text. A P-256 voucher
//!   with a two-certificate device chain and one or two entries is about 1.5–2.5 KB; the
//!   largest QR code (version 40, error correction L) holds 2953 bytes.
//! - Encoding picks the smallest symbol that holds the voucher and, for that symbol, the
//!   strongest error correction that still fits; 4 pixels per module and the 4-module quiet
//!   zone of the standard, 8-bit greyscale PNG.
//! - Decoding is bounded before anything is allocated: the file ([`MAX_PNG_FILE`]), the
//!   image dimensions ([`MAX_DIMENSION`]) and the decoder's memory. Every failure is an
//!   error, never a panic: the decoders run under `catch_unwind` as a last line.

use super::voucher::OwnershipVoucher;
use super::FdoError;
use qrcode::bits::Bits;
use qrcode::types::{Color, Version};
use qrcode::{EcLevel, QrCode};

/// The PNG signature.
pub const PNG_MAGIC: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
/// Largest PNG file accepted (a phone photo of a label fits).
pub const MAX_PNG_FILE: usize = 16 * 1024 * 1024;
/// Largest width or height accepted, in pixels.
pub const MAX_DIMENSION: u32 = 4096;
/// Memory the PNG decoder may allocate.
const DECODER_MEMORY: usize = 80 * 1024 * 1024;
/// Capacity of the largest QR code (version 40-L) in byte mode.
pub const MAX_QR_BYTES: usize = 2953;
/// Pixels per module of the PNGs made here.
pub const DEFAULT_SCALE: u32 = 4;
const QUIET_ZONE: u32 = 4;

const WHAT: &str = "QR code image";

/// Whether `bytes` start with the PNG signature.
pub fn is_png(bytes: &[u8]) -> bool {
    bytes.starts_with(PNG_MAGIC)
}

fn bad(reason: impl Into<String>) -> FdoError {
    FdoError::malformed(WHAT, reason)
}

/// A voucher file: a PNG with a QR code, PEM armour or raw CBOR.
pub fn voucher_from_file_bytes(bytes: &[u8]) -> Result<OwnershipVoucher, FdoError> {
    if is_png(bytes) {
        voucher_from_png(bytes)
    } else {
        OwnershipVoucher::from_file_bytes(bytes)
    }
}

/// The voucher in the QR code of a PNG image (its content is the voucher's CBOR or PEM).
pub fn voucher_from_png(png: &[u8]) -> Result<OwnershipVoucher, FdoError> {
    let contents = decode_png(png)?;
    let mut first_err = None;
    for c in &contents {
        match OwnershipVoucher::from_file_bytes(c) {
            Ok(v) => return Ok(v),
            Err(e) => {
                first_err.get_or_insert((c, e));
            }
        }
    }
    match first_err {
        None => Err(bad("no readable QR code found in the image")),
        Some((c, e)) => Err(bad(format!(
            "the QR code does not carry an ownership voucher ({} bytes{}): {e}",
            c.len(),
            preview(c)
        ))),
    }
}

/// A short printable preview of QR content that is text.
fn preview(c: &[u8]) -> String {
    match std::str::from_utf8(c) {
        Ok(s) if !s.is_empty() => {
            let p: String = s.chars().take(40).collect();
            let more = if s.chars().count() > 40 { "…" } else { "" };
            format!(" of text: {:?}{more}", p)
        }
        _ => String::new(),
    }
}

/// The contents of every QR code found in a PNG image (possibly none).
pub fn decode_png(png: &[u8]) -> Result<Vec<Vec<u8>>, FdoError> {
    if png.len() > MAX_PNG_FILE {
        return Err(FdoError::TooLarge {
            what: "PNG image",
            len: png.len(),
            max: MAX_PNG_FILE,
        });
    }
    if !is_png(png) {
        return Err(bad("not a PNG image"));
    }
    let (w, h, grey) = caught("PNG decoder", || read_grey(png))??;
    caught("QR decoder", || {
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| grey[y * w + x]);
        let mut out = Vec::new();
        for grid in img.detect_grids() {
            let mut content = Vec::new();
            if grid.decode_to(&mut content).is_ok() {
                out.push(content);
            }
        }
        out
    })
}

/// Run a decoder; a panic in it (a bug on hostile input) becomes an error.
fn caught<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, FdoError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| bad(format!("{what} failed on this image")))
}

/// Decode a PNG to 8-bit luminance (alpha composed over white).
fn read_grey(png: &[u8]) -> Result<(usize, usize, Vec<u8>), FdoError> {
    use png::{ColorType, Transformations};
    let mut dec = png::Decoder::new_with_limits(
        std::io::Cursor::new(png),
        png::Limits {
            bytes: DECODER_MEMORY,
        },
    );
    dec.set_transformations(Transformations::EXPAND | Transformations::STRIP_16);
    dec.set_ignore_text_chunk(true);
    let mut reader = dec
        .read_info()
        .map_err(|e| bad(format!("unreadable PNG: {e}")))?;
    let (w, h) = reader.info().size();
    if w == 0 || h == 0 || w > MAX_DIMENSION || h > MAX_DIMENSION {
        return Err(bad(format!(
            "image of {w}x{h} pixels (at most {MAX_DIMENSION}x{MAX_DIMENSION})"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("image too large"))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(format!("unreadable PNG: {e}")))?;
    let channels = match info.color_type {
        ColorType::Grayscale => 1,
        ColorType::GrayscaleAlpha => 2,
        ColorType::Rgb => 3,
        ColorType::Rgba => 4,
        ColorType::Indexed => return Err(bad("indexed colours were not expanded")),
    };
    if info.bit_depth != png::BitDepth::Eight {
        return Err(bad(format!(
            "bit depth {:?} after expansion",
            info.bit_depth
        )));
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = info.line_size;
    if stride < w * channels || buf.len() < stride * h {
        return Err(bad("inconsistent PNG frame"));
    }
    let mut grey = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * stride..y * stride + w * channels];
        for px in row.chunks_exact(channels) {
            let (luma, alpha) = match channels {
                1 => (px[0] as u32, 255),
                2 => (px[0] as u32, px[1] as u32),
                3 => (luma(px), 255),
                _ => (luma(px), px[3] as u32),
            };
            // Transparent is paper: compose over white.
            grey.push(((luma * alpha + 255 * (255 - alpha)) / 255) as u8);
        }
    }
    Ok((w, h, grey))
}

fn luma(px: &[u8]) -> u32 {
    (299 * px[0] as u32 + 587 * px[1] as u32 + 114 * px[2] as u32) / 1000
}

/// The QR code for `data` in byte mode: the smallest version that holds it, with the
/// strongest error correction that fits in that version.
pub fn encode(data: &[u8]) -> Result<QrCode, FdoError> {
    if data.len() > MAX_QR_BYTES {
        return Err(FdoError::TooLarge {
            what: "voucher for a QR code (version 40-L, byte mode)",
            len: data.len(),
            max: MAX_QR_BYTES,
        });
    }
    for v in 1..=40 {
        for ec in [EcLevel::H, EcLevel::Q, EcLevel::M, EcLevel::L] {
            let mut bits = Bits::new(Version::Normal(v));
            if bits.push_byte_data(data).is_err() || bits.push_terminator(ec).is_err() {
                continue;
            }
            if let Ok(code) = QrCode::with_bits(bits, ec) {
                return Ok(code);
            }
        }
    }
    Err(FdoError::TooLarge {
        what: "voucher for a QR code (version 40-L, byte mode)",
        len: data.len(),
        max: MAX_QR_BYTES,
    })
}

/// A voucher as a PNG QR code (its CBOR), `scale` pixels per module (1–32).
pub fn voucher_png(v: &OwnershipVoucher, scale: u32) -> Result<(Vec<u8>, QrInfo), FdoError> {
    let data = v.encode();
    let code = encode(&data)?;
    let png = render_png(&code, scale)?;
    let info = QrInfo {
        bytes: data.len(),
        version: match code.version() {
            Version::Normal(n) | Version::Micro(n) => n,
        },
        ec: match code.error_correction_level() {
            EcLevel::L => 'L',
            EcLevel::M => 'M',
            EcLevel::Q => 'Q',
            EcLevel::H => 'H',
        },
        modules: code.width(),
    };
    Ok((png, info))
}

/// What [`voucher_png`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QrInfo {
    /// Bytes of content (the voucher's CBOR).
    pub bytes: usize,
    pub version: i16,
    pub ec: char,
    /// Modules per side.
    pub modules: usize,
}

/// Render a QR code as an 8-bit greyscale PNG with the standard quiet zone.
pub fn render_png(code: &QrCode, scale: u32) -> Result<Vec<u8>, FdoError> {
    if !(1..=32).contains(&scale) {
        return Err(bad(format!("scale {scale}: 1 to 32 pixels per module")));
    }
    let n = code.width() as u32;
    let side = (n + 2 * QUIET_ZONE) * scale;
    let colors = code.to_colors();
    let mut pixels = vec![255u8; (side * side) as usize];
    for (i, c) in colors.iter().enumerate() {
        if *c != Color::Dark {
            continue;
        }
        let (mx, my) = (i as u32 % n, i as u32 / n);
        for dy in 0..scale {
            let y = (my + QUIET_ZONE) * scale + dy;
            let x0 = ((mx + QUIET_ZONE) * scale) as usize;
            let row = (y * side) as usize;
            pixels[row + x0..row + x0 + scale as usize].fill(0);
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side, side);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| FdoError::Crypto(format!("PNG encoder: {e}")))?;
        w.write_image_data(&pixels)
            .map_err(|e| FdoError::Crypto(format!("PNG encoder: {e}")))?;
        w.finish()
            .map_err(|e| FdoError::Crypto(format!("PNG encoder: {e}")))?;
    }
    Ok(out)
}

/// A PNG of a QR code carrying arbitrary `data` (tests, and labels that are not vouchers).
pub fn data_png(data: &[u8], scale: u32) -> Result<Vec<u8>, FdoError> {
    render_png(&encode(data)?, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdo_wire::crypto::{Curve, SigningKey};
    use crate::fdo_wire::manufacturer::{DeviceOptions, Manufacturer};
    use proptest::prelude::*;

    fn voucher(curve: Curve, extend: usize) -> OwnershipVoucher {
        let dir = tempfile::tempdir().unwrap();
        let mfg = Manufacturer::open_or_create(dir.path(), curve).unwrap();
        let (_, mut v) = mfg
            .init_device(&DeviceOptions {
                device_info: "qr-test model-x sn:0001".into(),
                rv_info: Default::default(),
                curve,
            })
            .unwrap();
        let mut key =
            SigningKey::from_pem(&std::fs::read_to_string(mfg.key_path()).unwrap()).unwrap();
        for _ in 0..extend {
            let next = SigningKey::generate(curve).unwrap();
            let (pem, _) = crate::fdo_wire::crypto::make_cert(
                &next,
                &crate::fdo_wire::crypto::CertSpec {
                    common_name: "Outpost owner qr-test",
                    organization: "Outpost",
                    is_ca: false,
                    validity_days: 365,
                },
                None,
            )
            .unwrap();
            let (vk, cert) = crate::fdo_wire::crypto::public_key_from_pem(&pem).unwrap();
            let pk = crate::fdo_wire::PublicKey::encoded_like(
                &v.header().mfg_pub_key,
                &vk,
                cert.as_deref(),
            );
            v = v.extend(&key, &pk).unwrap();
            key = next;
        }
        v
    }

    #[test]
    fn vouchers_roundtrip_through_png() {
        for (curve, n) in [(Curve::P256, 1), (Curve::P256, 2), (Curve::P384, 1)] {
            let v = voucher(curve, n);
            let (png, info) = voucher_png(&v, DEFAULT_SCALE).unwrap();
            assert!(is_png(&png));
            assert_eq!(info.bytes, v.encode().len());
            let back = voucher_from_file_bytes(&png).unwrap();
            assert_eq!(back.encode(), v.encode(), "{curve} {n}: {info:?}");
        }
    }

    #[test]
    fn pem_content_is_accepted_and_other_content_refused() {
        let v = voucher(Curve::P256, 0);
        // PEM does not fit in 2953 bytes for every voucher, but a fresh one does.
        let pem = v.to_pem();
        let png = data_png(pem.as_bytes(), 2).unwrap();
        assert_eq!(voucher_from_png(&png).unwrap().guid(), v.guid());
        let png = data_png(b"https://example.com/not-a-voucher", 4).unwrap();
        let e = voucher_from_png(&png).unwrap_err().to_string();
        assert!(e.contains("does not carry an ownership voucher"), "{e}");
        assert!(e.contains("not-a-voucher"), "{e}");
    }

    #[test]
    fn images_without_a_code_and_broken_images_are_errors() {
        let blank = gray_png(64, 64, &[255; 64 * 64]);
        let e = voucher_from_png(&blank).unwrap_err().to_string();
        assert!(e.contains("no readable QR code"), "{e}");
        let good = data_png(b"hello", 4).unwrap();
        for cut in [8, 20, 40, good.len() / 2, good.len() - 13] {
            let e = voucher_from_png(&good[..cut]).unwrap_err().to_string();
            assert!(e.contains("QR code image"), "{cut}: {e}");
        }
        // Too large a canvas is refused before decoding.
        let mut out = Vec::new();
        let enc = png::Encoder::new(&mut out, MAX_DIMENSION + 1, 1);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&vec![255; (MAX_DIMENSION + 1) as usize])
            .unwrap();
        w.finish().unwrap();
        let e = voucher_from_png(&out).unwrap_err().to_string();
        assert!(e.contains("at most 4096x4096"), "{e}");
    }

    fn gray_png(w: u32, h: u32, pixels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(pixels).unwrap();
        wr.finish().unwrap();
        out
    }

    #[test]
    fn too_large_for_a_qr_code() {
        let e = match encode(&[0u8; MAX_QR_BYTES + 1]) {
            Ok(_) => panic!("too large a voucher was encoded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("2953"), "{e}");
        assert_eq!(
            encode(&[7u8; MAX_QR_BYTES]).unwrap().version(),
            Version::Normal(40)
        );
        assert_eq!(encode(b"hi").unwrap().error_correction_level(), EcLevel::H);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = voucher_from_file_bytes(&data);
            let mut png = PNG_MAGIC.to_vec();
            png.extend_from_slice(&data);
            let _ = voucher_from_png(&png);
        }

        #[test]
        fn mutated_pngs_never_panic(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
            cut in any::<usize>(),
        ) {
            let mut png = data_png(b"mutation test content", 2).unwrap();
            for (at, x) in flips {
                let i = at % png.len();
                png[i] ^= x;
            }
            let keep = 8 + cut % (png.len() - 7);
            png.truncate(keep);
            let _ = voucher_from_png(&png);
        }

        /// Valid PNGs of random pixels (noise, and blocks like modules) reach the QR
        /// detector itself.
        #[test]
        fn random_images_never_panic(
            side in 21u32..120,
            block in 1u32..6,
            seed in proptest::collection::vec(any::<u8>(), 64..512),
        ) {
            let n = (side * side) as usize;
            let pixels: Vec<u8> = (0..n)
                .map(|i| {
                    let (x, y) = (i as u32 % side / block, i as u32 / side / block);
                    let b = seed[((x * 31 + y * 17) as usize) % seed.len()];
                    if b & 1 == 0 { 0 } else { 255 }
                })
                .collect();
            let _ = voucher_from_png(&gray_png(side, side, &pixels));
        }
    }
}
