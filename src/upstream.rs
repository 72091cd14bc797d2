//! The pooled upstream client: keep-alive HTTP/1.1 over TCP or rustls.
//!
//! Certificate verification is always on: the system roots, plus an optional CA bundle for
//! private gateways. The ring provider is used explicitly so the build pulls no second crypto
//! library.

use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::body::ProxyBody;
use crate::config::Config;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA bundle {path}: {source}")]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "no trusted root certificate: install the system CA certificates or set upstream.ca_file"
    )]
    NoRoots,
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

pub fn client(config: &Config) -> Result<UpstreamClient, TlsError> {
    let mut http = HttpConnector::new();
    // The https connector below decides the scheme; the TCP connector must not refuse https.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.timeouts.upstream_connect));

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(config)?)
        .with_no_client_auth();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);

    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.timeouts.upstream_idle)
        .build(connector))
}

/// System roots plus the configured bundle; none at all for a plain-http upstream.
fn roots(config: &Config) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if config.upstream.url.scheme != http::uri::Scheme::HTTPS {
        return Ok(roots);
    }
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "could not load some system root certificates");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &config.upstream.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::CaFile {
                path: path.clone(),
                source,
            })?;
        for cert in certs {
            roots.add(cert)?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}
