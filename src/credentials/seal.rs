//! Sealing a rotated symmetric key to its holder alone: both sides make an ephemeral P-256
//! key for the one job (the holder's public half comes in its `in-progress` update, over its
//! own authenticated session), ECDH gives a shared secret, HKDF-SHA256 (salt: the job id;
//! info: `outpost credentials rotate v1`) a 256-bit key, and AES-256-GCM seals the new key
//! with the job id and the new key's id as associated data. Nobody but the holder, not even
//! the gateway after the fact, can open it: both private halves are gone when the job ends.
//!
//! A leaf: ring only.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

const INFO: &[u8] = b"outpost credentials rotate v1";
/// Largest secret sealed.
pub const MAX_SECRET: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{0}: not valid hex")]
    Hex(&'static str),
    #[error("the peer's public key is not a P-256 point")]
    BadPeerKey,
    #[error("the sealed key does not open (wrong holder, job or tampered)")]
    Open,
    #[error("the secret is empty or larger than {MAX_SECRET} bytes")]
    Size,
    #[error("the system random generator failed")]
    Random,
}

/// The sealed form of a secret, as it travels (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub epk: String,
    pub nonce: String,
    pub sealed: String,
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(shared: &[u8], job: &str) -> Result<LessSafeKey, SealError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, job.as_bytes()).extract(shared);
    let mut key = [0u8; 32];
    prk.expand(&[INFO], Len(32))
        .and_then(|okm| okm.fill(&mut key))
        .map_err(|_| SealError::Open)?;
    let k = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| SealError::Open)?;
    Ok(LessSafeKey::new(k))
}

fn aad(job: &str, new_id: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(job.len() + new_id.len() + 1);
    a.extend_from_slice(job.as_bytes());
    a.push(0);
    a.extend_from_slice(new_id.as_bytes());
    a
}

/// The holder's half: made when the rotate command arrives, kept until the key does.
pub struct Opener {
    key: EphemeralPrivateKey,
    /// The public half to send (uncompressed point, hex).
    pub public_hex: String,
}

impl Opener {
    pub fn new() -> Result<Opener, SealError> {
        let rng = SystemRandom::new();
        let key = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| SealError::Random)?;
        let public = key.compute_public_key().map_err(|_| SealError::Random)?;
        Ok(Opener {
            key,
            public_hex: hex::encode(public.as_ref()),
        })
    }

    /// Open the sealed key of `job` for `new_id`. Consumes the private half.
    pub fn open(self, job: &str, new_id: &str, s: &Sealed) -> Result<Vec<u8>, SealError> {
        let epk = hex::decode(&s.epk).map_err(|_| SealError::Hex("epk"))?;
        let nonce = hex::decode(&s.nonce).map_err(|_| SealError::Hex("nonce"))?;
        let mut data = hex::decode(&s.sealed).map_err(|_| SealError::Hex("sealed"))?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Hex("nonce"))?;
        let key = agreement::agree_ephemeral(
            self.key,
            &UnparsedPublicKey::new(&ECDH_P256, &epk),
            |shared| derive(shared, job),
        )
        .map_err(|_| SealError::BadPeerKey)??;
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(job, new_id)),
                &mut data,
            )
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

/// The gateway's half: seal `secret` to the holder's public key `holder_epk` (hex).
pub fn seal(job: &str, new_id: &str, holder_epk: &str, secret: &[u8]) -> Result<Sealed, SealError> {
    if secret.is_empty() || secret.len() > MAX_SECRET {
        return Err(SealError::Size);
    }
    let peer = hex::decode(holder_epk).map_err(|_| SealError::Hex("epk"))?;
    let rng = SystemRandom::new();
    let mine = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| SealError::Random)?;
    let public = mine.compute_public_key().map_err(|_| SealError::Random)?;
    let key = agreement::agree_ephemeral(mine, &UnparsedPublicKey::new(&ECDH_P256, &peer), |s| {
        derive(s, job)
    })
    .map_err(|_| SealError::BadPeerKey)??;
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
    let mut data = secret.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad(job, new_id)),
        &mut data,
    )
    .map_err(|_| SealError::Open)?;
    Ok(Sealed {
        epk: hex::encode(public.as_ref()),
        nonce: hex::encode(nonce),
        sealed: hex::encode(data),
    })
}

/// A fresh random secret of `len` bytes (a new symmetric key).
pub fn random_secret(len: usize) -> Result<Vec<u8>, SealError> {
    let mut k = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut k)
        .map_err(|_| SealError::Random)?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_holder_with_the_right_job_opens_it() {
        let secret = random_secret(32).unwrap();
        let holder = Opener::new().unwrap();
        let s = seal("job1", "k2", &holder.public_hex, &secret).unwrap();
        // Someone else's ephemeral key cannot open it.
        let other = Opener::new().unwrap();
        assert_eq!(other.open("job1", "k2", &s), Err(SealError::Open));
        // Nor under another job or key id.
        let holder2 = Opener::new().unwrap();
        let s2 = seal("job1", "k2", &holder2.public_hex, &secret).unwrap();
        assert_eq!(
            Opener { ..holder2 }.open("job2", "k2", &s2),
            Err(SealError::Open)
        );
        assert_eq!(holder.open("job1", "k2", &s).unwrap(), secret);
    }

    #[test]
    fn tampering_is_refused() {
        let holder = Opener::new().unwrap();
        let mut s = seal("j", "k", &holder.public_hex, b"0123456789abcdef").unwrap();
        let mut b = hex::decode(&s.sealed).unwrap();
        b[0] ^= 1;
        s.sealed = hex::encode(b);
        assert_eq!(holder.open("j", "k", &s), Err(SealError::Open));
        assert_eq!(
            seal("j", "k", "04zz", b"x").unwrap_err(),
            SealError::Hex("epk")
        );
        assert_eq!(
            seal("j", "k", "0401", b"x").unwrap_err(),
            SealError::BadPeerKey
        );
        assert_eq!(seal("j", "k", "0401", b"").unwrap_err(), SealError::Size);
    }
}
