//! The request path: classify, then police or stream, then forward with the pooled client.
//!
//! Passthrough requests are streamed both ways and never buffered. A policed request has its
//! headers checked first (so a refusal costs no body read), then at most `max_body_bytes` of its
//! body read under a deadline, then the pure policy decides. Every failure leaves through
//! [`Error::render`]; every exchange leaves one [`Exchange`] record.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

pub use crate::access::Decision;
use crate::access::Exchange;
use crate::body::{Progress, ProxyBody};
use crate::config::Config;
use crate::decide::{self, Head};
use crate::error::Error;
use crate::headers::{add_forwarded, strip_hop_by_hop, RequestIds, X_REQUEST_ID};
use crate::metrics::Metrics;
use crate::policy::{self, Verdict, Violation};
use crate::route::{ErrorStyle, Route};
use crate::upstream::{Lease, SendError, TlsError, Upstream};

/// What a reload replaces whole: the config and the upstream client built from it.
pub struct Runtime {
    pub config: Config,
    upstream: Upstream,
    /// The upstream authority as a Host value, made once.
    upstream_host: HeaderValue,
}

impl Runtime {
    pub fn new(config: Config, metrics: &Metrics) -> Result<Self, TlsError> {
        let upstream = Upstream::new(&config, metrics.upstream_waiting())?;
        let upstream_host = HeaderValue::from_str(config.upstream.url.authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Ok(Self {
            config,
            upstream,
            upstream_host,
        })
    }
}

/// The result of handling one request, before it becomes a response.
struct Outcome {
    result: Result<(Response<Incoming>, Lease), Error>,
    decision: Decision,
    /// The policy rule violated, if any (also in audit mode, where the request is forwarded).
    rule: Option<Cow<'static, str>>,
    upstream: Option<Duration>,
}

impl Outcome {
    fn refused(error: Error) -> Self {
        Self {
            rule: match &error {
                Error::Policy(v) => Some(v.rule()),
                _ => None,
            },
            result: Err(error),
            decision: Decision::Rejected,
            upstream: None,
        }
    }
}

/// What one request carries through the proxy besides the request itself.
struct Context<'r> {
    rt: &'r Runtime,
    /// The downstream peer's address, as X-Forwarded-For carries it.
    peer: &'r HeaderValue,
    id: &'r HeaderValue,
    progress: &'r Arc<Progress>,
}

/// The proxy service, shared by every connection.
pub struct Proxy {
    runtime: ArcSwap<Runtime>,
    ids: RequestIds,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>) -> Self {
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            ids: RequestIds::default(),
            metrics,
        }
    }

    /// The runtime in force now. Requests keep the one they started with.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new runtime; requests in flight finish on the old one.
    pub fn swap(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Handles one downstream request. Never fails: errors become responses.
    /// `peer` is the downstream's address as an X-Forwarded-For element ([`forwarded_for`]).
    ///
    /// [`forwarded_for`]: crate::headers::forwarded_for
    pub async fn handle(&self, req: Request<Incoming>, peer: &HeaderValue) -> Response<ProxyBody> {
        let started = Instant::now();
        let rt = self.runtime();
        let request_id = self.ids.for_request(req.headers());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let http1 = req.version() < Version::HTTP_2;
        let progress = Progress::new();
        let cx = Context {
            rt: &rt,
            peer,
            id: &request_id,
            progress: &progress,
        };

        let head = decide::head(&rt.config, req.method(), req.headers(), req.uri());
        let route = match &head {
            Head::Police { route, .. } => Some(*route),
            Head::Violation { route, .. } => Some(*route),
            Head::Passthrough | Head::Connect => None,
        };
        let outcome = match head {
            Head::Connect => Outcome::refused(Error::Method(Method::CONNECT)),
            Head::Passthrough => {
                let (parts, body) = req.into_parts();
                let body = ProxyBody::stream(body);
                self.forward(&cx, parts, body, Decision::Passthrough, None)
                    .await
            }
            Head::Violation { violation, .. } => {
                let (parts, body) = req.into_parts();
                let body = ProxyBody::stream(body);
                self.violation(&cx, violation, parts, body).await
            }
            Head::Police { route, project } => {
                self.police(&cx, req, route, project.as_deref()).await
            }
        };

        let error = outcome.result.as_ref().err().map(Error::kind);
        let (mut response, body) = match outcome.result {
            Ok((response, lease)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = ProxyBody::stream(body).leasing(lease);
                (Response::from_parts(parts, ()), body)
            }
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::warn!(error = %e, request_id = ?request_id, "upstream failure");
                }
                let style = route.map_or(ErrorStyle::Openstack, |r| r.error_style);
                let (mut parts, body) = e.render(style, &rt.config.errors).into_parts();
                if http1 && e.closes_connection() {
                    parts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                (Response::from_parts(parts, ()), body)
            }
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.clone());
        let exchange = Box::new(Exchange {
            started,
            method,
            path,
            route: route.map(|r| r.template),
            decision: outcome.decision,
            rule: outcome.rule,
            error,
            status: response.status().as_u16(),
            request_id,
            upstream: outcome.upstream,
            bytes_in: progress,
            bytes_out: 0,
            metrics: self.metrics.clone(),
        });
        response.map(|()| body.finishing(exchange))
    }

    /// Polices a request on `route`, then forwards what the policy allows.
    async fn police(
        &self,
        cx: &Context<'_>,
        req: Request<Incoming>,
        route: &Route,
        project: Option<&str>,
    ) -> Outcome {
        let policy = &cx.rt.config.policy;
        let (mut parts, body) = req.into_parts();

        let limit = cx.rt.config.timeouts.request_body;
        let read = tokio::time::timeout(
            limit,
            read_bounded(body, policy.max_body_bytes, cx.progress),
        )
        .await;
        let bytes = match read {
            Err(_) => return Outcome::refused(Error::BodyTimeout(limit)),
            Ok(Err(e)) => return Outcome::refused(Error::BodyRead(e)),
            Ok(Ok(Read::TooLarge(prefix, rest))) => {
                let v = Violation::BodyTooLarge {
                    limit: policy.max_body_bytes,
                };
                let body = ProxyBody::prefixed(prefix, rest);
                return self.violation(cx, v, parts, body).await;
            }
            Ok(Ok(Read::Whole(bytes))) => bytes,
        };

        let checked = decide::body(&cx.rt.config, route, project, &parts.headers, &bytes);
        let allowed = match checked {
            Ok(allowed) => allowed,
            Err(v) => return self.violation(cx, v, parts, ProxyBody::full(bytes)).await,
        };
        let (body, decision) = match allowed.body {
            Verdict::Unchanged => (bytes, Decision::Allowed),
            Verdict::Normalized(body) => {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                (Bytes::from(body), Decision::Normalized)
            }
        };
        let (decision, rule) = match &allowed.exempted {
            Some(v) => {
                // Explicit in config, and still worth a line: it is the one way through.
                tracing::info!(
                    rule = %v.rule(),
                    field = v.field().unwrap_or("-"),
                    project = project.unwrap_or("-"),
                    request_id = ?cx.id,
                    "reserved prefix allowed for an exempt project"
                );
                (Decision::Exempt, Some(v.rule()))
            }
            None => (decision, None),
        };
        self.forward(cx, parts, ProxyBody::full(body), decision, rule)
            .await
    }

    /// Counts a violation; refuses the request, or in audit mode logs it and forwards the
    /// request unchanged.
    async fn violation(
        &self,
        cx: &Context<'_>,
        v: Violation,
        parts: Parts,
        body: ProxyBody,
    ) -> Outcome {
        self.metrics.violation(&v.rule(), v.field());
        match decide::on_violation(cx.rt.config.policy.mode) {
            Decision::Audit => {
                // The rule and field only: the offending value is body content, never logged.
                tracing::warn!(
                    rule = %v.rule(),
                    field = v.field().unwrap_or("-"),
                    request_id = ?cx.id,
                    "policy violation forwarded (audit mode)"
                );
                let rule = Some(v.rule());
                self.forward(cx, parts, body, Decision::Audit, rule).await
            }
            _ => Outcome::refused(v.into()),
        }
    }

    /// Sends the request upstream and waits (bounded) for its response head.
    async fn forward(
        &self,
        cx: &Context<'_>,
        mut parts: Parts,
        body: ProxyBody,
        decision: Decision,
        rule: Option<Cow<'static, str>>,
    ) -> Outcome {
        let rt = cx.rt;
        let upstream = &rt.config.upstream;
        // The original path and query bytes, whatever form the request target had, sent in
        // origin form.
        let uri = parts
            .uri
            .path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
            .map(|target| Uri::from(target.clone()));
        let Some(uri) = uri else {
            return Outcome::refused(Error::BadTarget(parts.uri.to_string()));
        };
        // An absolute-form target's authority wins over Host (RFC 9112 section 3.2.2); HTTP/2
        // carries the host only there, as :authority.
        let downstream_host = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| parts.headers.get(header::HOST).cloned());
        parts.uri = uri;

        // Headers a request signature covers reach the upstream as they came.
        let signed = policy::signed_headers(&parts.headers);
        let untouchable = |name: &HeaderName| signed.as_ref().is_some_and(|s| s.covers(name));
        strip_hop_by_hop(&mut parts.headers);
        if !untouchable(&header::EXPECT) {
            // hyper already answered any `Expect: 100-continue` downstream when the body was
            // polled; the client sends the body at once, so the expectation must not go on.
            parts.headers.remove(header::EXPECT);
        }
        // hyper's client sends a GET or HEAD body of unknown length as no body at all unless
        // the request says it is chunked; passthrough means the body arrives whatever the method.
        if body.size_hint().exact().is_none() && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let host = match &downstream_host {
            Some(host) if upstream.preserve_host || untouchable(&header::HOST) => host.clone(),
            _ => rt.upstream_host.clone(),
        };
        parts.headers.insert(header::HOST, host);
        if rt.config.forwarding.x_forwarded {
            add_forwarded(
                &mut parts.headers,
                cx.peer,
                "http",
                downstream_host,
                untouchable,
            );
        }
        if !untouchable(&X_REQUEST_ID) {
            parts.headers.insert(X_REQUEST_ID, cx.id.clone());
        }
        parts.version = Version::HTTP_11;

        // The upstream has `upstream_response` to answer once the request body is sent, and the
        // body may not stall for longer than that on its way.
        let limit = rt.config.timeouts.upstream_response;
        let body = body.tracking(cx.progress.clone());
        let sent = Instant::now();
        let response = rt.upstream.send(Request::from_parts(parts, body));
        tokio::pin!(response);
        let result = loop {
            let deadline =
                tokio::time::Instant::from_std(cx.progress.last_moved().max(sent) + limit);
            tokio::select! {
                result = &mut response => break match result {
                    Ok(exchange) => Ok(exchange),
                    Err(SendError::Connect(e)) => Err(Error::UpstreamConnect(e)),
                    // The request body broke off (the client went away, or sent a malformed
                    // chunk) while being sent on: the downstream's fault.
                    Err(SendError::Exchange(e)) if e.is_user() => Err(Error::DownstreamBody(e)),
                    Err(SendError::Exchange(e)) => Err(Error::Upstream(e)),
                },
                () = tokio::time::sleep_until(deadline) => {
                    if cx.progress.last_moved().max(sent) + limit <= Instant::now() {
                        break Err(Error::UpstreamTimeout(limit));
                    }
                }
            }
        };
        let took = sent.elapsed();
        match &result {
            Ok(_) => self.metrics.upstream(took),
            Err(Error::DownstreamBody(_)) => {}
            Err(e) => self.metrics.upstream_error(e.kind()),
        }
        Outcome {
            rule,
            result,
            decision,
            upstream: Some(took),
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
async fn read_bounded(
    mut body: Incoming,
    max: usize,
    progress: &Progress,
) -> Result<Read, hyper::Error> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers of a policed body are dropped: it is re-framed with a Content-Length.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        progress.add_received(data.len());
        buf.extend_from_slice(&data);
        if buf.len() > max {
            return Ok(Read::TooLarge(buf.freeze(), body));
        }
    }
    Ok(Read::Whole(buf.freeze()))
}
