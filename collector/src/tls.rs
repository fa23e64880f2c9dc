//! TLS for the collector: the server identity, the CA that client certificates must chain to,
//! and the names a verified client certificate carries.

use std::path::Path;

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

/// Server TLS that requires a client certificate signed by `client_ca`.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<ServerTlsConfig> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .client_ca_root(Certificate::from_pem(read(client_ca)?))
        .client_auth_optional(false))
}

/// The names a certificate (DER) is issued to: its DNS subject alternative names and its
/// common name.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str()
            && !names.iter().any(|n| n == s)
        {
            names.push(s.to_owned());
        }
    }
    names
}
