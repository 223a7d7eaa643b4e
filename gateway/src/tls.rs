//! TLS setup: the rustls server configuration from configured PEM files, or from a self-signed
//! certificate for the domain that is generated into the data dir on first start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use shared::config::Config;

/// Builds the server TLS configuration (TLS 1.2 and 1.3, ring provider, no client auth).
pub fn server_config(config: &Config) -> Result<Arc<ServerConfig>> {
    let (cert_path, key_path) = match (&config.tls_cert_path, &config.tls_key_path) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => generated_paths(config)?,
    };
    let certs = load_certs(&cert_path)?;
    let key = load_key(&key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "config key `tls_key_path`: {} does not match the certificate {}; \
                 give the key that belongs to the certificate",
                key_path.display(),
                cert_path.display()
            )
        })?;
    server.alpn_protocols = vec![b"xmpp-client".to_vec()];
    Ok(Arc::new(server))
}

/// Paths of the generated certificate, creating it on first start.
fn generated_paths(config: &Config) -> Result<(PathBuf, PathBuf)> {
    let dir = config.data_dir.join("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {}; check `data_dir`", dir.display()))?;
    let made = rcgen::generate_simple_self_signed(vec![config.domain.clone()])
        .context("generating a self-signed certificate")?;
    write_private(&key, made.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert, made.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    tracing::warn!(
        cert = %cert.display(),
        domain = %config.domain,
        "no TLS certificate configured: made a self-signed one; clients must accept it \
         (set tls_cert_path and tls_key_path for a real one)"
    );
    Ok((cert, key))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path).with_context(|| {
        format!(
            "config key `tls_cert_path`: cannot read {}; give a readable PEM file",
            path.display()
        )
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("config key `tls_cert_path`: {} is not PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "config key `tls_cert_path`: {} holds no certificate; give a PEM certificate chain",
            path.display()
        );
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data = std::fs::read(path).with_context(|| {
        format!(
            "config key `tls_key_path`: cannot read {}; give a readable PEM file",
            path.display()
        )
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .with_context(|| format!("config key `tls_key_path`: {} is not PEM", path.display()))?
        .with_context(|| {
            format!(
                "config key `tls_key_path`: {} holds no private key",
                path.display()
            )
        })
}
