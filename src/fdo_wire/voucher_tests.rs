//! Voucher tests: every verification failure has its own error and decoders never panic. (A
//! voucher built by hand exactly per the specification's CDDL is read, verified and imported
//! in the tests of `fdo/owner.rs`.)

use super::*;
use crate::fdo_wire::credential::DeviceCredential;
use crate::fdo_wire::manufacturer::{DeviceOptions, Manufacturer};
use crate::fdo_wire::types::{RvDirective, RvProtocol};
use proptest::prelude::*;
use std::sync::OnceLock;

const DEVICE_INFO: &str = "sensor-XYZ-0001";

fn rv() -> RendezvousInfo {
    RendezvousInfo(vec![RvDirective::default()
        .with_dns("outpost.local")
        .with_dev_port(8041)
        .with_protocol(RvProtocol::Http)])
}

fn device(
    curve: Curve,
) -> (
    tempfile::TempDir,
    Manufacturer,
    DeviceCredential,
    OwnershipVoucher,
) {
    let dir = tempfile::tempdir().unwrap();
    let mfg = Manufacturer::open_or_create(dir.path(), curve).unwrap();
    let (cred, voucher) = mfg
        .init_device(&DeviceOptions {
            device_info: DEVICE_INFO.into(),
            rv_info: rv(),
            curve,
        })
        .unwrap();
    (dir, mfg, cred, voucher)
}

/// A P-256 voucher extended manufacturer -> A -> B -> C, with the keys (shared: keygen and
/// certificates are slow in debug builds).
struct Chain {
    secret: Vec<u8>,
    mfg: SigningKey,
    owners: Vec<SigningKey>,
    voucher: OwnershipVoucher,
}

fn chain() -> &'static Chain {
    static C: OnceLock<Chain> = OnceLock::new();
    C.get_or_init(|| {
        let (_dir, mfg, cred, mut v) = device(Curve::P256);
        let mfg_key = SigningKey::from_pkcs8_der(mfg.key().pkcs8_der()).unwrap();
        let owners: Vec<SigningKey> = (0..3)
            .map(|_| SigningKey::generate(Curve::P256).unwrap())
            .collect();
        let mut signer = &mfg_key;
        for o in &owners {
            v = v.extend(signer, &o.public_key()).unwrap();
            signer = o;
        }
        Chain {
            secret: cred.hmac_secret.clone(),
            mfg: mfg_key,
            owners,
            voucher: v,
        }
    })
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

/// Payload of a correct next entry for `v` (hashes right) naming `next`.
fn next_payload(v: &OwnershipVoucher, next: &PublicKey) -> OvEntryPayload {
    let prev = match v.entries.last() {
        Some(e) => e.raw.clone(),
        None => v.header_and_hmac(),
    };
    OvEntryPayload {
        hash_prev_entry: crypto::hash(HashAlg::Sha256, &[&prev]).unwrap(),
        hash_hdr_info: crypto::hash(HashAlg::Sha256, &[&v.header.hdr_info()]).unwrap(),
        extra: None,
        pub_key: next.clone(),
    }
}

fn push_entry(v: &OwnershipVoucher, signer: &SigningKey, p: OvEntryPayload) -> OwnershipVoucher {
    let mut v = v.clone();
    v.entries.push(OvEntry::sign(signer, p).unwrap());
    v
}

#[test]
fn a_manufactured_voucher_verifies_with_the_device_secret() {
    for curve in [Curve::P256, Curve::P384] {
        let (_d, mfg, cred, v) = device(curve);
        let c = v.verify_with_secret(&cred.hmac_secret).unwrap();
        assert!(c.owner_key.same_key(&mfg.public_key()));
        assert_eq!(c.guid, cred.guid);
        assert_eq!(v.hmac().alg, curve.hmac_alg());
        cred.check_manufacturer_key(&v.header().mfg_pub_key)
            .unwrap();
        assert_eq!(
            v.device_public_key().unwrap().unwrap().spki().unwrap(),
            cred.device_key.spki()
        );
        // CBOR and PEM round trips give the same bytes.
        let bytes = v.encode();
        assert_eq!(OwnershipVoucher::decode(&bytes).unwrap().encode(), bytes);
        let pem = v.to_pem();
        assert!(pem.starts_with("-----BEGIN OWNERSHIP VOUCHER-----\n"));
        assert_eq!(
            OwnershipVoucher::from_file_bytes(pem.as_bytes())
                .unwrap()
                .encode(),
            bytes
        );
        assert_eq!(
            OwnershipVoucher::from_file_bytes(&bytes).unwrap().encode(),
            bytes
        );
    }
}

#[test]
fn extended_vouchers_verify_and_name_the_last_owner() {
    let c = chain();
    let bytes = c.voucher.encode();
    let v = OwnershipVoucher::decode(&bytes).unwrap();
    assert_eq!(v.encode(), bytes, "entries are kept byte for byte");
    let vc = v.verify_with_secret(&c.secret).unwrap();
    assert_eq!(vc.keys.len(), 4);
    assert!(vc.keys[0].same_key(&c.mfg.public_key()));
    assert!(vc.owner_key.same_key(&c.owners[2].public_key()));
    assert!(v.owner_key().same_key(&c.owners[2].public_key()));
    for e in v.entries() {
        assert_eq!(e.payload().hash_prev_entry.alg, HashAlg::Sha256);
        assert_eq!(e.raw()[0], 0xd2, "entries are tagged COSE_Sign1");
    }
    // What a device reassembles from TO2 messages verifies the same way.
    let raw: Vec<Vec<u8>> = v.entries().iter().map(|e| e.raw().to_vec()).collect();
    let parts = OwnershipVoucher::from_parts(
        v.header_bytes().to_vec(),
        v.hmac().clone(),
        v.cert_chain().map(|c| c.to_vec()),
        &raw,
    )
    .unwrap();
    assert_eq!(parts.encode(), bytes);
    parts.verify_with_secret(&c.secret).unwrap();
    let mut reordered = raw.clone();
    reordered.swap(1, 2);
    let bad = OwnershipVoucher::from_parts(
        v.header_bytes().to_vec(),
        v.hmac().clone(),
        v.cert_chain().map(|c| c.to_vec()),
        &reordered,
    )
    .unwrap();
    assert!(matches!(
        bad.verify_chain(),
        Err(FdoError::BrokenChain { entry: 1 })
    ));
}

#[test]
fn p384_vouchers_use_sha384() {
    let (_d, mfg, cred, v) = device(Curve::P384);
    let o = SigningKey::generate(Curve::P384).unwrap();
    let v = v.extend(mfg.key(), &o.public_key()).unwrap();
    assert_eq!(
        v.entries()[0].payload().hash_prev_entry.alg,
        HashAlg::Sha384
    );
    v.verify_with_secret(&cred.hmac_secret).unwrap();
    // A P-256 next owner is refused: every key has the manufacturer key's type.
    let p256 = SigningKey::generate(Curve::P256).unwrap();
    assert!(matches!(
        v.extend(&o, &p256.public_key()),
        Err(FdoError::KeyTypeMismatch(_))
    ));
}

#[test]
fn only_the_current_owner_can_extend() {
    let c = chain();
    let next = SigningKey::generate(Curve::P256).unwrap();
    for wrong in [&c.mfg, &c.owners[0], &c.owners[1]] {
        assert!(matches!(
            c.voucher.extend(wrong, &next.public_key()),
            Err(FdoError::NotCurrentOwner { .. })
        ));
    }
    c.voucher.extend(&c.owners[2], &next.public_key()).unwrap();
}

#[test]
fn header_byte_flipped() {
    let c = chain();
    let mut bytes = c.voucher.encode();
    // Flip a byte of OVDeviceInfo inside OVHeaderTag: still a valid header.
    let at = find(&bytes, DEVICE_INFO.as_bytes());
    bytes[at] ^= 0x01;
    let v = OwnershipVoucher::decode(&bytes).unwrap();
    assert!(matches!(v.verify_chain(), Err(FdoError::HeaderAltered)));
    assert!(matches!(
        v.verify_hmac(&c.secret),
        Err(FdoError::HmacMismatch)
    ));
    assert!(matches!(
        v.extend(&c.owners[2], &c.mfg.public_key()),
        Err(FdoError::HeaderAltered)
    ));
    // A flip in the rendezvous info is caught the same way.
    let mut bytes = c.voucher.encode();
    let at = find(&bytes, b"outpost.local");
    bytes[at] = b'X';
    let v = OwnershipVoucher::decode(&bytes).unwrap();
    assert!(matches!(v.verify_chain(), Err(FdoError::HeaderAltered)));
    // A flip that breaks the header's structure is a decoding error naming the header.
    let mut bytes = c.voucher.encode();
    let at = find(&bytes, &c.voucher.header_bytes[..4]);
    bytes[at] = 0x84; // the OVHeader array claims 4 items instead of 6
    match OwnershipVoucher::decode(&bytes) {
        Err(FdoError::Malformed { what, .. }) => assert_eq!(what, "OVHeader"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn wrong_hmac() {
    // A consistent voucher whose HMAC was made under another secret: the chain verifies
    // (owners cannot tell), the device's check fails.
    let (_d, mfg, cred, v) = device(Curve::P256);
    let other = OwnershipVoucher::manufacture(
        v.header().clone(),
        HashAlg::HmacSha256,
        &[0x55; 32],
        v.cert_chain().map(|c| c.to_vec()),
    )
    .unwrap();
    let owner = SigningKey::generate(Curve::P256).unwrap();
    let other = other.extend(mfg.key(), &owner.public_key()).unwrap();
    other.verify_chain().unwrap();
    assert!(matches!(
        other.verify_with_secret(&cred.hmac_secret),
        Err(FdoError::HmacMismatch)
    ));
    // An HMAC replaced after the voucher was extended: entry 0 no longer covers it.
    let c = chain();
    let mut replaced = c.voucher.clone();
    replaced.hmac.value[0] ^= 0xff;
    let replaced = OwnershipVoucher::decode(&replaced.encode()).unwrap();
    assert!(matches!(
        replaced.verify_chain(),
        Err(FdoError::HeaderAltered)
    ));
    assert!(matches!(
        replaced.verify_hmac(&c.secret),
        Err(FdoError::HmacMismatch)
    ));
    // A plain hash where an HMAC belongs.
    let mut plain = c.voucher.clone();
    plain.hmac.alg = HashAlg::Sha256;
    assert!(matches!(
        plain.verify_hmac(&c.secret),
        Err(FdoError::Malformed { .. })
    ));
}

#[test]
fn broken_hash_chain() {
    let c = chain();
    let mut v = c.voucher.clone();
    v.entries.remove(1);
    let v = OwnershipVoucher::decode(&v.encode()).unwrap();
    assert!(matches!(
        v.verify_chain(),
        Err(FdoError::BrokenChain { entry: 1 })
    ));
    // An entry whose previous-entry hash is wrong but is correctly signed.
    let mut p = next_payload(&c.voucher, &c.mfg.public_key());
    p.hash_prev_entry.value[5] ^= 1;
    let v = push_entry(&c.voucher, &c.owners[2], p);
    assert!(matches!(
        v.verify_chain(),
        Err(FdoError::BrokenChain { entry: 3 })
    ));
}

#[test]
fn entry_signed_by_the_wrong_key() {
    let c = chain();
    let stranger = SigningKey::generate(Curve::P256).unwrap();
    let p = next_payload(&c.voucher, &stranger.public_key());
    // Signed by the previous owner instead of the current one.
    let v = push_entry(&c.voucher, &c.owners[1], p.clone());
    let v = OwnershipVoucher::decode(&v.encode()).unwrap();
    match v.verify_chain() {
        Err(FdoError::WrongSigner { entry: 3, signer }) => {
            assert!(signer.contains("entry 2"), "{signer}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // Entry 0 signed by someone other than the manufacturer.
    let (_d, _mfg, _cred, fresh) = device(Curve::P256);
    let p0 = next_payload(&fresh, &stranger.public_key());
    let v = push_entry(&fresh, &stranger, p0);
    match v.verify_chain() {
        Err(FdoError::WrongSigner { entry: 0, signer }) => {
            assert!(signer.contains("manufacturer"), "{signer}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // And the correct signer passes.
    push_entry(&c.voucher, &c.owners[2], p)
        .verify_chain()
        .unwrap();
}

#[test]
fn header_info_hash_must_match() {
    let c = chain();
    let mut p = next_payload(&c.voucher, &c.mfg.public_key());
    p.hash_hdr_info = crypto::hash(HashAlg::Sha256, &[b"other device"]).unwrap();
    let v = push_entry(&c.voucher, &c.owners[2], p);
    assert!(matches!(
        v.verify_chain(),
        Err(FdoError::HeaderInfoMismatch { entry: 3 })
    ));
}

#[test]
fn voucher_for_another_guid() {
    let c = chain();
    let other = Guid([0xab; 16]);
    match c.voucher.verify_for_guid(&other) {
        Err(FdoError::GuidMismatch { expected, found }) => {
            assert_eq!(expected, other);
            assert_eq!(found, c.voucher.guid());
        }
        r => panic!("unexpected {r:?}"),
    }
    c.voucher.verify_for_guid(&c.voucher.guid()).unwrap();
}

#[test]
fn device_cert_chain_must_match_its_hash() {
    let c = chain();
    let mut v = c.voucher.clone();
    if let Some(chain) = v.cert_chain.as_mut() {
        chain.swap(0, 1);
    }
    assert!(matches!(
        v.verify_chain(),
        Err(FdoError::CertChainHashMismatch)
    ));
    let mut v = c.voucher.clone();
    v.cert_chain = None;
    assert!(matches!(v.verify_chain(), Err(FdoError::CertChain(_))));
}

#[test]
fn truncated_and_random_cbor() {
    let bytes = chain().voucher.encode();
    for cut in [1, 2, 10, bytes.len() / 2, bytes.len() - 1] {
        match OwnershipVoucher::decode(&bytes[..cut]) {
            Err(FdoError::Truncated { .. }) => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        OwnershipVoucher::decode(&longer),
        Err(FdoError::Malformed { .. })
    ));
    assert!(matches!(
        OwnershipVoucher::decode(b"\x01\x02\x03"),
        Err(FdoError::Malformed { .. })
    ));
    assert!(matches!(
        OwnershipVoucher::from_file_bytes(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        ),
        Err(FdoError::Pem(_))
    ));
    let big = vec![0u8; MAX_VOUCHER + 1];
    assert!(matches!(
        OwnershipVoucher::decode(&big),
        Err(FdoError::TooLarge { .. })
    ));
    // A voucher of FDO 1.0 (protver 100).
    let mut old = bytes.clone();
    old[1..3].copy_from_slice(&[0x18, 100]);
    assert!(matches!(
        OwnershipVoucher::decode(&old),
        Err(FdoError::Version { found: 100, .. })
    ));
}

#[test]
fn error_codes_for_message_255() {
    use crate::fdo_wire::ErrorCode;
    assert_eq!(
        FdoError::HeaderAltered.error_code(),
        ErrorCode::InvalidOwnershipVoucher
    );
    assert_eq!(FdoError::Truncated { what: "x" }.error_code().code(), 100);
    assert_eq!(
        FdoError::GuidMismatch {
            expected: Guid([0; 16]),
            found: Guid([1; 16])
        }
        .error_code()
        .code(),
        5
    );
    assert_eq!(
        FdoError::BadSignature { what: "x" }.error_code().code(),
        101
    );
}

#[test]
fn cose_key_encoded_manufacturer_keys_are_copied() {
    // A manufacturer key in COSEKEY encoding: the next owner's key is encoded the same way.
    let (_d, mfg, cred, v) = device(Curve::P256);
    let cose_mfg = PublicKey::from_cose_key(&mfg.public_key().verifying_key().unwrap());
    let mut header = v.header().clone();
    header.mfg_pub_key = cose_mfg;
    let v2 = OwnershipVoucher::manufacture(
        header,
        HashAlg::HmacSha256,
        &cred.hmac_secret,
        v.cert_chain().map(|c| c.to_vec()),
    )
    .unwrap();
    let o = SigningKey::generate(Curve::P256).unwrap();
    let next = PublicKey::encoded_like(
        &v2.header().mfg_pub_key,
        &o.public_key().verifying_key().unwrap(),
        None,
    );
    assert_eq!(next.enc, crate::fdo_wire::types::pk_enc::COSEKEY);
    let v3 = v2.extend(mfg.key(), &next).unwrap();
    let v3 = OwnershipVoucher::decode(&v3.encode()).unwrap();
    assert!(v3
        .verify_with_secret(&cred.hmac_secret)
        .unwrap()
        .owner_key
        .same_key(&o.public_key()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(v) = OwnershipVoucher::decode(&bytes) {
            let _ = v.verify_chain();
        }
        let _ = OwnershipVoucher::from_file_bytes(&bytes);
        let _ = OvHeader::decode(&bytes);
        let _ = OvEntryPayload::decode(&bytes);
        let _ = OvEntry::decode(&bytes);
    }

    #[test]
    fn mutated_vouchers_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6)
    ) {
        let mut bytes = chain().voucher.encode();
        for (at, b, op) in edits {
            if bytes.is_empty() { break; }
            let i = at % bytes.len();
            match op {
                0 => bytes[i] = b,
                1 => { bytes.insert(i, b); }
                _ => { bytes.truncate(i); }
            }
        }
        if let Ok(v) = OwnershipVoucher::decode(&bytes) {
            let _ = v.verify_chain();
            let _ = v.verify_hmac(&[0; 32]);
            let _ = v.device_public_key();
            let _ = v.header().rv_info.to_string();
        }
    }
}
