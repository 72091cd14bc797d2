//! TLS termination downstream (`[tls]`): rustls, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, and
//! optionally client certificates from one CA (mutual TLS).
//!
//! Certificates are reloaded when their files change, as well as on SIGHUP: Kubernetes updates
//! a mounted Secret by swapping a `..data` symlink, which no signal announces, so the files are
//! re-read when their directory changes ([`crate::watch`]) and every `reload_interval`, and
//! swapped in when their contents differ. A file that fails to load keeps what is in force and
//! says why, once for the same bytes. Handshakes in progress keep the configuration they started
//! with; only new ones get the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// `[tls]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key_file: PathBuf,
    /// PEM CA bundle: when set, every client must present a certificate issued by it.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// A TLS handshake must complete within this.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub handshake_timeout: Duration,
    /// How often the files are re-read for changes.
    #[serde(
        default = "default_reload_interval",
        deserialize_with = "crate::config::duration"
    )]
    pub reload_interval: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

/// Why the TLS files could not be loaded; always names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the certificate cannot be parsed: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: the certificate expired at {not_after} (Unix time)")]
    Expired { path: PathBuf, not_after: i64 },
    #[error("{key}: the key does not match the certificate in {cert} ({source})")]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: no usable CA certificate for client certificates ({reason})")]
    ClientCa { path: PathBuf, reason: String },
}

/// A loaded configuration, with what the metrics and the reload need to know of it.
#[derive(Debug)]
pub struct Loaded {
    pub server: Arc<rustls::ServerConfig>,
    /// The served certificate's notAfter, in Unix seconds.
    pub not_after: i64,
    /// The files' bytes, to tell whether a re-read changed anything.
    contents: Files,
}

/// The files' bytes, as one attempt read them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn read(config: &TlsConfig) -> Result<Self, TlsFileError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|e| TlsFileError::Read {
                what,
                path: path.to_owned(),
                source: rustls_pki_types::pem::Error::Io(e),
            })
        };
        Ok(Self {
            cert: read("certificate file", &config.cert_file)?,
            key: read("key file", &config.key_file)?,
            client_ca: match &config.client_ca_file {
                Some(path) => Some(read("client CA file", path)?),
                None => None,
            },
        })
    }
}

/// Reads and checks the files: the key matches the certificate, the certificate is valid now,
/// the client CA (if any) is usable.
pub fn load(config: &TlsConfig) -> Result<Loaded, TlsFileError> {
    build(config, &Files::read(config)?)
}

/// Checks the files as read and builds the configuration they make.
fn build(config: &TlsConfig, files: &Files) -> Result<Loaded, TlsFileError> {
    let (cert_pem, key_pem) = (&files.cert, &files.key);
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsFileError::Read {
            what: "certificate file",
            path: config.cert_file.clone(),
            source,
        })?;
    let leaf = chain.first().ok_or_else(|| TlsFileError::NoCertificate {
        path: config.cert_file.clone(),
    })?;
    let (not_before, not_after) =
        validity(leaf).map_err(|reason| TlsFileError::BadCertificate {
            path: config.cert_file.clone(),
            reason,
        })?;
    let now = unix_now();
    if not_after < now {
        return Err(TlsFileError::Expired {
            path: config.cert_file.clone(),
            not_after,
        });
    }
    if not_before > now {
        return Err(TlsFileError::BadCertificate {
            path: config.cert_file.clone(),
            reason: format!("not valid before {not_before} (Unix time)"),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsFileError::Read {
        what: "key file",
        path: config.key_file.clone(),
        source,
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::KeyMismatch {
            key: config.key_file.clone(),
            cert: config.cert_file.clone(),
            source: e,
        })?;
    let builder = match (&config.client_ca_file, &files.client_ca) {
        (Some(path), Some(pem)) => {
            let ca_error = |reason: String| TlsFileError::ClientCa {
                path: path.clone(),
                reason,
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ca_error(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ca_error(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // Fails when the key does not belong to the leaf certificate.
    let mut server = builder
        .with_single_cert(chain.clone(), key)
        .map_err(|source| TlsFileError::KeyMismatch {
            key: config.key_file.clone(),
            cert: config.cert_file.clone(),
            source,
        })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        not_after,
        contents: files.clone(),
    })
}

/// The certificate's validity period, in Unix seconds.
fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// The subject of a client certificate, as its distinguished name (`CN=..., O=...`).
pub fn subject(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The TLS configuration in force, swapped when the files change.
#[derive(Debug)]
pub struct Terminator {
    config: TlsConfig,
    current: ArcSwap<Loaded>,
    /// What the last failed reload read (the files' bytes, or why they could not be read), so
    /// that files which stay broken are reported once, not on every tick and directory event;
    /// its lock is held through each reload, so that reloads happen one at a time.
    failed: Mutex<Option<Result<Files, String>>>,
}

impl Terminator {
    pub fn new(config: TlsConfig) -> Result<Self, TlsFileError> {
        let loaded = load(&config)?;
        Ok(Self {
            config,
            current: ArcSwap::from_pointee(loaded),
            failed: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// What new handshakes use.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Re-reads the files: `Ok(true)` when they changed and the new ones are in force; on an
    /// error the ones in force stay. An error is returned once for the same bytes: files that
    /// read as they did at the last failure are tried again (a certificate not yet valid
    /// becomes valid without a change), but failing again they give `Ok(false)` and a debug
    /// line, so that a pair left broken is not counted and logged on every re-read.
    pub fn reload(&self) -> Result<bool, TlsFileError> {
        // One reload at a time (the watch, the timer and SIGHUP may ask at once): one that read
        // the files before a swap must not store them after another stored the new ones.
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        let (attempt, outcome) = match Files::read(&self.config) {
            Ok(files) => {
                let outcome = build(&self.config, &files).map(|fresh| {
                    let changed = fresh.contents != self.current.load().contents;
                    if changed {
                        self.current.store(Arc::new(fresh));
                    }
                    changed
                });
                (Ok(files), outcome)
            }
            Err(e) => (Err(e.to_string()), Err(e)),
        };
        match outcome {
            Err(e) if failed.as_ref() == Some(&attempt) => {
                tracing::debug!(
                    error = %e,
                    "TLS files unchanged since they failed to load; the certificate in force stays"
                );
                Ok(false)
            }
            Err(e) => {
                *failed = Some(attempt);
                Err(e)
            }
            Ok(changed) => {
                *failed = None;
                Ok(changed)
            }
        }
    }

    /// Seconds until the served certificate expires (negative once it has).
    pub fn expires_in(&self) -> i64 {
        self.current.load().not_after - unix_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    fn config(cert: PathBuf, key: PathBuf) -> TlsConfig {
        TlsConfig {
            cert_file: cert,
            key_file: key,
            client_ca_file: None,
            handshake_timeout: default_handshake_timeout(),
            reload_interval: default_reload_interval(),
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("snapguard-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_matching_pair_loads_with_alpn_h2_and_http1() {
        let dir = tempdir("ok");
        let (c, k) = write_pair(&dir, "a");
        let loaded = load(&config(c, k)).unwrap();
        assert_eq!(
            loaded.server.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(loaded.not_after > unix_now());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempdir("mismatch");
        let (c, _) = write_pair(&dir, "a");
        let (_, k) = write_pair(&dir, "b");
        let err = load(&config(c, k)).unwrap_err().to_string();
        assert!(err.contains("b.key") && err.contains("a.crt"), "{err}");
    }

    #[test]
    fn an_unreadable_or_expired_file_is_refused_naming_it() {
        let dir = tempdir("bad");
        let (c, k) = write_pair(&dir, "a");
        let err = load(&config(dir.join("missing.crt"), k.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.crt"), "{err}");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let old = params.self_signed(&key).unwrap();
        std::fs::write(&c, old.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let err = load(&config(c, k)).unwrap_err().to_string();
        assert!(err.contains("a.crt") && err.contains("expired"), "{err}");
    }

    #[test]
    fn a_reload_swaps_only_when_the_files_changed_and_keeps_the_old_on_error() {
        let dir = tempdir("reload");
        let (c, k) = write_pair(&dir, "a");
        let terminator = Terminator::new(config(c.clone(), k.clone())).unwrap();
        assert!(!terminator.reload().unwrap());
        write_pair(&dir, "a");
        assert!(terminator.reload().unwrap());
        std::fs::write(&k, "not a key").unwrap();
        assert!(terminator.reload().is_err());
        assert!(
            terminator.expires_in() > 0,
            "the pair in force still serves"
        );
    }

    /// `snapguard_tls_reloads_total{result}` as exported.
    fn reloads(metrics: &crate::metrics::Metrics, result: &str) -> f64 {
        let series = format!("snapguard_tls_reloads_total{{result=\"{result}\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series}in\n{}", metrics.encode()))
    }

    #[tokio::test]
    async fn a_pair_that_stays_broken_counts_once_and_a_changed_one_again() {
        let dir = tempdir("broken");
        let (c, k) = write_pair(&dir, "a");
        let terminator = Arc::new(Terminator::new(config(c.clone(), k.clone())).unwrap());
        let metrics = crate::metrics::Metrics::default();
        // Re-read as the timer and the directory watch do, `n` times; the failures counted.
        let reread = |n: usize| {
            let (terminator, metrics) = (&terminator, &metrics);
            async move {
                let before = reloads(metrics, "failure");
                for _ in 0..n {
                    crate::server::reload_tls(terminator, metrics).await;
                }
                reloads(metrics, "failure") - before
            }
        };

        // A key of another certificate: counted once, however often it is re-read.
        let (_, other_key) = write_pair(&dir, "b");
        let stranger = std::fs::read(&other_key).unwrap();
        std::fs::write(&k, &stranger).unwrap();
        assert_eq!(reread(1).await, 1.0);
        assert_eq!(reread(5).await, 0.0, "the same broken pair counted again");
        // Written again with the same bytes (a new mtime): still the same pair.
        std::fs::write(&k, &stranger).unwrap();
        assert_eq!(
            reread(3).await,
            0.0,
            "the same bytes rewritten counted again"
        );

        // Another broken key is another failure, once.
        std::fs::write(&k, "not a key").unwrap();
        assert_eq!(reread(3).await, 1.0);
        // So is a file that cannot be read, once.
        std::fs::remove_file(&k).unwrap();
        assert_eq!(reread(3).await, 1.0);

        // Fixed, then broken again as before: a new failure, since a good pair came between.
        write_pair(&dir, "a");
        let ok_before = reloads(&metrics, "success");
        assert_eq!(reread(2).await, 0.0);
        assert_eq!(reloads(&metrics, "success") - ok_before, 1.0);
        std::fs::write(&k, &stranger).unwrap();
        assert_eq!(reread(3).await, 1.0);
        assert!(terminator.expires_in() > 0, "the good pair still serves");
    }
}
