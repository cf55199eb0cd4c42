//! Optional TLS for the cluster's gRPC port, from the `cluster.tls_*` settings.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(path: &str) -> Result<Vec<u8>, crate::ClusterError> {
    std::fs::read(Path::new(path))
        .map_err(|e| crate::ClusterError::InvalidArgument(format!("{path}: {e}")))
}

/// The coordinator's TLS: its identity, and with a CA, mandatory client certificates.
/// `None` when no certificate is configured (plaintext).
pub fn server_config(
    cert: &str,
    key: &str,
    ca: &str,
) -> Result<Option<ServerTlsConfig>, crate::ClusterError> {
    if cert.is_empty() {
        return Ok(None);
    }
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if !ca.is_empty() {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(config))
}

/// A worker's TLS: the CA to verify the coordinator, and its own identity for mutual TLS.
/// `None` when no CA is configured (plaintext).
pub fn client_config(
    cert: &str,
    key: &str,
    ca: &str,
    domain: &str,
) -> Result<Option<ClientTlsConfig>, crate::ClusterError> {
    if ca.is_empty() {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if !domain.is_empty() {
        config = config.domain_name(domain);
    }
    if !cert.is_empty() {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(config))
}
