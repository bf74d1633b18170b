//! COSE_Sign1 (RFC 9052) for FDO, on coset: ES256 with P-256 keys, ES384 with P-384 keys.
//!
//! FDO 1.1 signs with an empty external AAD, puts the algorithm in the protected header and
//! carries the signature as fixed-size `r || s`. Outpost signs strictly so; it verifies with
//! the algorithm of the *key* (the curve decides the hash), whatever the protected header
//! declares, because real devices declare ES384 while signing ES256 with a P-256 key.

use super::cbor::{self, Value};
use super::crypto::{Curve, SigningKey, VerifyingKey};
use super::FdoError;
use coset::{iana, AsCborValue, CoseSign1, CoseSign1Builder, Header, HeaderBuilder};

/// CBOR tag of COSE_Sign1.
pub const TAG_SIGN1: u64 = 18;

pub use coset::CoseSign1 as Sign1;

/// Whether the COSE_Sign1 tag (18) must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tagging {
    Required,
    Optional,
}

fn alg_for(curve: Curve) -> iana::Algorithm {
    match curve {
        Curve::P256 => iana::Algorithm::ES256,
        Curve::P384 => iana::Algorithm::ES384,
    }
}

/// Sign `payload` with the algorithm of `key`'s curve in the protected header and the
/// given unprotected header (FDO puts nonces and keys there in TO1/TO2).
pub fn sign(key: &SigningKey, payload: Vec<u8>, unprotected: Header) -> Result<Sign1, FdoError> {
    let protected = HeaderBuilder::new().algorithm(alg_for(key.curve())).build();
    Ok(CoseSign1Builder::new()
        .protected(protected)
        .unprotected(unprotected)
        .payload(payload)
        .try_create_signature(&[], |tbs| key.sign(tbs))?
        .build())
}

/// Encode, with or without tag 18.
pub fn encode(sign1: &Sign1, tagged: bool) -> Result<Vec<u8>, FdoError> {
    let v = sign1
        .clone()
        .to_cbor_value()
        .map_err(|e| FdoError::Crypto(format!("COSE_Sign1 encoding: {e}")))?;
    let v = if tagged {
        Value::Tag(TAG_SIGN1, Box::new(v))
    } else {
        v
    };
    Ok(cbor::encode(&v))
}

/// Decode a COSE_Sign1 of at most `max` bytes.
pub fn decode(
    bytes: &[u8],
    max: usize,
    tagging: Tagging,
    what: &'static str,
) -> Result<Sign1, FdoError> {
    let inner = match cbor::decode(bytes, max, what)? {
        Value::Tag(TAG_SIGN1, inner) => *inner,
        Value::Tag(t, _) => {
            return Err(FdoError::malformed(
                what,
                format!("tag {t} where COSE_Sign1 (18) was expected"),
            ))
        }
        other if tagging == Tagging::Optional => other,
        _ => return Err(FdoError::malformed(what, "COSE_Sign1 without tag 18")),
    };
    CoseSign1::from_cbor_value(inner).map_err(|e| FdoError::malformed(what, e.to_string()))
}

/// The algorithm the protected header declares, if any.
pub fn declared_alg(sign1: &Sign1) -> Option<i64> {
    match &sign1.protected.header.alg {
        Some(coset::RegisteredLabelWithPrivate::Assigned(a)) => Some(*a as i64),
        Some(coset::RegisteredLabelWithPrivate::PrivateUse(a)) => Some(*a),
        _ => None,
    }
}

/// Check the signature with `key` (empty external AAD).
pub fn verify(sign1: &Sign1, key: &VerifyingKey, what: &'static str) -> Result<(), FdoError> {
    let declared = declared_alg(sign1);
    if declared != Some(key.curve().cose_alg()) {
        tracing::debug!(
            ?declared,
            key = %key.curve(),
            "{what}: declared COSE algorithm does not match the key; verifying with the key's"
        );
    }
    sign1.verify_signature(&[], |sig, data| {
        if key.verify(data, sig) {
            Ok(())
        } else {
            Err(FdoError::BadSignature { what })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sign_encode_decode_verify() {
        for curve in [Curve::P256, Curve::P384] {
            let k = SigningKey::generate(curve).unwrap();
            let s = sign(&k, b"payload".to_vec(), Header::default()).unwrap();
            let bytes = encode(&s, true).unwrap();
            assert_eq!(bytes[0], 0xd2, "tag 18");
            let back = decode(&bytes, 4096, Tagging::Required, "t").unwrap();
            assert_eq!(declared_alg(&back), Some(curve.cose_alg()));
            assert_eq!(back.signature.len(), curve.signature_len());
            let vk = VerifyingKey::from_spki(&k.spki()).unwrap();
            verify(&back, &vk, "t").unwrap();
            let other = SigningKey::generate(curve).unwrap();
            let vk2 = VerifyingKey::from_spki(&other.spki()).unwrap();
            assert!(matches!(
                verify(&back, &vk2, "t"),
                Err(FdoError::BadSignature { .. })
            ));
            // Untagged is refused where the tag is required.
            let untagged = encode(&s, false).unwrap();
            assert!(decode(&untagged, 4096, Tagging::Required, "t").is_err());
            assert!(decode(&untagged, 4096, Tagging::Optional, "t").is_ok());
        }
    }

    #[test]
    fn a_wrong_declared_algorithm_is_tolerated() {
        // A P-256 key that declares ES384 (seen in the field).
        let k = SigningKey::generate(Curve::P256).unwrap();
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES384)
            .build();
        let s = CoseSign1Builder::new()
            .protected(protected)
            .payload(b"x".to_vec())
            .try_create_signature(&[], |tbs| k.sign(tbs))
            .unwrap()
            .build();
        let back = decode(&encode(&s, true).unwrap(), 4096, Tagging::Required, "t").unwrap();
        verify(&back, &VerifyingKey::from_spki(&k.spki()).unwrap(), "t").unwrap();
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, 4096, Tagging::Optional, "t");
        }
    }
}
