//! The request path: classify, then police or stream, then forward with the pooled client.
//!
//! Passthrough requests are streamed both ways and never buffered. A policed request has its
//! headers checked first (so a refusal costs no body read), then at most `max_body_bytes` of its
//! body read under a deadline, then the pure policy decides. Every failure leaves through
//! [`Error::render`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use crate::body::ProxyBody;
use crate::config::Config;
use crate::error::Error;
use crate::headers::{add_forwarded, strip_hop_by_hop, RequestIds, X_REQUEST_ID};
use crate::policy::{self, Mode, Verdict, Violation};
use crate::route::{self, Class, ErrorStyle, Route};
use crate::upstream::{self, TlsError, UpstreamClient};

/// What snapguard did with a request; the `decision` of the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not a policed route: streamed as is.
    Passthrough,
    /// Policed and forwarded byte for byte.
    Allowed,
    /// Policed and forwarded with legacy fields renamed.
    Normalized,
    /// Refused by the policy, never sent upstream.
    Rejected,
    /// A violation forwarded anyway, in audit mode.
    Audit,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Allowed => "allowed",
            Self::Normalized => "normalized",
            Self::Rejected => "rejected",
            Self::Audit => "audit",
        }
    }
}

/// The result of handling one request, before it becomes a response.
struct Outcome {
    result: Result<Response<Incoming>, Error>,
    decision: Decision,
    rule: Option<&'static str>,
}

impl Outcome {
    fn forwarded(result: Result<Response<Incoming>, Error>, decision: Decision) -> Self {
        let rule = result.as_ref().err().map(Error::kind);
        Self {
            result,
            decision,
            rule,
        }
    }
}

/// The proxy service, shared by every connection.
pub struct Proxy {
    config: Arc<Config>,
    client: UpstreamClient,
    /// The upstream authority as a Host value, made once.
    upstream_host: HeaderValue,
    ids: RequestIds,
}

impl Proxy {
    pub fn new(config: Arc<Config>) -> Result<Self, TlsError> {
        let client = upstream::client(&config)?;
        let upstream_host = HeaderValue::from_str(config.upstream.url.authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Ok(Self {
            config,
            client,
            upstream_host,
            ids: RequestIds::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Handles one downstream request. Never fails: errors become responses.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = self.ids.for_request(req.headers());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let http1 = req.version() < Version::HTTP_2;

        let class = route::classify(
            &self.config.routes,
            req.method(),
            req.headers(),
            req.uri().path(),
        );
        let route = match &class {
            Class::Policed { route, .. } => Some(*route),
            _ => None,
        };
        let outcome = match class {
            Class::Passthrough if method == Method::CONNECT => {
                Outcome::forwarded(Err(Error::Method(Method::CONNECT)), Decision::Rejected)
            }
            Class::Passthrough => {
                let (parts, body) = req.into_parts();
                let result = self
                    .forward(parts, ProxyBody::stream(body), peer, &request_id)
                    .await;
                Outcome::forwarded(result, Decision::Passthrough)
            }
            Class::Ambiguous => {
                let (parts, body) = req.into_parts();
                self.violation(
                    Violation::AmbiguousPath,
                    parts,
                    ProxyBody::stream(body),
                    peer,
                    &request_id,
                )
                .await
            }
            Class::Policed { route, .. } => self.police(req, route, peer, &request_id).await,
        };

        let mut response = match outcome.result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, ProxyBody::stream(body))
            }
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::warn!(error = %e, request_id = ?request_id, "upstream failure");
                }
                let style = route.map_or(ErrorStyle::Openstack, |r| r.error_style);
                let mut response = e.render(style, &self.config.errors);
                if http1 && e.closes_connection() {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.clone());

        tracing::info!(
            target: "snapguard::access",
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            route = route.map_or("-", |r| r.template.as_str()),
            decision = outcome.decision.as_str(),
            rule = outcome.rule.unwrap_or("-"),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = request_id.to_str().unwrap_or("-"),
        );
        response
    }

    /// Polices a request on `route`, then forwards what the policy allows.
    async fn police(
        &self,
        req: Request<Incoming>,
        route: &Route,
        peer: SocketAddr,
        id: &HeaderValue,
    ) -> Outcome {
        let policy = &self.config.policy;
        let (mut parts, body) = req.into_parts();

        let declared_too_large = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > policy.max_body_bytes as u64);
        let early = policy::check_headers(&parts.headers).and_then(|()| {
            let limit = policy.max_body_bytes;
            if declared_too_large {
                Err(Violation::BodyTooLarge { limit })
            } else {
                Ok(())
            }
        });
        if let Err(v) = early {
            return self
                .violation(v, parts, ProxyBody::stream(body), peer, id)
                .await;
        }

        let limit = self.config.timeouts.request_body;
        let bytes = match tokio::time::timeout(limit, read_bounded(body, policy.max_body_bytes))
            .await
        {
            Err(_) => {
                return Outcome::forwarded(Err(Error::BodyTimeout(limit)), Decision::Rejected)
            }
            Ok(Err(e)) => return Outcome::forwarded(Err(Error::BodyRead(e)), Decision::Rejected),
            Ok(Ok(Read::TooLarge(prefix, rest))) => {
                let v = Violation::BodyTooLarge {
                    limit: policy.max_body_bytes,
                };
                return self
                    .violation(v, parts, ProxyBody::prefixed(prefix, rest), peer, id)
                    .await;
            }
            Ok(Ok(Read::Whole(bytes))) => bytes,
        };

        match policy::check_body(route, policy, &bytes, !policy::is_signed(&parts.headers)) {
            Ok(Verdict::Unchanged) => {
                let result = self.forward(parts, ProxyBody::full(bytes), peer, id).await;
                Outcome::forwarded(result, Decision::Allowed)
            }
            Ok(Verdict::Normalized(body)) => {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                let result = self
                    .forward(parts, ProxyBody::full(Bytes::from(body)), peer, id)
                    .await;
                Outcome::forwarded(result, Decision::Normalized)
            }
            Err(v) => {
                self.violation(v, parts, ProxyBody::full(bytes), peer, id)
                    .await
            }
        }
    }

    /// Refuses the request, or in audit mode reports the violation and forwards it unchanged.
    async fn violation(
        &self,
        v: Violation,
        parts: Parts,
        body: ProxyBody,
        peer: SocketAddr,
        id: &HeaderValue,
    ) -> Outcome {
        let rule = Some(v.rule());
        match self.config.policy.mode {
            Mode::Enforce => Outcome {
                result: Err(v.into()),
                decision: Decision::Rejected,
                rule,
            },
            Mode::Audit => {
                tracing::warn!(rule = v.rule(), field = v.field().unwrap_or("-"), request_id = ?id, "policy violation forwarded (audit mode): {v}");
                let result = self.forward(parts, body, peer, id).await;
                Outcome {
                    result,
                    decision: Decision::Audit,
                    rule,
                }
            }
        }
    }

    /// Sends the request upstream and waits (bounded) for its response head.
    async fn forward(
        &self,
        mut parts: Parts,
        body: ProxyBody,
        peer: SocketAddr,
        id: &HeaderValue,
    ) -> Result<Response<Incoming>, Error> {
        let upstream = &self.config.upstream;
        // The original path and query bytes, whatever form the request target had.
        let target = parts
            .uri
            .path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
            .cloned()
            .ok_or_else(|| Error::BadTarget(parts.uri.to_string()))?;
        parts.uri = Uri::builder()
            .scheme(upstream.url.scheme.clone())
            .authority(upstream.url.authority.clone())
            .path_and_query(target)
            .build()
            .map_err(|_| Error::BadTarget(parts.uri.to_string()))?;

        // HTTP/2 carries the host in :authority, which hyper exposes as the URI's authority.
        let downstream_host = parts.headers.get(header::HOST).cloned();
        strip_hop_by_hop(&mut parts.headers);
        // hyper already answered any `Expect: 100-continue` downstream when the body was polled;
        // the client sends the body at once, so the expectation must not travel further.
        parts.headers.remove(header::EXPECT);
        // hyper's client sends a GET or HEAD body of unknown length as no body at all unless
        // the request says it is chunked; passthrough means the body arrives whatever the method.
        if body.size_hint().exact().is_none() && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let host = match (&downstream_host, upstream.preserve_host) {
            (Some(host), true) => host.clone(),
            _ => self.upstream_host.clone(),
        };
        parts.headers.insert(header::HOST, host);
        if self.config.forwarding.x_forwarded {
            add_forwarded(&mut parts.headers, peer.ip(), "http", downstream_host);
        }
        parts.headers.insert(X_REQUEST_ID, id.clone());
        parts.version = Version::HTTP_11;

        let limit = self.config.timeouts.upstream_response;
        match tokio::time::timeout(limit, self.client.request(Request::from_parts(parts, body)))
            .await
        {
            Err(_) => Err(Error::UpstreamTimeout(limit)),
            Ok(Err(e)) if e.is_connect() => Err(Error::UpstreamConnect(e)),
            Ok(Err(e)) => Err(Error::Upstream(e)),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

/// A policed body, read up to its limit.
enum Read {
    Whole(Bytes),
    /// Over the limit: what was read, and the unread rest (for audit mode to forward).
    TooLarge(Bytes, Incoming),
}

/// Reads `body` until it ends or exceeds `max` bytes, counting the bytes actually received.
async fn read_bounded(mut body: Incoming, max: usize) -> Result<Read, hyper::Error> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers of a policed body are dropped: it is re-framed with a Content-Length.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() > max {
            return Ok(Read::TooLarge(buf.freeze(), body));
        }
    }
    Ok(Read::Whole(buf.freeze()))
}
