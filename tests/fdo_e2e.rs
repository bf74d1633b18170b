//! FDO end to end over real HTTP servers on 127.0.0.1: a manufacturer makes a device and
//! its voucher, the voucher is extended to an owner, the owner registers at a rendezvous
//! server (TO0), the device finds its owner (TO1) and onboards (TO2), receiving an
//! operational certificate signed by the gateway CA. Then every way to cheat, each ending in
//! an FDO error 255 and no registration.

use outpost::ca::{Ca, CaHandle};
use outpost::config::CaConfig;
use outpost::fdo::client::{self, ClientError, DeviceOptions, Endpoint, Misbehave};
use outpost::fdo::http::{self, FdoServer};
use outpost::fdo::owner_service::{MemoryOwnerBackend, OwnerConfig, OwnerService};
use outpost::fdo::rendezvous::{MemoryRvStore, Rendezvous, RvConfig};
use outpost::fdo_wire::cbor::{self, Value};
use outpost::fdo_wire::crypto::{self, Curve, SigningKey};
use outpost::fdo_wire::manufacturer::{DeviceOptions as MfgOptions, Manufacturer};
use outpost::fdo_wire::msg::{self, transport, To2Addr};
use outpost::fdo_wire::types::{ErrorMessage, HashAlg, RendezvousInfo, RvDirective, RvProtocol};
use outpost::fdo_wire::voucher::{OvEntryPayload, OwnershipVoucher};
use outpost::fdo_wire::{DeviceCredential, ErrorCode};
use outpost::store::Store;
use std::sync::Arc;

struct Env {
    rv: Endpoint,
    owner: Endpoint,
    backend: Arc<MemoryOwnerBackend>,
    owner_key: Arc<SigningKey>,
    dir: tempfile::TempDir,
    _ca: CaHandle,
}

async fn bind() -> (tokio::net::TcpListener, Endpoint) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = Endpoint::from(l.local_addr().unwrap());
    (l, ep)
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let ca = Ca::open_or_create(
        &dir.path().join("ca"),
        "gw-test",
        &CaConfig::default(),
        store,
    )
    .unwrap();
    let (ca, _join) = CaHandle::spawn(ca).unwrap();
    let owner_key = Arc::new(SigningKey::generate(Curve::P256).unwrap());
    let owner_key384 = Arc::new(SigningKey::generate(Curve::P384).unwrap());
    let backend = Arc::new(MemoryOwnerBackend::new(vec![
        owner_key.clone(),
        owner_key384.clone(),
    ]));
    let (rv_l, rv) = bind().await;
    let (owner_l, owner) = bind().await;
    let rendezvous = Arc::new(Rendezvous::new(
        RvConfig::default(),
        Arc::new(MemoryRvStore::new(1000)),
        None,
    ));
    let service = Arc::new(OwnerService::new(
        OwnerConfig {
            mqtt_servers: vec![
                "mqtts://gw.local:8883".into(),
                "mqtts://cloud.example:8883".into(),
            ],
            ..Default::default()
        },
        backend.clone(),
        Some(Arc::new(ca.clone())),
    ));
    tokio::spawn(http::serve(
        rv_l,
        FdoServer {
            rendezvous: Some(rendezvous),
            owner: None,
            to1: None,
        },
        std::future::pending(),
    ));
    tokio::spawn(http::serve(
        owner_l,
        FdoServer {
            rendezvous: None,
            owner: Some(service),
            to1: None,
        },
        std::future::pending(),
    ));
    Env {
        rv,
        owner,
        backend,
        owner_key,
        dir,
        _ca: ca,
    }
}

impl Env {
    fn owner_key(&self, curve: Curve) -> Arc<SigningKey> {
        match curve {
            Curve::P256 => self.owner_key.clone(),
            Curve::P384 => self
                .backend
                .keys
                .iter()
                .find(|k| k.curve() == Curve::P384)
                .cloned()
                .unwrap(),
        }
    }

    fn manufacturer(&self, curve: Curve) -> Manufacturer {
        Manufacturer::open_or_create(&self.dir.path().join("mfg"), curve).unwrap()
    }

    /// A new device whose voucher is extended to our owner key.
    fn device(&self, curve: Curve) -> (DeviceCredential, OwnershipVoucher) {
        let mfg = self.manufacturer(curve);
        let rv_info = RendezvousInfo(vec![RvDirective::default()
            .with_ip("127.0.0.1".parse().unwrap())
            .with_dev_port(self.rv.port)
            .with_protocol(RvProtocol::Http)
            .with_delay_secs(5)]);
        let (cred, v) = mfg
            .init_device(&MfgOptions {
                device_info: "sensor-e2e".into(),
                rv_info,
                curve,
            })
            .unwrap();
        let v = v
            .extend(mfg.key(), &self.owner_key(curve).public_key())
            .unwrap();
        (cred, v)
    }

    fn addrs(&self) -> Vec<To2Addr> {
        vec![To2Addr {
            ip: Some("127.0.0.1".parse().unwrap()),
            dns: None,
            port: self.owner.port,
            protocol: transport::HTTP,
        }]
    }

    async fn to0(&self, v: &OwnershipVoucher) -> Result<u32, ClientError> {
        let key = self.owner_key(v.owner_key().curve().unwrap());
        client::to0_register(&self.rv, v, &key, self.addrs(), 3600).await
    }

    /// The voucher is ours and registered.
    async fn own(&self, v: &OwnershipVoucher) {
        self.backend.add_voucher(v.clone());
        assert_eq!(self.to0(v).await.unwrap(), 3600);
    }
}

fn peer_code(r: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match r {
        Err(ClientError::Peer { code, .. }) => code,
        other => panic!("expected an FDO error 255 from the server, got {other:?}"),
    }
}

/// Rebuild a voucher from its parts with the given raw entries.
fn assemble(v: &OwnershipVoucher, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    cbor::write_head(4, 5, &mut out);
    cbor::encode_into(&cbor::uint_value(101), &mut out);
    cbor::encode_into(&Value::Bytes(v.header_bytes().to_vec()), &mut out);
    cbor::encode_into(&v.hmac().to_value(), &mut out);
    match v.cert_chain() {
        Some(c) => cbor::encode_into(
            &Value::Array(c.iter().cloned().map(Value::Bytes).collect()),
            &mut out,
        ),
        None => out.push(0xf6),
    }
    cbor::write_head(4, entries.len() as u64, &mut out);
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_onboards_through_rendezvous_and_owner_and_gets_its_certificate() {
    let env = env().await;
    let (cred, v) = env.device(Curve::P256);
    env.own(&v).await;
    let done = client::onboard(&cred, &DeviceOptions::default())
        .await
        .unwrap();
    // New credentials.
    assert_eq!(done.old_guid, cred.guid);
    assert_ne!(done.credential.guid, cred.guid);
    let mqtt = done.mqtt.expect("operational credentials");
    assert_eq!(mqtt.client_id, done.credential.guid.hex());
    assert_eq!(
        mqtt.servers,
        vec!["mqtts://gw.local:8883", "mqtts://cloud.example:8883"]
    );
    // The certificate carries the device's own key and is signed by the gateway CA.
    let cert_der = crypto::cert_der_from_pem(&mqtt.cert_pem).unwrap();
    let ca_der = crypto::cert_der_from_pem(&mqtt.ca_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();
    let key = SigningKey::from_pem(&mqtt.key_pem).unwrap();
    assert_eq!(
        crypto::cert_public_key(&cert_der).unwrap().point(),
        key.public_point()
    );
    // The owner registered the device and keeps a voucher for its new GUID.
    let recs = env.backend.records();
    assert_eq!(recs.len(), 1);
    let rec = &recs[0];
    assert_eq!(rec.guid, done.credential.guid);
    assert_eq!(rec.old_guid, cred.guid);
    assert!(rec.cert_serial.is_some());
    assert!(rec
        .devmod
        .iter()
        .any(|(k, v)| k == "devmod:active" && v == "true"));
    let new_v = env.backend.voucher_for(&done.credential.guid).unwrap();
    new_v.verify_with_secret(&cred.hmac_secret).unwrap();
    done.credential
        .check_manufacturer_key(&new_v.header().mfg_pub_key)
        .unwrap();
    // The device onboards again with its new credentials (resale to the same owner).
    env.own(&new_v).await;
    let again = client::onboard(
        &done.credential,
        &DeviceOptions {
            mqtt: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(again.mqtt.is_none());
    assert_eq!(env.backend.records().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p384_device_uses_ecdh384_and_a256gcm() {
    let env = env().await;
    let (cred, v) = env.device(Curve::P384);
    env.own(&v).await;
    let done = client::onboard(&cred, &DeviceOptions::default())
        .await
        .unwrap();
    assert!(done.mqtt.is_some());
    // ECDH256 with A256GCM on the P-384 device works as well.
    let (cred, v) = env.device(Curve::P384);
    env.own(&v).await;
    client::onboard(
        &cred,
        &DeviceOptions {
            kex: Some(outpost::fdo_wire::kex::KexSuite::Ecdh256),
            cipher: Some(outpost::fdo_wire::kex::CipherSuite::A128Gcm),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(env.backend.records().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quirky_device_without_owner_module_completes() {
    // Declares ES384 while signing ES256 with a P-256 key, sends maxDeviceMessageSize 17,
    // supports no owner module.
    let env = env().await;
    let (cred, v) = env.device(Curve::P256);
    env.own(&v).await;
    let done = client::onboard(
        &cred,
        &DeviceOptions {
            declared_sig_type: Some(-35),
            max_device_message_size: 17,
            mqtt: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(done.mqtt.is_none());
    let recs = env.backend.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].cert_serial, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_vouchers_are_refused_by_rendezvous_and_owner() {
    let env = env().await;
    let opts = DeviceOptions::default();

    // Header byte flipped (in the device info).
    let (cred, v) = env.device(Curve::P256);
    let mut bytes = v.encode();
    let at = bytes.windows(10).position(|w| w == b"sensor-e2e").unwrap();
    bytes[at] ^= 0x01;
    let flipped = OwnershipVoucher::decode(&bytes).unwrap();
    assert_eq!(
        peer_code(env.to0(&flipped).await),
        ErrorCode::InvalidOwnershipVoucher.code()
    );
    env.backend.add_voucher(flipped);
    assert_eq!(
        peer_code(client::to2(&env.owner, &cred, None, &opts).await),
        ErrorCode::InvalidOwnershipVoucher.code()
    );

    // Broken chain: entry 1 of one chain on entry 0 of another.
    let mfg = env.manufacturer(Curve::P256);
    let (cred, v0) = {
        let mfg_opts = MfgOptions {
            device_info: "chain".into(),
            rv_info: RendezvousInfo::default(),
            curve: Curve::P256,
        };
        let (c, v) = mfg.init_device(&mfg_opts).unwrap();
        (c, v)
    };
    let k1 = SigningKey::generate(Curve::P256).unwrap();
    let k1b = SigningKey::generate(Curve::P256).unwrap();
    let a = v0
        .extend(mfg.key(), &k1.public_key())
        .unwrap()
        .extend(&k1, &env.owner_key.public_key())
        .unwrap();
    let b = v0.extend(mfg.key(), &k1b.public_key()).unwrap();
    let broken = OwnershipVoucher::decode(&assemble(
        &v0,
        &[b.entries()[0].raw().to_vec(), a.entries()[1].raw().to_vec()],
    ))
    .unwrap();
    assert_eq!(
        peer_code(env.to0(&broken).await),
        ErrorCode::InvalidOwnershipVoucher.code()
    );
    env.backend.add_voucher(broken);
    assert_eq!(
        peer_code(client::to2(&env.owner, &cred, None, &opts).await),
        ErrorCode::InvalidOwnershipVoucher.code()
    );

    // Entry signed by the wrong key: entry 1 signed by a stranger instead of k1.
    let one = v0.extend(mfg.key(), &k1.public_key()).unwrap();
    let e0 = one.entries()[0].raw().to_vec();
    let payload = OvEntryPayload {
        hash_prev_entry: crypto::hash(HashAlg::Sha256, &[&e0]).unwrap(),
        hash_hdr_info: crypto::hash(HashAlg::Sha256, &[&v0.header().hdr_info()]).unwrap(),
        extra: None,
        pub_key: env.owner_key.public_key(),
    };
    let stranger = SigningKey::generate(Curve::P256).unwrap();
    let forged = msg::SignedMsg::sign(
        &stranger,
        cbor::encode(&payload.to_value()),
        Default::default(),
    )
    .unwrap();
    let wrong_signer = OwnershipVoucher::decode(&assemble(&v0, &[e0, forged.raw.clone()])).unwrap();
    assert_eq!(
        peer_code(env.to0(&wrong_signer).await),
        ErrorCode::InvalidOwnershipVoucher.code()
    );
    env.backend.add_voucher(wrong_signer);
    assert_eq!(
        peer_code(client::to2(&env.owner, &cred, None, &opts).await),
        ErrorCode::InvalidOwnershipVoucher.code()
    );

    // Voucher for another GUID, stored under this device's GUID.
    let (cred_a, _) = env.device(Curve::P256);
    let (_, v_b) = env.device(Curve::P256);
    env.backend
        .vouchers
        .lock()
        .unwrap()
        .insert(cred_a.guid, v_b);
    assert_eq!(
        peer_code(client::to2(&env.owner, &cred_a, None, &opts).await),
        ErrorCode::InvalidGuid.code()
    );

    assert!(env.backend.records().is_empty(), "nothing registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_hmac_is_detected_by_the_device() {
    let env = env().await;
    let (cred, v) = env.device(Curve::P256);
    let mfg = env.manufacturer(Curve::P256);
    // The same header, MACed with another secret, then extended to us: the chain is valid.
    let other = OwnershipVoucher::manufacture(
        v.header().clone(),
        HashAlg::HmacSha256,
        &[9u8; 32],
        v.cert_chain().map(|c| c.to_vec()),
    )
    .unwrap()
    .extend(mfg.key(), &env.owner_key.public_key())
    .unwrap();
    env.own(&other).await;
    match client::onboard(&cred, &DeviceOptions::default()).await {
        Err(ClientError::Verify { code, .. }) => {
            assert_eq!(code, ErrorCode::InvalidOwnershipVoucher)
        }
        other => panic!("expected the device to refuse, got {other:?}"),
    }
    assert!(env.backend.records().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_with_the_wrong_key_is_refused() {
    let env = env().await;
    let (cred, v) = env.device(Curve::P256);
    env.own(&v).await;
    let mut bad = DeviceCredential::decode(&cred.encode()).unwrap();
    bad.device_key = SigningKey::generate(Curve::P256).unwrap();
    // TO1: the rendezvous server refuses the proof.
    let rv_err = client::to1(&env.rv, &bad, &DeviceOptions::default()).await;
    assert_eq!(peer_code(rv_err), ErrorCode::InvalidMessageError.code());
    // TO2: the owner refuses ProveDevice.
    let r = client::to2(&env.owner, &bad, None, &DeviceOptions::default()).await;
    assert_eq!(peer_code(r), ErrorCode::InvalidMessageError.code());
    assert!(env.backend.records().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_nonce_mismatch_are_refused() {
    let env = env().await;
    let (cred, v) = env.device(Curve::P256);
    env.own(&v).await;
    for m in [
        Misbehave::ReplayProveDevice,
        Misbehave::WrongProveDeviceNonce,
    ] {
        let r = client::onboard(
            &cred,
            &DeviceOptions {
                misbehave: Some(m),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(peer_code(r), ErrorCode::InvalidMessageError.code(), "{m:?}");
    }
    assert!(env.backend.records().is_empty());
    // The device still onboards afterwards.
    client::onboard(&cred, &DeviceOptions::default())
        .await
        .unwrap();
    assert_eq!(env.backend.records().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_random_and_unknown_messages_get_error_255() {
    let env = env().await;
    let (cred, v) = env.device(Curve::P256);
    env.own(&v).await;
    let hello = msg::HelloDevice {
        max_device_message_size: 0,
        guid: cred.guid,
        nonce: msg::Nonce([1; 16]),
        kex_suite: "ECDH256".into(),
        cipher_suite: 1,
        sig_info: outpost::fdo_wire::types::SigInfo::for_curve(Curve::P256),
    }
    .encode();
    let check = |r: client::HttpReply, code: ErrorCode, prev: u8| {
        assert_eq!(r.status, 500);
        assert_eq!(r.msg_type, Some(255));
        let e = ErrorMessage::decode(&r.body).unwrap();
        assert_eq!(e.code, code.code(), "{}", e.message);
        assert_eq!(e.prev_msg_id, prev);
        assert!(e.timestamp.is_some());
    };
    // Truncated HelloDevice.
    let r = client::post(&env.owner, 60, None, &hello[..hello.len() - 5])
        .await
        .unwrap();
    check(r, ErrorCode::MessageBodyError, 60);
    // Random bytes.
    let random = crypto::random_bytes(200).unwrap();
    let r = client::post(&env.owner, 60, None, &random).await.unwrap();
    check(r, ErrorCode::MessageBodyError, 60);
    let r = client::post(&env.rv, 30, None, &random).await.unwrap();
    check(r, ErrorCode::MessageBodyError, 30);
    // A TO0.OwnerSign without a session, and one with random CBOR.
    let r = client::post(&env.rv, 22, None, &random).await.unwrap();
    check(r, ErrorCode::InvalidJwtToken, 22);
    let hello0 = client::post(&env.rv, 20, None, &msg::to0_hello())
        .await
        .unwrap();
    assert_eq!(hello0.msg_type, Some(21));
    let r = client::post(&env.rv, 22, hello0.token.as_deref(), &random)
        .await
        .unwrap();
    check(r, ErrorCode::MessageBodyError, 22);
    // A device that is not registered.
    let (other, _) = env.device(Curve::P256);
    let r = client::to1(&env.rv, &other, &DeviceOptions::default()).await;
    assert_eq!(peer_code(r), ErrorCode::ResourceNotFound.code());
    // Messages of another protocol, or no message at all.
    let r = client::post(&env.owner, 22, None, &random).await.unwrap();
    check(r, ErrorCode::InvalidMessageError, 22);
    let r = client::post(&env.owner, 62, Some("nosuchtoken"), &[0x81, 0x00])
        .await
        .unwrap();
    check(r, ErrorCode::InvalidJwtToken, 62);
    assert!(env.backend.records().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_store_backend_registers_the_device_and_its_certificate() {
    use outpost::fdo::owner;
    use outpost::fdo::owner_backend::StoreOwnerBackend;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fdo");
    let store = Store::open(&dir.path().join("store")).unwrap();
    let ca = Ca::open_or_create(
        &dir.path().join("ca"),
        "gw-store",
        &CaConfig::default(),
        store.clone(),
    )
    .unwrap();
    let (ca, _join) = CaHandle::spawn(ca).unwrap();
    let ok = owner::current_or_create(&data, Curve::P256, "gw-store").unwrap();
    // One listener for both roles: the gateway is rendezvous and owner.
    let (l, ep) = bind().await;
    let mfg = Manufacturer::open_or_create(&dir.path().join("mfg"), Curve::P256).unwrap();
    let (cred, v) = mfg
        .init_device(&MfgOptions {
            device_info: "thermo".into(),
            rv_info: RendezvousInfo(vec![RvDirective::default()
                .with_ip("127.0.0.1".parse().unwrap())
                .with_dev_port(ep.port)
                .with_protocol(RvProtocol::Http)]),
            curve: Curve::P256,
        })
        .unwrap();
    let v = v.extend(mfg.key(), &ok.public_key()).unwrap();
    // Imported as a PEM file, like `outpost voucher import`.
    owner::import_voucher(&store, &data, v.to_pem().as_bytes()).unwrap();
    let backend =
        Arc::new(StoreOwnerBackend::open(store.clone(), &data, "gateway gw-store").unwrap());
    let service = Arc::new(OwnerService::new(
        OwnerConfig {
            mqtt_servers: vec!["mqtts://127.0.0.1:8883".into()],
            ..Default::default()
        },
        backend.clone(),
        Some(Arc::new(ca.clone())),
    ));
    tokio::spawn(http::serve(
        l,
        FdoServer {
            rendezvous: Some(Arc::new(Rendezvous::new(
                RvConfig::default(),
                Arc::new(MemoryRvStore::new(100)),
                None,
            ))),
            owner: Some(service),
            to1: None,
        },
        std::future::pending(),
    ));
    let addrs = vec![To2Addr {
        ip: Some("127.0.0.1".parse().unwrap()),
        dns: None,
        port: ep.port,
        protocol: transport::HTTP,
    }];
    client::to0_register(&ep, &v, &ok.key, addrs, 600)
        .await
        .unwrap();
    let done = client::onboard(&cred, &DeviceOptions::default())
        .await
        .unwrap();
    let mqtt = done.mqtt.unwrap();
    let reg = backend.registry().unwrap();
    assert_eq!(reg.len(), 1);
    assert_eq!(reg[0].guid, done.credential.guid.hex());
    assert_eq!(reg[0].old_guid, cred.guid.hex());
    assert_eq!(reg[0].owner_key_id, ok.key_id);
    assert!(reg[0].peer.as_deref().unwrap().starts_with("127.0.0.1:"));
    // The certificate is the CA's record for the new identity.
    let certs = ca.list().await.unwrap();
    let issued = certs
        .iter()
        .find(|c| c.device_id == done.credential.guid.hex())
        .unwrap();
    assert_eq!(Some(&issued.serial), reg[0].cert_serial.as_ref());
    assert_eq!(issued.key_source, "csr");
    assert_eq!(issued.cert_pem.trim(), mqtt.cert_pem.trim());
    // The replacement voucher is stored for the new GUID.
    assert!(store.voucher(&done.credential.guid.0).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_devices_onboard_concurrently() {
    let env = Arc::new(env().await);
    let mut devices = Vec::new();
    for _ in 0..32 {
        let (cred, v) = env.device(Curve::P256);
        env.own(&v).await;
        devices.push(cred);
    }
    let start = std::time::Instant::now();
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|cred| {
            tokio::spawn(async move {
                client::onboard(&cred, &DeviceOptions::default())
                    .await
                    .map(|o| o.mqtt.is_some())
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("32 concurrent onboardings (TO1 + TO2) in {secs:.2} s");
    assert_eq!(env.backend.records().len(), 32);
}
