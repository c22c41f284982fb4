//! A test CA and a `localhost` certificate it signed (rcgen), for the
//! HTTPS servers the tests stand up (a BMC, a Kubernetes API server).

/// PEM texts of a CA, and of a `localhost` certificate and its key.
pub struct LocalhostCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new CA named `ca_name` and a `localhost` certificate it signed.
pub fn localhost_cert(ca_name: &str) -> LocalhostCert {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap_or_else(|e| panic!("CA params: {e}"));
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .unwrap_or_else(|e| panic!("CA certificate: {e}"));
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap_or_else(|e| panic!("certificate params: {e}"));
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
    let cert = params
        .signed_by(&key, &issuer)
        .unwrap_or_else(|e| panic!("certificate: {e}"));
    LocalhostCert {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}
