//! Why a connection to the upstream failed, in words an operator can act on.
//!
//! hyper-util's connector and hyper-rustls report a failed connection as a chain of boxed errors
//! whose top line is terse (`tcp connect error`, `dns error`, `received corrupt message of type
//! InvalidContentType`) and whose useful part sits further down: an `std::io::Error` with a kind,
//! or a `rustls::Error`. [`explain`] walks the chain to that cause and says what failed, where,
//! and the likely fix. It is for the log only: the downstream gets a fixed text
//! ([`crate::error`]), never these details.

use std::error::Error as StdError;
use std::io;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use rustls::{CertificateError, InvalidMessage};
use rustls_pki_types::UnixTime;

use crate::config::UpstreamUrl;

/// What the message may say about the upstream besides the error itself.
pub struct Target<'a> {
    pub url: &'a UpstreamUrl,
    pub ca_file: Option<&'a Path>,
    pub connect_timeout: Duration,
}

/// The operator's message for a failed connection to `target`.
pub fn explain(target: &Target<'_>, error: &(dyn StdError + 'static)) -> String {
    let url = target.url;
    let host = url.authority.host();
    let addr = host_port(url);
    if let Some(tls) = find::<rustls::Error>(error) {
        return explain_tls(target, tls);
    }
    if is_dns(error) {
        return format!(
            "cannot resolve {host}, the host of upstream {url}: {}: check the host name in \
             upstream.url and this machine's DNS settings",
            root_cause(error)
        );
    }
    let kind = find::<io::Error>(error)
        .map(innermost_io)
        .map(io::Error::kind);
    match kind {
        Some(io::ErrorKind::ConnectionRefused) => format!(
            "cannot connect to upstream {url}: {addr} refused the connection, so nothing listens \
             there: check the port in upstream.url and that the block storage service is up"
        ),
        Some(io::ErrorKind::TimedOut) => format!(
            "cannot connect to upstream {url}: {addr} did not answer within {} \
             (timeouts.upstream_connect): check that the host is up and that no firewall drops \
             the traffic",
            humantime::format_duration(target.connect_timeout)
        ),
        Some(io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable) => format!(
            "cannot connect to upstream {url}: {addr} is unreachable from this machine ({}): \
             check the address in upstream.url and this machine's network routes",
            root_cause(error)
        ),
        Some(io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => format!(
            "cannot connect to upstream {url}: {addr} reset the connection while it was being \
             set up: check the upstream's own log, and any firewall or load balancer in between"
        ),
        // tokio-rustls reports a peer that hangs up mid-handshake as an early end of file.
        Some(io::ErrorKind::UnexpectedEof) if url.scheme == http::uri::Scheme::HTTPS => format!(
            "TLS handshake with upstream {url} failed: {addr} closed the connection: check that \
             this port serves TLS (or write http:// in upstream.url), and the upstream's own log"
        ),
        _ => format!(
            "cannot connect to upstream {url}: {}",
            chain(error).join(": ")
        ),
    }
}

fn explain_tls(target: &Target<'_>, error: &rustls::Error) -> String {
    let url = target.url;
    let host = url.authority.host();
    let addr = host_port(url);
    let refused = format!("the certificate of upstream {url} was refused");
    match error {
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType) => format!(
            "TLS handshake with upstream {url} failed: {addr} answered in plain text, not TLS (it \
             looks like a plain HTTP port): write http:// in upstream.url, or give the port \
             where the upstream serves TLS"
        ),
        rustls::Error::InvalidMessage(_) => format!(
            "TLS handshake with upstream {url} failed: {addr} sent something that is not TLS \
             ({error}): check that this port serves TLS, or write http:// in upstream.url"
        ),
        rustls::Error::AlertReceived(alert) => format!(
            "TLS handshake with upstream {url} failed: the upstream refused it ({alert:?} \
             alert): it may want a client certificate, or TLS versions or cipher suites that \
             snapguard does not offer (TLS 1.2 and 1.3); see the upstream's own log"
        ),
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => match target.ca_file {
                Some(ca) => format!(
                    "{refused}: it was not issued by a CA in upstream.ca_file ({}) or in the \
                     system's roots: put the CA that issued the upstream's certificate in that \
                     file",
                    ca.display()
                ),
                None => format!(
                    "{refused}: it was not issued by a CA in the system's roots: set \
                     upstream.ca_file to a PEM file of the CA that issued it"
                ),
            },
            CertificateError::NotValidForName => format!(
                "{refused}: it is not valid for {host}: write in upstream.url a name the \
                 certificate lists, or have it reissued with {host} among its subject \
                 alternative names"
            ),
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "{refused}: it is not valid for {host} but for {}: write one of those in \
                 upstream.url, or have the certificate reissued with {host} among its subject \
                 alternative names",
                if presented.is_empty() {
                    "no name at all".to_owned()
                } else {
                    presented
                        .iter()
                        .map(|n| plain_name(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::Expired => format!(
                "{refused}: it has expired: renew the upstream's certificate, or check this \
                 machine's clock"
            ),
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "{refused}: it expired at {}: renew the upstream's certificate, or check this \
                 machine's clock",
                date(*not_after)
            ),
            CertificateError::NotValidYet => {
                format!("{refused}: it is not valid yet: check this machine's clock")
            }
            CertificateError::NotValidYetContext { not_before, .. } => format!(
                "{refused}: it is not valid before {}: check this machine's clock",
                date(*not_before)
            ),
            // rustls passes this webpki error on only as text.
            CertificateError::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
                format!(
                    "{refused}: it is a CA certificate (basicConstraints CA:TRUE), which TLS \
                     does not accept as a server's own, even when it is the one in \
                     upstream.ca_file: have the upstream serve a certificate issued by that CA, \
                     or a self-signed certificate without CA:TRUE"
                )
            }
            _ => format!("{refused}: {error}"),
        },
        _ => format!("TLS handshake with upstream {url} failed: {error}"),
    }
}

/// The errors of a chain, outermost first. `io::Error::source` skips the error it wraps (it
/// returns that error's own source), so a wrapped one is stepped into with `get_ref`.
fn causes<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&e: &&'a (dyn StdError + 'static)| match e
        .downcast_ref::<io::Error>()
    {
        Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
        None => e.source(),
    })
}

fn find<'a, E: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    causes(error).find_map(|e| e.downcast_ref::<E>())
}

/// The io::Error deepest in a chain of io::Errors wrapping one another (hyper-rustls wraps
/// tokio-rustls's, and the connect timeout wraps tokio's `Elapsed`): its kind is the one meant.
fn innermost_io(error: &io::Error) -> &io::Error {
    let mut current = error;
    while let Some(inner) = current
        .get_ref()
        .and_then(|e| e.downcast_ref::<io::Error>())
    {
        current = inner;
    }
    current
}

/// hyper-util's connector names a failed lookup only in its message; its error type is private.
fn is_dns(error: &(dyn StdError + 'static)) -> bool {
    causes(error).any(|e| {
        let text = e.to_string();
        text == "dns error" || text.starts_with("failed to lookup address information")
    })
}

/// Each error's own text, outermost first, without the repeats of io::Errors that print what
/// they wrap.
fn chain(error: &(dyn StdError + 'static)) -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for e in causes(error) {
        let text = e.to_string();
        if texts.last() != Some(&text) {
            texts.push(text);
        }
    }
    texts
}

fn root_cause(error: &(dyn StdError + 'static)) -> String {
    chain(error).pop().unwrap_or_default()
}

/// `host:port` of the upstream, with the scheme's default port when none is written.
fn host_port(url: &UpstreamUrl) -> String {
    match url.authority.port_u16() {
        Some(_) => url.authority.to_string(),
        None if url.scheme == http::uri::Scheme::HTTPS => format!("{}:443", url.authority),
        None => format!("{}:80", url.authority),
    }
}

/// A name as webpki lists it, `DnsName("cinder.example")` or `IpAddress(10.0.0.1)`, as the
/// operator would write it.
fn plain_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(name)
}

fn date(time: UnixTime) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(time.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> (UpstreamUrl, Duration) {
        (url.parse().unwrap(), Duration::from_secs(5))
    }

    fn explain_for(url: &str, ca_file: Option<&Path>, error: &(dyn StdError + 'static)) -> String {
        let (url, connect_timeout) = target(url);
        explain(
            &Target {
                url: &url,
                ca_file,
                connect_timeout,
            },
            error,
        )
    }

    /// An error of hyper-util's shape: a terse message whose cause is the real one.
    #[derive(Debug)]
    struct Terse(&'static str, Box<dyn StdError + Send + Sync>);

    impl std::fmt::Display for Terse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl StdError for Terse {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.1)
        }
    }

    #[test]
    fn io_causes_say_what_where_and_what_to_do() {
        for (kind, url, wanted) in [
            (
                io::ErrorKind::ConnectionRefused,
                "http://127.0.0.1:1",
                "127.0.0.1:1 refused the connection",
            ),
            (
                io::ErrorKind::TimedOut,
                "http://cinder",
                "cinder:80 did not answer within 5s (timeouts.upstream_connect)",
            ),
            (
                io::ErrorKind::HostUnreachable,
                "https://evs",
                "evs:443 is unreachable",
            ),
        ] {
            let e = Terse("tcp connect error", Box::new(io::Error::from(kind)));
            let text = explain_for(url, None, &e);
            assert!(text.contains(wanted), "{text}");
            assert!(text.contains(&format!("upstream {url}")), "{text}");
        }
    }

    #[test]
    fn a_failed_lookup_names_the_host() {
        let cause = io::Error::other("failed to lookup address information: Name does not resolve");
        let e = Terse("dns error", Box::new(cause));
        let text = explain_for("http://does-not-exist.invalid:8776", None, &e);
        assert!(
            text.starts_with("cannot resolve does-not-exist.invalid, the host of upstream"),
            "{text}"
        );
        assert!(text.contains("Name does not resolve"), "{text}");
    }

    #[test]
    fn tls_errors_wrapped_in_io_errors_are_found() {
        // hyper-rustls wraps tokio-rustls's io::Error in another one.
        let wrap =
            |e: rustls::Error| io::Error::other(io::Error::new(io::ErrorKind::InvalidData, e));
        let url = "https://127.0.0.1:8776";
        let ca = Path::new("/etc/snapguard/ca.pem");
        for (error, ca_file, wanted) in [
            (
                rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
                None,
                "answered in plain text, not TLS",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                Some(ca),
                "not issued by a CA in upstream.ca_file (/etc/snapguard/ca.pem)",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                None,
                "set upstream.ca_file",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    expected: rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                    presented: vec![
                        "DnsName(\"localhost\")".to_owned(),
                        "IpAddress(10.0.0.1)".to_owned(),
                    ],
                }),
                None,
                "not valid for 127.0.0.1 but for localhost, 10.0.0.1:",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000)),
                    not_after: UnixTime::since_unix_epoch(Duration::from_secs(1_700_000_000)),
                }),
                None,
                "expired at 2023-11-14T22:13:20Z",
            ),
        ] {
            let text = explain_for(url, ca_file, &wrap(error));
            assert!(text.contains(wanted), "{text}");
            assert!(text.contains(url), "{text}");
        }
    }

    #[test]
    fn anything_else_keeps_the_whole_chain() {
        let e = Terse(
            "tcp open error",
            Box::new(io::Error::other("too many open files")),
        );
        assert_eq!(
            explain_for("http://127.0.0.1:8776", None, &e),
            "cannot connect to upstream http://127.0.0.1:8776: tcp open error: too many open files"
        );
    }
}
