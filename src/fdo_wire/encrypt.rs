//! The TO2 tunnel after TO2.ProveDevice: every message body is a COSE_Encrypt0 (tag 16)
//! with AES-GCM (A128GCM or A256GCM) under the session key, a fresh random 12-byte IV in the
//! unprotected header (label 5), the algorithm in the protected header and an empty external
//! AAD (RFC 9052 Enc_structure "Encrypt0").
//!
//! Decryption is liberal about the envelope (tag 16 optional, IV in either header) and
//! strict about the cipher: the session's, whatever the header declares.

use super::cbor::{self, Value};
use super::kex::CipherSuite;
use super::FdoError;
use coset::{AsCborValue, CoseEncrypt0, CoseEncrypt0Builder, HeaderBuilder};
use ring::aead;

/// CBOR tag of COSE_Encrypt0.
pub const TAG_ENCRYPT0: u64 = 16;
const IV_LEN: usize = 12;
/// Largest encrypted message accepted.
pub const MAX_ENCRYPTED: usize = super::msg::MAX_MESSAGE + 1024;

/// The session cipher of one TO2 session.
pub struct SessionCipher {
    suite: CipherSuite,
    key: aead::LessSafeKey,
}

impl std::fmt::Debug for SessionCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCipher")
            .field("suite", &self.suite)
            .finish()
    }
}

fn alg(suite: CipherSuite) -> &'static aead::Algorithm {
    match suite {
        CipherSuite::A128Gcm => &aead::AES_128_GCM,
        CipherSuite::A256Gcm => &aead::AES_256_GCM,
    }
}

impl SessionCipher {
    pub fn new(suite: CipherSuite, sek: &[u8]) -> Result<SessionCipher, FdoError> {
        let key = aead::UnboundKey::new(alg(suite), sek)
            .map_err(|_| FdoError::Crypto(format!("session key of {} bytes", sek.len())))?;
        Ok(SessionCipher {
            suite,
            key: aead::LessSafeKey::new(key),
        })
    }

    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Encrypt a message body into a tagged COSE_Encrypt0.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, FdoError> {
        let iv = super::crypto::random_bytes(IV_LEN)?;
        let nonce = aead::Nonce::try_assume_unique_for_key(&iv)
            .map_err(|_| FdoError::Crypto("IV".into()))?;
        let protected = HeaderBuilder::new()
            .algorithm(match self.suite {
                CipherSuite::A128Gcm => coset::iana::Algorithm::A128GCM,
                CipherSuite::A256Gcm => coset::iana::Algorithm::A256GCM,
            })
            .build();
        let enc = CoseEncrypt0Builder::new()
            .protected(protected)
            .unprotected(HeaderBuilder::new().iv(iv).build())
            .try_create_ciphertext(plaintext, &[], |pt, aad| {
                let mut buf = pt.to_vec();
                self.key
                    .seal_in_place_append_tag(nonce, aead::Aad::from(aad), &mut buf)
                    .map(|_| buf)
                    .map_err(|_| FdoError::Crypto("AES-GCM seal".into()))
            })?
            .build();
        let v = enc
            .to_cbor_value()
            .map_err(|e| FdoError::Crypto(format!("COSE_Encrypt0 encoding: {e}")))?;
        Ok(cbor::encode(&Value::Tag(TAG_ENCRYPT0, Box::new(v))))
    }

    /// Decrypt a COSE_Encrypt0 message body.
    pub fn decrypt(&self, bytes: &[u8]) -> Result<Vec<u8>, FdoError> {
        const W: &str = "COSE_Encrypt0";
        let v = match cbor::decode(bytes, MAX_ENCRYPTED, W)? {
            Value::Tag(TAG_ENCRYPT0, inner) => *inner,
            Value::Tag(t, _) => {
                return Err(FdoError::malformed(
                    W,
                    format!("tag {t} where COSE_Encrypt0 (16) was expected"),
                ))
            }
            other => other,
        };
        let enc =
            CoseEncrypt0::from_cbor_value(v).map_err(|e| FdoError::malformed(W, e.to_string()))?;
        let iv = if !enc.unprotected.iv.is_empty() {
            enc.unprotected.iv.clone()
        } else {
            enc.protected.header.iv.clone()
        };
        if iv.len() != IV_LEN {
            return Err(FdoError::malformed(W, format!("IV of {} bytes", iv.len())));
        }
        let nonce = aead::Nonce::try_assume_unique_for_key(&iv)
            .map_err(|_| FdoError::malformed(W, "IV"))?;
        enc.decrypt_ciphertext(
            &[],
            || FdoError::malformed(W, "no ciphertext"),
            |ct, aad| {
                let mut buf = ct.to_vec();
                let pt = self
                    .key
                    .open_in_place(nonce, aead::Aad::from(aad), &mut buf)
                    .map_err(|_| FdoError::BadSignature {
                        what: "COSE_Encrypt0 (authentication tag)",
                    })?;
                Ok(pt.to_vec())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_tamper() {
        for (suite, len) in [(CipherSuite::A128Gcm, 16), (CipherSuite::A256Gcm, 32)] {
            let c = SessionCipher::new(suite, &vec![7u8; len]).unwrap();
            let ct = c.encrypt(b"hello").unwrap();
            assert_eq!(ct[0], 0xd0, "tag 16");
            assert_eq!(c.decrypt(&ct).unwrap(), b"hello");
            let mut bad = ct.clone();
            let n = bad.len();
            bad[n - 1] ^= 1;
            assert!(c.decrypt(&bad).is_err());
            let other = SessionCipher::new(suite, &vec![8u8; len]).unwrap();
            assert!(other.decrypt(&ct).is_err());
        }
    }

    proptest! {
        #[test]
        fn decrypt_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let c = SessionCipher::new(CipherSuite::A128Gcm, &[1u8; 16]).unwrap();
            let _ = c.decrypt(&bytes);
        }
    }
}
