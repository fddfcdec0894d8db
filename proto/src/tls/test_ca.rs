//! A throwaway certificate authority for tests and `make demo` (feature `test-ca`): rcgen makes
//! a CA and certificates signed by it, valid for `localhost` and `127.0.0.1`, for servers and
//! clients alike. Never for production: the CA key lives in memory and the files are world-readable
//! in the directory given.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use super::{SubjectPattern, TlsFiles};

/// A CA whose certificate is `ca.pem` in its directory.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// The rcgen attribute type of a short name (`CN`, `OU`, `O`, `C`, `L`, `ST`).
fn dn_type(name: &str) -> Result<DnType, String> {
    Ok(match name {
        "CN" => DnType::CommonName,
        "OU" => DnType::OrganizationalUnitName,
        "O" => DnType::OrganizationName,
        "C" => DnType::CountryName,
        "L" => DnType::LocalityName,
        "ST" => DnType::StateOrProvinceName,
        other => return Err(format!("subject attribute {other} is not one the test CA writes")),
    })
}

impl TestCa {
    /// A new CA (subject `CN=<name>`), its certificate written to `dir/ca.pem`. Errors: key
    /// generation, signing or writing failed.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.pem"), issuer.pem())?;
        Ok(TestCa { issuer, dir: dir.to_path_buf() })
    }

    /// The CA bundle's path (`ca.pem`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate with `subject` (`KEY=VALUE,...`, e.g. `CN=prover-a,OU=workers`),
    /// valid for `localhost` and `127.0.0.1` as a server and as a client, written as
    /// `<file>.pem` and `<file>.key` beside the CA. Returns the files with this CA's bundle.
    pub fn issue(&self, file: &str, subject: &str) -> anyhow::Result<TlsFiles> {
        let pattern: SubjectPattern = subject.parse().map_err(anyhow::Error::msg)?;
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        for (k, v) in &pattern.0 {
            params.distinguished_name.push(dn_type(k).map_err(anyhow::Error::msg)?, v.as_str());
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = TlsFiles { cert: self.dir.join(format!("{file}.pem")), key: self.dir.join(format!("{file}.key")), ca: self.ca_path() };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
