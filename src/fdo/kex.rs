//! TO2 key exchange (ECDH256, ECDH384) and the specification's KDF, on ring.
//!
//! Wire format of xAKeyExchange (owner, in TO2.ProveOVHdr) and xBKeyExchange (device, in
//! TO2.ProveDevice), as in the specification and go-fdo:
//!
//! ```text
//! u16be len(X) || X || u16be len(Y) || Y || u16be len(Random) || Random
//! ```
//!
//! Random is 16 bytes for ECDH256 and 48 for ECDH384. Outpost sends fixed-size coordinates
//! (32 or 48 bytes) and accepts shorter ones (go-fdo sends big-integer bytes without leading
//! zeros), left-padding them.
//!
//! `ShSe = Shx || OwnerRandom || DeviceRandom` (the random of xA, then of xB). The session
//! key is `KDF(ShSe)`: NIST SP 800-108 in counter mode with HMAC-SHA256 as PRF, one counter
//! byte, label `"FIDO-KDF"`, a zero byte, context `"AutomaticOnboardTunnel"`, and the output
//! length in bits as u16be. A128GCM and A256GCM (the only ciphers here) both use
//! HMAC-SHA256 (go-fdo's cipher table).

use super::FdoError;
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::rand::SystemRandom;

const LABEL: &[u8] = b"FIDO-KDF";
const CONTEXT: &[u8] = b"AutomaticOnboardTunnel";

/// Key exchange suite (`kexSuiteName`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KexSuite {
    Ecdh256,
    Ecdh384,
}

impl KexSuite {
    pub fn name(self) -> &'static str {
        match self {
            KexSuite::Ecdh256 => super::msg::KEX_ECDH256,
            KexSuite::Ecdh384 => super::msg::KEX_ECDH384,
        }
    }

    pub fn from_name(s: &str) -> Option<KexSuite> {
        match s {
            super::msg::KEX_ECDH256 => Some(KexSuite::Ecdh256),
            super::msg::KEX_ECDH384 => Some(KexSuite::Ecdh384),
            _ => None,
        }
    }

    fn alg(self) -> &'static agreement::Algorithm {
        match self {
            KexSuite::Ecdh256 => &agreement::ECDH_P256,
            KexSuite::Ecdh384 => &agreement::ECDH_P384,
        }
    }

    fn coord_len(self) -> usize {
        match self {
            KexSuite::Ecdh256 => 32,
            KexSuite::Ecdh384 => 48,
        }
    }

    fn random_len(self) -> usize {
        match self {
            KexSuite::Ecdh256 => 16,
            KexSuite::Ecdh384 => 48,
        }
    }
}

/// Cipher suite (`cipherSuiteName`, COSE algorithm numbers of FDO: A128GCM 1, A256GCM 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherSuite {
    A128Gcm,
    A256Gcm,
}

impl CipherSuite {
    /// The number sent in TO2.HelloDevice.
    pub fn id(self) -> i64 {
        match self {
            CipherSuite::A128Gcm => 1,
            CipherSuite::A256Gcm => 2,
        }
    }

    pub fn from_id(id: i64) -> Option<CipherSuite> {
        match id {
            1 => Some(CipherSuite::A128Gcm),
            // 3 is the COSE number of A256GCM; accepted as well.
            2 | 3 => Some(CipherSuite::A256Gcm),
            _ => None,
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            CipherSuite::A128Gcm => 16,
            CipherSuite::A256Gcm => 32,
        }
    }

    /// The COSE algorithm in the COSE_Encrypt0 protected header (A128GCM 1, A256GCM 3).
    pub fn cose_alg(self) -> i64 {
        match self {
            CipherSuite::A128Gcm => 1,
            CipherSuite::A256Gcm => 3,
        }
    }
}

/// One side of a key exchange: our ephemeral key and the parameter we send.
pub struct KexParty {
    suite: KexSuite,
    private: EphemeralPrivateKey,
    param: Vec<u8>,
}

impl std::fmt::Debug for KexParty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KexParty")
            .field("suite", &self.suite)
            .finish()
    }
}

/// A parsed exchange parameter.
struct Param {
    point: Vec<u8>,
    random: Vec<u8>,
}

fn take<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], FdoError> {
    let bad = || FdoError::malformed("KeyExchange", "truncated parameter");
    if b.len() < 2 {
        return Err(bad());
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    let rest = &b[2..];
    if rest.len() < n {
        return Err(bad());
    }
    let (v, r) = rest.split_at(n);
    *b = r;
    Ok(v)
}

fn pad(suite: KexSuite, v: &[u8]) -> Result<Vec<u8>, FdoError> {
    let n = suite.coord_len();
    if v.len() > n {
        return Err(FdoError::malformed(
            "KeyExchange",
            format!("coordinate of {} bytes for {}", v.len(), suite.name()),
        ));
    }
    let mut out = vec![0u8; n - v.len()];
    out.extend_from_slice(v);
    Ok(out)
}

fn parse(suite: KexSuite, mut b: &[u8]) -> Result<Param, FdoError> {
    let x = take(&mut b)?;
    let y = take(&mut b)?;
    let random = take(&mut b)?.to_vec();
    if !b.is_empty() {
        return Err(FdoError::malformed("KeyExchange", "trailing bytes"));
    }
    if random.len() < 16 || random.len() > 64 {
        return Err(FdoError::malformed(
            "KeyExchange",
            format!("random of {} bytes", random.len()),
        ));
    }
    let mut point = vec![0x04];
    point.extend_from_slice(&pad(suite, x)?);
    point.extend_from_slice(&pad(suite, y)?);
    Ok(Param { point, random })
}

fn put(v: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

impl KexParty {
    /// A fresh ephemeral key and random for `suite`.
    pub fn new(suite: KexSuite) -> Result<KexParty, FdoError> {
        let rng = SystemRandom::new();
        let private = EphemeralPrivateKey::generate(suite.alg(), &rng)
            .map_err(|_| FdoError::Crypto("ECDH key generation failed".into()))?;
        let public = private
            .compute_public_key()
            .map_err(|_| FdoError::Crypto("ECDH public key".into()))?;
        let point = public.as_ref();
        let n = suite.coord_len();
        let random = super::crypto::random_bytes(suite.random_len())?;
        let mut param = Vec::with_capacity(6 + 2 * n + random.len());
        put(&point[1..1 + n], &mut param);
        put(&point[1 + n..], &mut param);
        put(&random, &mut param);
        Ok(KexParty {
            suite,
            private,
            param,
        })
    }

    /// What we send (xA for the owner, xB for the device).
    pub fn param(&self) -> &[u8] {
        &self.param
    }

    pub fn suite(&self) -> KexSuite {
        self.suite
    }

    /// Complete the exchange with the peer's parameter; `we_are_owner` orders the randoms
    /// (owner's first). Returns the session encryption key (SEK) for `cipher`.
    pub fn finish(
        self,
        peer: &[u8],
        we_are_owner: bool,
        cipher: CipherSuite,
    ) -> Result<Vec<u8>, FdoError> {
        let ours = parse(self.suite, &self.param)?;
        let theirs = parse(self.suite, peer)?;
        let peer_key = UnparsedPublicKey::new(self.suite.alg(), theirs.point.clone());
        let shx = agreement::agree_ephemeral(self.private, &peer_key, |s| s.to_vec())
            .map_err(|_| FdoError::malformed("KeyExchange", "peer point is not on the curve"))?;
        let (a, b) = if we_are_owner {
            (&ours.random, &theirs.random)
        } else {
            (&theirs.random, &ours.random)
        };
        let mut shse = shx;
        shse.extend_from_slice(a);
        shse.extend_from_slice(b);
        Ok(kdf(&shse, cipher.key_len()))
    }
}

/// SP 800-108 counter-mode KDF with HMAC-SHA256 (FDO parameters), `len` bytes of output.
pub fn kdf(shse: &[u8], len: usize) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shse);
    let bits = ((len * 8) as u16).to_be_bytes();
    let mut out = Vec::with_capacity(len + 32);
    let mut i: u8 = 1;
    while out.len() < len {
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(&[i]);
        ctx.update(LABEL);
        ctx.update(&[0]);
        ctx.update(CONTEXT);
        ctx.update(&bits);
        out.extend_from_slice(ctx.sign().as_ref());
        i = i.wrapping_add(1);
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn both_sides_derive_the_same_key() {
        for (suite, cipher) in [
            (KexSuite::Ecdh256, CipherSuite::A128Gcm),
            (KexSuite::Ecdh384, CipherSuite::A256Gcm),
            (KexSuite::Ecdh256, CipherSuite::A256Gcm),
        ] {
            let owner = KexParty::new(suite).unwrap();
            let device = KexParty::new(suite).unwrap();
            let xa = owner.param().to_vec();
            let xb = device.param().to_vec();
            assert_eq!(xa.len(), 6 + 2 * suite.coord_len() + suite.random_len());
            let k1 = owner.finish(&xb, true, cipher).unwrap();
            let k2 = device.finish(&xa, false, cipher).unwrap();
            assert_eq!(k1, k2);
            assert_eq!(k1.len(), cipher.key_len());
        }
    }

    #[test]
    fn short_coordinates_are_padded_and_wrong_points_refused() {
        let owner = KexParty::new(KexSuite::Ecdh256).unwrap();
        let p = parse(KexSuite::Ecdh256, owner.param()).unwrap();
        // Re-encode X without its leading byte when it is zero: any shorter X parses.
        let mut short = Vec::new();
        put(&p.point[2..33], &mut short);
        put(&p.point[33..], &mut short);
        put(&p.random, &mut short);
        let q = parse(KexSuite::Ecdh256, &short).unwrap();
        assert_eq!(q.point.len(), 65);
        let device = KexParty::new(KexSuite::Ecdh256).unwrap();
        let mut bad = Vec::new();
        put(&[1; 32], &mut bad);
        put(&[2; 32], &mut bad);
        put(&[3; 16], &mut bad);
        assert!(device.finish(&bad, false, CipherSuite::A128Gcm).is_err());
    }

    #[test]
    fn kdf_is_the_counter_mode_construction() {
        // One block: HMAC-SHA256(ShSe, 01 || "FIDO-KDF" || 00 || "AutomaticOnboardTunnel" || 0080).
        let shse = [0x11u8; 48];
        let mut input = vec![1u8];
        input.extend_from_slice(b"FIDO-KDF");
        input.push(0);
        input.extend_from_slice(b"AutomaticOnboardTunnel");
        input.extend_from_slice(&[0x00, 0x80]);
        let want = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &shse),
            &input,
        );
        assert_eq!(kdf(&shse, 16), want.as_ref()[..16]);
        assert_eq!(kdf(&shse, 32).len(), 32);
        assert_eq!(kdf(&shse, 40).len(), 40);
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(KexSuite::Ecdh256, &bytes);
            let _ = parse(KexSuite::Ecdh384, &bytes);
        }
    }
}
