//! Certificates made at test time with rcgen, for HTTPS tests against the
//! reference server on 127.0.0.1: a private certificate authority and a
//! server certificate it signed, valid for `localhost` and `127.0.0.1`.
//!
//! Include it from a test file with
//! `#[path = "support/tls.rs"] mod tls;` (from server/tests:
//! `#[path = "../../tests/support/tls.rs"]`). It needs the dev-dependency
//! `rcgen` (features `aws_lc_rs`, `pem`).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A test certificate authority and one server certificate it issued.
pub struct TestPki {
    /// The authority's certificate (PEM): what a client must trust.
    pub ca_pem: String,
    /// The server's certificate (PEM), for `localhost` and `127.0.0.1`.
    pub cert_pem: String,
    /// The server certificate's private key (PEM, PKCS#8).
    pub key_pem: String,
}

impl TestPki {
    /// A fresh authority and server certificate (new keys on every call, so
    /// two `TestPki`s do not trust each other).
    pub fn new() -> TestPki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: a client holding another test CA then finds
        // no issuer at all (UnknownIssuer), not a namesake whose signature fails.
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("edge-outbox test CA {}-{n}", std::process::id()),
        );
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().expect("server key");
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = server.signed_by(&key, &issuer).expect("server certificate");
        TestPki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}
