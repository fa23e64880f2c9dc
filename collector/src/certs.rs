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

/// What `init` wrote and what it found and kept.
pub struct Written {
    pub ca: PathBuf,
    pub files: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
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

/// Both files of a certificate exist: keep them.
fn present(dir: &Path, stem: &str) -> Option<PathBuf> {
    let pem = dir.join(format!("{stem}.pem"));
    (pem.exists() && dir.join(format!("{stem}.key")).exists()).then_some(pem)
}

/// The CA found in `dir` (both `ca.pem` and `ca.key`), to issue more certificates with.
fn existing_ca(dir: &Path) -> anyhow::Result<Option<Issuer<'static, KeyPair>>> {
    let (pem_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    match (pem_path.exists(), key_path.exists()) {
        (false, false) => return Ok(None),
        (true, true) => {}
        (true, false) => anyhow::bail!(
            "{} exists without {}: restore the CA key, or remove ca.pem to create a new CA \
             (certificates it signed will then no longer be accepted)",
            pem_path.display(),
            key_path.display()
        ),
        (false, true) => anyhow::bail!(
            "{} exists without {}: restore the CA certificate, or remove ca.key to create a new CA",
            key_path.display(),
            pem_path.display()
        ),
    }
    let pem = std::fs::read_to_string(&pem_path)
        .with_context(|| format!("cannot read {}", pem_path.display()))?;
    let key = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key)
        .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&pem, key)
        .with_context(|| format!("{} is not a PEM CA certificate", pem_path.display()))?;
    Ok(Some(issuer))
}

/// Creates `ca.pem`/`ca.key`, `collector.pem`/`collector.key` (for `collector_names` plus
/// localhost and the loopback addresses) and `<host>.pem`/`<host>.key` for each host.
///
/// Files that already exist are kept: a second run with a new `--host` issues that host's
/// certificate from the same CA, and nothing already deployed is overwritten.
pub fn init(dir: &Path, hosts: &[String], collector_names: &[String]) -> anyhow::Result<Written> {
    for h in hosts.iter().chain(collector_names) {
        check_name(h)?;
    }
    for h in hosts {
        anyhow::ensure!(
            !matches!(h.as_str(), "ca" | "collector"),
            "{h:?} is reserved for the CA and collector files: choose another host name"
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = Vec::new();
    let mut kept = Vec::new();

    let issuer = match existing_ca(dir)? {
        Some(issuer) => {
            kept.push(dir.join("ca.pem"));
            issuer
        }
        None => new_ca(dir, &mut files)?,
    };
    let ca = dir.join("ca.pem");

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
    if let Some(pem) = present(dir, "collector") {
        kept.push(pem);
    } else {
        let (pem, key) = leaf(server_names, &cn, ExtendedKeyUsagePurpose::ServerAuth)?;
        files.push(write(dir, "collector.pem", &pem, false)?);
        files.push(write(dir, "collector.key", &key, true)?);
    }
    for host in hosts {
        if let Some(pem) = present(dir, host) {
            kept.push(pem);
            continue;
        }
        let (pem, key) = leaf(
            vec![host.clone()],
            host,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        files.push(write(dir, &format!("{host}.pem"), &pem, false)?);
        files.push(write(dir, &format!("{host}.key"), &key, true)?);
    }
    Ok(Written { ca, files, kept })
}

fn new_ca(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<Issuer<'static, KeyPair>> {
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
    files.push(write(dir, "ca.pem", &ca_cert.pem(), false)?);
    files.push(write(dir, "ca.key", &ca_key.serialize_pem(), true)?);
    Ok(Issuer::new(ca_params, ca_key))
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
        assert!(init(dir.path(), &["ca".into()], &[]).is_err());
    }

    #[test]
    fn a_second_run_keeps_the_ca_and_issues_only_new_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &["a".into()], &[]).expect("first");
        let read = |n: &str| std::fs::read(dir.path().join(n)).expect("file");
        let (ca, a) = (read("ca.pem"), read("a.pem"));
        let w = init(dir.path(), &["a".into(), "b".into()], &[]).expect("second");
        assert_eq!(read("ca.pem"), ca, "the CA was replaced");
        assert_eq!(read("a.pem"), a, "an issued certificate was replaced");
        assert!(w.kept.contains(&dir.path().join("a.pem")));
        assert!(w.files.contains(&dir.path().join("b.pem")));
        // b's certificate is signed by the kept CA.
        let ca_der = x509_parser::pem::parse_x509_pem(&ca)
            .expect("ca pem")
            .1
            .contents;
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("ca");
        let b_der = x509_parser::pem::parse_x509_pem(&read("b.pem"))
            .expect("b pem")
            .1
            .contents;
        let (_, b_cert) = x509_parser::parse_x509_certificate(&b_der).expect("b");
        b_cert
            .verify_signature(Some(ca_cert.public_key()))
            .expect("b is signed by the kept CA");

        std::fs::remove_file(dir.path().join("ca.key")).expect("rm");
        let err = init(dir.path(), &["c".into()], &[]).err().expect("refused");
        assert!(format!("{err:#}").contains("ca.key"), "{err:#}");
    }
}
