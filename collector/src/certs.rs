//! Development certificates: a CA, the collector's server certificate and one client
//! certificate per host, so nobody needs openssl to try phi-audit or run its tests.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What `init` wrote.
pub struct Written {
    pub ca: PathBuf,
    pub files: Vec<PathBuf>,
}

fn write(dir: &Path, name: &str, contents: &str, private: bool) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    let mode = if private { 0o600 } else { 0o644 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(path)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    anyhow::ensure!(
        ok,
        "{name:?} is not a usable host name (letters, digits, '-', '.', '_')"
    );
    Ok(())
}

/// Creates `ca.pem`/`ca.key`, `collector.pem`/`collector.key` (for `collector_names` plus
/// localhost and the loopback addresses) and `<host>.pem`/`<host>.key` for each host.
pub fn init(dir: &Path, hosts: &[String], collector_names: &[String]) -> anyhow::Result<Written> {
    for h in hosts.iter().chain(collector_names) {
        check_name(h)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = Vec::new();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "phi-audit development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = write(dir, "ca.pem", &ca_cert.pem(), false)?;
    files.push(write(dir, "ca.key", &ca_key.serialize_pem(), true)?);
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>,
                cn: &str,
                usage: ExtendedKeyUsagePurpose|
     -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };

    let mut server_names: Vec<String> = collector_names.to_vec();
    for n in ["localhost", "127.0.0.1", "::1"] {
        if !server_names.iter().any(|s| s == n) {
            server_names.push(n.to_owned());
        }
    }
    let cn = server_names[0].clone();
    let (pem, key) = leaf(server_names, &cn, ExtendedKeyUsagePurpose::ServerAuth)?;
    files.push(write(dir, "collector.pem", &pem, false)?);
    files.push(write(dir, "collector.key", &key, true)?);
    for host in hosts {
        let (pem, key) = leaf(
            vec![host.clone()],
            host,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        files.push(write(dir, &format!("{host}.pem"), &pem, false)?);
        files.push(write(dir, &format!("{host}.key"), &key, true)?);
    }
    Ok(Written { ca, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_ca_a_server_and_named_client_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = init(dir.path(), &["ehr-db-01".into()], &["collector".into()]).expect("init");
        assert!(w.ca.exists());
        let pem = std::fs::read_to_string(dir.path().join("ehr-db-01.pem")).expect("host cert");
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .expect("pem")
            .1
            .contents;
        let names = crate::tls::certificate_names(&der);
        assert!(names.contains(&"ehr-db-01".to_owned()), "{names:?}");
        let mode = std::fs::metadata(dir.path().join("ehr-db-01.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(init(dir.path(), &["bad name".into()], &[]).is_err());
    }
}
