//! Certificates for the TLS cells (`--encryption tls`): a throwaway CA and one certificate
//! per side, naming every address a destination listens on in the sweep (loopback and the
//! namespace pair's 198.18.0.2).

use std::path::Path;

/// The `popek run` arguments that turn TLS on, for each side.
pub struct Pki {
    pub source: Vec<String>,
    pub destination: Vec<String>,
}

impl Pki {
    pub fn issue(dir: &Path) -> Result<Pki, String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let e = |e: rcgen::Error| format!("cannot make test certificates: {e}");
        let ca_key = KeyPair::generate().map_err(e)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "migration-bench CA");
        let ca = ca_params.self_signed(&ca_key).map_err(e)?;
        let ca_path = write(dir, "ca.crt", &ca.pem())?;
        let names: Vec<String> = ["localhost", "127.0.0.1", "198.18.0.2"].map(String::from).to_vec();
        let side = |tag: &str| -> Result<Vec<String>, String> {
            let key = KeyPair::generate().map_err(e)?;
            let cert = CertificateParams::new(names.clone()).map_err(e)?.signed_by(&key, &ca, &ca_key).map_err(e)?;
            let cert_path = write(dir, &format!("{tag}.crt"), &cert.pem())?;
            let key_path = write(dir, &format!("{tag}.key"), &key.serialize_pem())?;
            Ok(["--tls-cert", &cert_path, "--tls-key", &key_path, "--tls-ca", &ca_path].map(String::from).to_vec())
        };
        Ok(Pki { source: side("src")?, destination: side("dst")? })
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String, String> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.display().to_string())
}
