//! Re-signing for Huawei Cloud's API gateway (`[upstream.signing]`): snapguard holds the cloud
//! AK/SK and signs every request it forwards, after policing and normalization, with Host set to
//! the upstream's authority, so applications hold no cloud keys and signed traffic can be
//! normalized. Callers either sign with local keys that snapguard verifies exactly as the gateway
//! would (`downstream = "verify"`), or not at all (`downstream = "none"`, loopback only).
//!
//! Keys come from files (a mounted Kubernetes Secret) or from the environment variables the
//! Huawei SDKs read; files are re-read when their directory changes and every `reload_interval`,
//! so keys rotate without a restart.
//! Secrets never reach a log line, a metric or an error. The signing itself is [`crate::sign`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use serde::Deserialize;

use crate::policy::abbreviate;
use crate::sign::{self, Credentials, Payload, SecretKey, VerifyError};

/// The environment variables the Huawei Cloud SDKs read their credentials from.
pub const ENV_AK: &str = "HUAWEICLOUD_SDK_AK";
pub const ENV_SK: &str = "HUAWEICLOUD_SDK_SK";
pub const ENV_SECURITY_TOKEN: &str = "HUAWEICLOUD_SDK_SECURITY_TOKEN";
pub const ENV_PROJECT_ID: &str = "HUAWEICLOUD_SDK_PROJECT_ID";

/// The project a request is for, sent with the signature.
pub const X_PROJECT_ID: HeaderName = HeaderName::from_static("x-project-id");

/// `[upstream.signing]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// Only `"sdk-hmac-sha256"`.
    pub scheme: Scheme,
    /// Files holding the cloud access key, secret key, security token (temporary credentials)
    /// and project id; each unset one is read from its `HUAWEICLOUD_SDK_*` variable instead.
    #[serde(default)]
    pub access_key_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    #[serde(default)]
    pub security_token_file: Option<PathBuf>,
    #[serde(default)]
    pub project_id_file: Option<PathBuf>,
    /// What callers send: `"none"` (any Authorization is replaced) or `"verify"`.
    #[serde(default)]
    pub downstream: Downstream,
    /// How often the key files are re-read.
    #[serde(
        default = "default_reload_interval",
        deserialize_with = "crate::config::duration"
    )]
    pub reload_interval: Duration,
    /// Callers' own keys, for `downstream = "verify"`.
    #[serde(default)]
    pub clients: Vec<ClientKey>,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Scheme {
    #[serde(rename = "sdk-hmac-sha256")]
    SdkHmacSha256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Downstream {
    /// Whatever the caller sent is replaced: anyone who reaches snapguard uses the cloud key.
    #[default]
    None,
    /// Callers sign with a local key, verified before anything else.
    Verify,
}

/// A caller's local key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKey {
    pub access_key: String,
    pub secret_key_file: PathBuf,
    /// Project ids this caller may use (in the path or `X-Project-Id`); empty for any.
    #[serde(default)]
    pub projects: Vec<String>,
}

/// Why keys could not be loaded. Never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {what} from {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no {what}: set {file_key} in [upstream.signing] or the {env} environment variable")]
    Missing {
        what: &'static str,
        file_key: &'static str,
        env: &'static str,
    },
    #[error("{what}: {source}")]
    Invalid {
        what: String,
        #[source]
        source: sign::CredentialsError,
    },
    #[error("client access key {0:?} is listed twice")]
    DuplicateClient(String),
}

/// The keys in force: the cloud's, and the callers'.
#[derive(Debug)]
struct Keys {
    cloud: Credentials,
    project_id: Option<HeaderValue>,
    clients: HashMap<String, (SecretKey, Vec<String>)>,
    /// A SHA-256 of every value read, to tell whether a re-read changed anything.
    digest: [u8; 32],
}

/// What a signing or verification step refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(
        "access key {:?} may not use project {:?}",
        abbreviate(key),
        abbreviate(project)
    )]
    Project { key: String, project: String },
    #[error(
        "the body of a streamed request must be sent with X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD"
    )]
    StreamedBodySigned,
}

impl AuthError {
    /// A low-cardinality name for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Verify(VerifyError::MissingAuthorization) => "missing",
            Self::Verify(VerifyError::MissingDate | VerifyError::Malformed(_)) => "malformed",
            Self::Verify(VerifyError::ClockSkew(_)) => "clock_skew",
            Self::Verify(VerifyError::UnknownAccessKey(_)) => "unknown_key",
            Self::Verify(VerifyError::MissingSignedHeader(_)) => "missing_signed_header",
            Self::Verify(VerifyError::BadSignature | VerifyError::BodyNeeded) => "bad_signature",
            Self::StreamedBodySigned => "streamed_body_signed",
            Self::Project { .. } => "project",
        }
    }
}

/// Every reason a caller's signature is refused for, exported at 0 from start-up.
pub const AUTH_FAILURE_REASONS: [&str; 8] = [
    "missing",
    "malformed",
    "clock_skew",
    "unknown_key",
    "missing_signed_header",
    "bad_signature",
    "streamed_body_signed",
    "project",
];

/// Headers signed when present, besides `x-sdk-date` and what [`sign::sign`] adds: those the
/// gateway needs and no proxy on the way rewrites (never hop-by-hop or `X-Forwarded-*`).
const SIGNED: [HeaderName; 3] = [header::HOST, header::CONTENT_TYPE, X_PROJECT_ID];

/// Signs forwarded requests with the cloud key, and checks callers' own signatures.
#[derive(Debug)]
pub struct Signer {
    config: SigningConfig,
    keys: ArcSwap<Keys>,
}

impl Signer {
    /// Loads the keys; an error names the file or variable, never a secret.
    pub fn new(config: SigningConfig) -> Result<Self, KeyError> {
        let keys = load(&config)?;
        Ok(Self {
            config,
            keys: ArcSwap::from_pointee(keys),
        })
    }

    pub fn config(&self) -> &SigningConfig {
        &self.config
    }

    /// Re-reads the keys; on failure the ones in force stay. `Ok(true)` when they changed.
    pub fn reload(&self) -> Result<bool, KeyError> {
        let fresh = load(&self.config)?;
        let changed = fresh.digest != self.keys.load().digest;
        if changed {
            self.keys.store(Arc::new(fresh));
        }
        Ok(changed)
    }

    /// Checks the caller's signature on the request as received, with `body` when it was read
    /// whole. Returns the caller's access key; `Ok(None)` when callers are not verified.
    pub fn verify(
        &self,
        parts: &Parts,
        body: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Option<String>, AuthError> {
        if self.config.downstream != Downstream::Verify {
            return Ok(None);
        }
        let keys = self.keys.load();
        let payload = match body {
            Some(body) => Payload::Body(body),
            None if sign::declares_unsigned_payload(&parts.headers) => Payload::Unsigned,
            None => return Err(AuthError::StreamedBodySigned),
        };
        // HTTP/2 carries the host in the URI only: verify against it as a Host header.
        let with_host;
        let headers = match (
            parts.headers.contains_key(header::HOST),
            parts.uri.authority(),
        ) {
            (false, Some(authority)) => {
                let mut headers = parts.headers.clone();
                if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                    headers.insert(header::HOST, host);
                }
                with_host = headers;
                &with_host
            }
            _ => &parts.headers,
        };
        let verified = sign::verify(
            |key| keys.clients.get(key).map(|(secret, _)| secret),
            &parts.method,
            &parts.uri,
            headers,
            payload,
            now,
            sign::MAX_SKEW,
        )?;
        if let Some((_, projects)) = keys.clients.get(&verified.access_key) {
            if !projects.is_empty() {
                let cloud = keys.project_id.as_ref().and_then(|p| p.to_str().ok());
                let scope = requested_projects(parts, cloud).ok_or_else(|| AuthError::Project {
                    key: verified.access_key.clone(),
                    project: "(none that can be read with certainty)".to_owned(),
                })?;
                for project in scope {
                    if !projects.iter().any(|p| p.eq_ignore_ascii_case(&project)) {
                        return Err(AuthError::Project {
                            key: verified.access_key,
                            project,
                        });
                    }
                }
            }
        }
        Ok(Some(verified.access_key))
    }

    /// Signs a request on its way upstream with the cloud key: `host` is the upstream's
    /// authority, `body` the whole body when it was read whole (else the payload is unsigned).
    pub fn sign(
        &self,
        parts: &mut Parts,
        host: &HeaderValue,
        body: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<(), sign::SignError> {
        let keys = self.keys.load();
        parts.headers.insert(header::HOST, host.clone());
        if let Some(project) = &keys.project_id {
            parts.headers.insert(X_PROJECT_ID, project.clone());
        }
        let payload = body.map_or(Payload::Unsigned, Payload::Body);
        sign::sign(
            &keys.cloud,
            &parts.method,
            &parts.uri,
            &mut parts.headers,
            payload,
            &SIGNED,
            now,
        )
    }

    /// Re-reads the keys when their directories change and every `reload_interval`, for as
    /// long as `signer` is in use.
    pub async fn reload_every(
        signer: std::sync::Weak<Signer>,
        metrics: Arc<crate::metrics::Metrics>,
    ) {
        let Some((interval, changes)) = signer.upgrade().map(|s| {
            let c = &s.config;
            let files = [
                &c.access_key_file,
                &c.secret_key_file,
                &c.security_token_file,
                &c.project_id_file,
            ];
            let clients = c.clients.iter().map(|k| k.secret_key_file.as_path());
            let files = files
                .into_iter()
                .flatten()
                .map(|p| p.as_path())
                .chain(clients);
            (
                c.reload_interval,
                crate::watch::Changes::watch("signing keys", files),
            )
        }) else {
            return;
        };
        loop {
            changes.next(interval).await;
            let Some(signer) = signer.upgrade() else {
                return;
            };
            // File reads are blocking; they are small and rare, but kept off the workers.
            let result = tokio::task::spawn_blocking(move || signer.reload()).await;
            match result {
                Ok(Ok(true)) => {
                    metrics.credential_reload(true);
                    tracing::info!("signing keys reloaded");
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    metrics.credential_reload(false);
                    tracing::warn!(error = %e, "signing keys could not be reloaded; the ones in force stay");
                }
                Err(_) => return,
            }
        }
    }
}

/// The projects a request of a project-limited caller acts in, read strictly: every
/// `X-Project-Id`, and the segment after a version segment (`v3`, `v2.1`: the `/{version}/
/// {project_id}/...` of Cinder and EVS) when it is a project id; a request that names none acts
/// in the cloud key's own project (`project`). `None` when the path cannot be read with
/// certainty (escapes, `;`, dot segments: the route table's generous readings are for catching
/// snapshot names, not for granting access) or no project can be told at all: refused.
fn requested_projects(parts: &Parts, cloud: Option<&str>) -> Option<Vec<String>> {
    let path = parts.uri.path();
    // No reading may climb out of the project: no dot segment, raw or escaped, wherever an
    // escaped separator would put it.
    let decoded = percent_encoding::percent_decode_str(path).collect::<Vec<u8>>();
    if decoded
        .split(|b| matches!(b, b'/' | b'\\'))
        .any(|s| matches!(s, b"." | b".."))
    {
        return None;
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // The version and the project are read as written: nothing escaped or parameterized.
    if segments
        .iter()
        .take(2)
        .any(|s| s.contains(['%', ';', '\\']))
    {
        return None;
    }
    let mut projects = Vec::new();
    for value in parts.headers.get_all(X_PROJECT_ID) {
        projects.push(value.to_str().ok()?.trim().to_owned());
    }
    let is_version = |s: &str| {
        let rest = s.strip_prefix(['v', 'V']).unwrap_or("");
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    };
    // A project id is hex (Keystone's), with dashes in some deployments; a collection is not.
    let is_project = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    match segments.as_slice() {
        [version, project, ..] if is_version(version) && is_project(project) => {
            projects.push((*project).to_owned());
        }
        _ if projects.is_empty() => projects.push(cloud?.to_owned()),
        _ => {}
    }
    Some(projects)
}

/// One value, from its file if configured, else from its environment variable.
fn value(what: &'static str, file: Option<&Path>, env: &str) -> Result<Option<String>, KeyError> {
    match file {
        Some(path) => read_trimmed(what, path).map(Some),
        None => Ok(std::env::var(env)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())),
    }
}

fn read_trimmed(what: &'static str, path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| KeyError::File {
            what,
            path: path.to_owned(),
            source,
        })
}

fn load(config: &SigningConfig) -> Result<Keys, KeyError> {
    let required = |what, file: &Option<PathBuf>, file_key, env| {
        value(what, file.as_deref(), env)?.ok_or(KeyError::Missing {
            what,
            file_key,
            env,
        })
    };
    let ak = required(
        "access key",
        &config.access_key_file,
        "access_key_file",
        ENV_AK,
    )?;
    let sk = required(
        "secret key",
        &config.secret_key_file,
        "secret_key_file",
        ENV_SK,
    )?;
    let token = value(
        "security token",
        config.security_token_file.as_deref(),
        ENV_SECURITY_TOKEN,
    )?;
    let project = value(
        "project id",
        config.project_id_file.as_deref(),
        ENV_PROJECT_ID,
    )?;
    let cloud =
        Credentials::new(&ak, &sk, token.as_deref()).map_err(|source| KeyError::Invalid {
            what: "the cloud credentials".to_owned(),
            source,
        })?;
    let project_id = project
        .as_deref()
        .map(|p| {
            HeaderValue::from_str(p).map_err(|_| KeyError::Invalid {
                what: "the project id".to_owned(),
                source: sign::CredentialsError::AccessKey,
            })
        })
        .transpose()?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for value in [Some(&ak), Some(&sk), token.as_ref(), project.as_ref()] {
        digest.update(value.map_or("-", String::as_str).as_bytes());
        digest.update(b"\0");
    }
    let mut clients = HashMap::new();
    for client in &config.clients {
        let secret = read_trimmed("a client's secret key", &client.secret_key_file)?;
        for part in [&client.access_key, &secret, &client.projects.join(",")] {
            digest.update(part.as_bytes());
            digest.update(b"\0");
        }
        // Checked as credentials are, so that a key that could not sign is refused here.
        Credentials::new(&client.access_key, &secret, None).map_err(|source| {
            KeyError::Invalid {
                what: format!("client {:?}", client.access_key),
                source,
            }
        })?;
        let entry = (SecretKey::new(secret.as_bytes()), client.projects.clone());
        if clients.insert(client.access_key.clone(), entry).is_some() {
            return Err(KeyError::DuplicateClient(client.access_key.clone()));
        }
    }
    let mut sum = [0u8; 32];
    sum.copy_from_slice(digest.finish().as_ref());
    Ok(Keys {
        cloud,
        project_id,
        clients,
        digest: sum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, downstream: Downstream) -> SigningConfig {
        std::fs::write(dir.join("ak"), "CLOUDAK\n").unwrap();
        std::fs::write(dir.join("sk"), "cloud-secret\n").unwrap();
        std::fs::write(dir.join("team"), "team-secret").unwrap();
        SigningConfig {
            scheme: Scheme::SdkHmacSha256,
            access_key_file: Some(dir.join("ak")),
            secret_key_file: Some(dir.join("sk")),
            security_token_file: None,
            project_id_file: None,
            downstream,
            reload_interval: Duration::from_secs(10),
            clients: vec![ClientKey {
                access_key: "TEAMA".into(),
                secret_key_file: dir.join("team"),
                projects: vec!["abc123".into()],
            }],
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("snapguard-signing-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn request(path: &str) -> Parts {
        let (parts, ()) = http::Request::builder()
            .method("PUT")
            .uri(path)
            .header("host", "snapguard.local")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    #[test]
    fn a_forwarded_request_is_signed_for_the_upstream_host_with_the_cloud_key() {
        let dir = tempdir("sign");
        let signer = Signer::new(config(&dir, Downstream::None)).unwrap();
        let mut parts = request("/v3/abc123/snapshots/s1?x=a%20b");
        let upstream = HeaderValue::from_static("evs.example.com");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        signer
            .sign(&mut parts, &upstream, Some(b"{}"), now)
            .unwrap();
        assert_eq!(parts.headers[header::HOST], "evs.example.com");
        let cloud = SecretKey::new(b"cloud-secret");
        let verified = sign::verify(
            |key| (key == "CLOUDAK").then_some(&cloud),
            &parts.method,
            &parts.uri,
            &parts.headers,
            Payload::Body(b"{}"),
            now,
            sign::MAX_SKEW,
        )
        .unwrap();
        assert!(verified.signed_headers.contains(&header::HOST));
        assert!(verified.payload_signed);
        // Streamed bodies are left out of the signature.
        signer.sign(&mut parts, &upstream, None, now).unwrap();
        assert_eq!(
            parts.headers[sign::X_SDK_CONTENT_SHA256],
            sign::UNSIGNED_PAYLOAD
        );
    }

    #[test]
    fn callers_are_verified_with_their_own_keys_and_projects() {
        let dir = tempdir("verify");
        let signer = Signer::new(config(&dir, Downstream::Verify)).unwrap();
        let team = Credentials::new("TEAMA", "team-secret", None).unwrap();
        let now = SystemTime::now();
        let signed = |path: &str, creds: &Credentials, at: SystemTime| {
            let mut parts = request(path);
            sign::sign(
                creds,
                &parts.method.clone(),
                &parts.uri.clone(),
                &mut parts.headers,
                Payload::Body(b"{}"),
                &[header::HOST],
                at,
            )
            .unwrap();
            parts
        };
        let ok = signed("/v3/abc123/snapshots/s1", &team, now);
        assert_eq!(
            signer.verify(&ok, Some(b"{}"), now),
            Ok(Some("TEAMA".to_owned()))
        );
        let other_project = signed("/v3/def456/snapshots/s1", &team, now);
        assert!(matches!(
            signer.verify(&other_project, Some(b"{}"), now),
            Err(AuthError::Project { .. })
        ));
        let wrong = Credentials::new("TEAMA", "not-the-secret", None).unwrap();
        let forged = signed("/v3/abc123/snapshots/s1", &wrong, now);
        assert_eq!(
            signer
                .verify(&forged, Some(b"{}"), now)
                .map_err(|e| e.reason()),
            Err("bad_signature")
        );
        // Spellings that a loose reader would take for another project, or none: refused.
        for path in [
            "/v2.1/def456/cloudvolumes",
            "/%76%33/def456/snapshots/s1",
            "/v3/%64ef456/snapshots/s1",
            "/v3/./def456/snapshots/s1",
            "/v3/abc123/x%2F..%2F..%2Fdef456/snapshots",
            "/v3/abc123/%2e%2e/%2e%2e/v3/def456/snapshots",
            "/v3/snapshots/s1",
            "/",
        ] {
            let other = signed(path, &team, now);
            let verdict = signer.verify(&other, Some(b"{}"), now);
            assert!(matches!(verdict, Err(AuthError::Project { .. })), "{path}");
        }
        let v21 = signed("/v2.1/abc123/cloudvolumes", &team, now);
        assert_eq!(
            signer.verify(&v21, Some(b"{}"), now),
            Ok(Some("TEAMA".to_owned()))
        );
        let old = signed(
            "/v3/abc123/snapshots/s1",
            &team,
            now - Duration::from_secs(16 * 60),
        );
        assert_eq!(
            signer
                .verify(&old, Some(b"{}"), now)
                .map_err(|e| e.reason()),
            Err("clock_skew")
        );
        assert_eq!(
            signer
                .verify(&request("/v3/abc123/snapshots/s1"), Some(b"{}"), now)
                .map_err(|e| e.reason()),
            Err("missing")
        );
    }

    #[test]
    fn keys_rotate_when_their_files_change_and_a_bad_file_keeps_the_old_ones() {
        let dir = tempdir("rotate");
        let cfg = config(&dir, Downstream::None);
        let signer = Signer::new(cfg).unwrap();
        assert!(!signer.reload().unwrap());
        std::fs::write(dir.join("sk"), "rotated-secret").unwrap();
        assert!(signer.reload().unwrap());
        std::fs::remove_file(dir.join("sk")).unwrap();
        let err = signer.reload().unwrap_err().to_string();
        assert!(
            err.contains("secret key") && !err.contains("rotated-secret"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_key_names_the_file_key_and_the_variable() {
        let cfg = SigningConfig {
            scheme: Scheme::SdkHmacSha256,
            access_key_file: None,
            secret_key_file: None,
            security_token_file: None,
            project_id_file: None,
            downstream: Downstream::None,
            reload_interval: Duration::from_secs(10),
            clients: vec![],
        };
        // The variables are not set in the test environment.
        if std::env::var_os(ENV_AK).is_none() {
            let err = Signer::new(cfg).unwrap_err().to_string();
            assert!(
                err.contains("access_key_file") && err.contains(ENV_AK),
                "{err}"
            );
        }
    }
}
