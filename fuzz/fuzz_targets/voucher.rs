//! Ownership voucher decoding (CBOR and PEM) and chain verification never panic, and a
//! decoded voucher re-encodes to bytes that decode to the same voucher.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::fdo_wire::OwnershipVoucher;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = OwnershipVoucher::from_file_bytes(data) {
        let _ = v.verify_chain();
        let _ = v.verify_hmac(&[0u8; 32]);
        let _ = v.device_public_key();
        let _ = outpost::fdo::report::voucher_report(&v, None, None);
        let bytes = v.encode();
        let again = OwnershipVoucher::decode(&bytes).expect("re-encoded voucher decodes");
        assert_eq!(again.encode(), bytes);
    }
});
