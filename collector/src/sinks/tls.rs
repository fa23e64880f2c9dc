//! Client TLS for the sinks: the receiver must present a certificate signed by the
//! configured CA; a client certificate is sent when one is configured.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};

use super::config::ClientTlsConfig;

pub fn client_config(c: &ClientTlsConfig, alpn: &[&[u8]]) -> anyhow::Result<Arc<ClientConfig>> {
    let ca =
        c.ca.as_ref()
            .context("`tls.ca` is missing: give the CA certificate that signs the receiver's")?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read `tls.ca` {}", ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("{} is not a PEM certificate", ca.display()))?)
            .with_context(|| format!("{} is not a usable CA", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots);
    let mut config = match (&c.client_cert, &c.client_key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("cannot read `tls.client_cert` {}", cert.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("{} is not a PEM private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("`tls.client_cert` and `tls.client_key` do not match")?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The name to check the receiver's certificate against.
pub fn server_name(configured: Option<&str>, host: &str) -> anyhow::Result<ServerName<'static>> {
    let name = configured.unwrap_or(host).to_owned();
    ServerName::try_from(name.clone())
        .with_context(|| format!("{name:?} is not a valid TLS server name (`tls.server_name`)"))
}
