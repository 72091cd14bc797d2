//! The request path: classify, then police or stream, then forward with the pooled client.
//!
//! Passthrough requests are streamed both ways and never buffered. A policed request has its
//! headers checked first (so a refusal costs no body read), then at most `max_body_bytes` of its
//! body read under a deadline, then the pure policy decides. Every failure leaves through
//! [`Error::render`]; every exchange leaves one [`Exchange`] record.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

pub use crate::access::Decision;
use crate::access::{End, Exchange};
use crate::body::{Leased, Logged, Progress, ProxyBody, Tracked};
use crate::config::Config;
use crate::decide::{self, Head};
use crate::error::Error;
use crate::gather::Gather;
use crate::headers::{add_forwarded, strip_hop_by_hop, Peer, RequestIds, X_REQUEST_ID};
use crate::lifetime::{Budget, Pace, Stall, Watched};
use crate::metrics::Metrics;
use crate::policy::{self, Verdict, Violation};
use crate::route::{ErrorStyle, Route};
use crate::signing::{KeyError, Signer};
use crate::upstream::{Lease, SendError, TlsError, Upstream};

/// What a reload replaces whole: the config and the upstream client built from it.
pub struct Runtime {
    pub config: Config,
    upstream: Arc<Upstream>,
    /// The upstream authority as a Host value, made once.
    upstream_host: HeaderValue,
    /// Re-signing with the cloud key, when `[upstream.signing]` is set.
    signer: Option<Arc<Signer>>,
}

/// Why a runtime could not be built from a valid config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("[upstream.signing]: {0}")]
    Keys(#[from] KeyError),
}

impl Runtime {
    pub fn new(config: Config, metrics: &Metrics) -> Result<Self, BuildError> {
        let upstream = Arc::new(Upstream::new(&config, metrics.upstream_waiting())?);
        Self::with_upstream(config, upstream)
    }

    /// A runtime for `config` that keeps `upstream`, its warm connections and its slots in use:
    /// for a reload that changed nothing the client is built from.
    pub fn with_upstream(config: Config, upstream: Arc<Upstream>) -> Result<Self, BuildError> {
        let upstream_host = HeaderValue::from_str(config.upstream.url.authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let signer = match &config.upstream.signing {
            Some(signing) => Some(Arc::new(Signer::new(signing.clone())?)),
            None => None,
        };
        Ok(Self {
            config,
            upstream,
            upstream_host,
            signer,
        })
    }

    /// The upstream client, for a reload to keep.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// The re-signer, whose keys a background task re-reads while it is in use.
    pub fn signer(&self) -> Option<&Arc<Signer>> {
        self.signer.as_ref()
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
    /// The downstream peer, as the forwarding headers tell it.
    peer: &'r Peer,
    id: &'r HeaderValue,
    progress: &'r Arc<Progress>,
    /// The caller's access key, once its signature was verified (`downstream = "verify"`).
    caller: &'r OnceLock<String>,
    /// Set once the caller was authenticated (or needed not be).
    authenticated: &'r OnceLock<()>,
}

/// Re-reads a runtime's signing keys in the background for as long as the runtime is in use.
fn watch_keys(runtime: &Runtime, metrics: &Arc<Metrics>) {
    if let (Some(signer), Ok(handle)) = (runtime.signer(), tokio::runtime::Handle::try_current()) {
        handle.spawn(Signer::reload_every(
            Arc::downgrade(signer),
            metrics.clone(),
        ));
    }
}

/// The proxy service, shared by every connection.
pub struct Proxy {
    runtime: ArcSwap<Runtime>,
    ids: RequestIds,
    metrics: Arc<Metrics>,
    /// Response bytes buffered at once, across reloads.
    budget: Budget,
}

impl Proxy {
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>) -> Self {
        watch_keys(&runtime, &metrics);
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            ids: RequestIds::default(),
            metrics,
            budget: Budget::default(),
        }
    }

    /// The runtime in force now. Requests keep the one they started with.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new runtime; requests in flight finish on the old one.
    pub fn swap(&self, runtime: Runtime) {
        watch_keys(&runtime, &self.metrics);
        self.runtime.store(Arc::new(runtime));
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Handles one downstream request from `peer`. Never fails: errors become responses.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Logged> {
        let started = Instant::now();
        let rt = self.runtime();
        let request_id = self.ids.for_request(req.headers());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let version = req.version();
        let http1 = version < Version::HTTP_2;
        let progress = Progress::new();
        let (caller, authenticated) = (OnceLock::new(), OnceLock::new());
        let cx = Context {
            rt: &rt,
            peer,
            id: &request_id,
            progress: &progress,
            caller: &caller,
            authenticated: &authenticated,
        };

        let head = decide::head(&rt.config, req.method(), req.headers(), req.uri());
        let route = match &head {
            Head::Police { route, .. } => Some(*route),
            Head::Violation { route, .. } => Some(*route),
            Head::Passthrough | Head::Connect => None,
        };
        // The exchange's record from the start: a request the client abandons before its
        // response (a reset stream, a connection gone while the upstream answers) is logged and
        // counted too, as `499` (nginx's "client closed request").
        let mut record = Unanswered(Some(Box::new(Exchange {
            started,
            method,
            path,
            route: route.map(|r| r.template),
            decision: Decision::Abandoned,
            rule: None,
            error: None,
            status: 499,
            request_id: request_id.clone(),
            upstream: None,
            bytes_in: progress.clone(),
            bytes_out: 0,
            caller: None,
            client: peer.client.clone(),
            metrics: self.metrics.clone(),
        })));
        let pace = Pace::of(&rt.config);
        let bad_host = crate::headers::host_problem(version, req.uri(), req.headers());
        let req = req.map(Gather::request);
        let outcome = match head {
            _ if bad_host.is_some() => {
                Outcome::refused(Error::BadHost(bad_host.unwrap_or_default()))
            }
            Head::Connect => Outcome::refused(Error::Method(Method::CONNECT)),
            Head::Passthrough => {
                let (parts, body) = req.into_parts();
                match self.buffer_request(&cx, body, pace).await {
                    Ok(body) => {
                        self.forward(&cx, parts, body, Decision::Passthrough, None)
                            .await
                    }
                    Err(e) => Outcome::refused(e),
                }
            }
            // The policed arms are boxed: the future of every request, passthrough included,
            // would otherwise hold room for all of them at once (about 5 KiB per connection).
            Head::Violation { violation, .. } => {
                let (parts, body) = req.into_parts();
                Box::pin(async {
                    match self.authenticate_first(&cx, &parts, body, pace).await {
                        Ok(body) => self.violation(&cx, violation, parts, body).await,
                        Err(e) => Outcome::refused(e),
                    }
                })
                .await
            }
            Head::Police { route, project } => {
                Box::pin(self.police(&cx, req, route, project.as_deref())).await
            }
        };

        // A small response is read whole first, so its upstream connection is free at once
        // whatever the downstream does; a failure to read it is still the upstream's to answer.
        let relayed = match outcome.result {
            Ok((response, lease)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // Answered in the downstream's own version, whatever the upstream speaks: an
                // HTTP/1.0 upstream must not cost an HTTP/1.1 client its keep-alive.
                parts.version = version;
                match self
                    .buffer_response(&rt, body, lease, &progress, pace)
                    .await
                {
                    Ok(body) => Ok((Response::from_parts(parts, ()), body)),
                    Err(e) => {
                        self.metrics.upstream_error(e.kind());
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        let error = relayed.as_ref().err().map(Error::kind);
        let (mut response, body) = match relayed {
            Ok(relayed) => relayed,
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::warn!(error = %e, request_id = request_id.to_str().unwrap_or("-"), "upstream failure");
                }
                // Signature refusals answer Huawei SDK callers in their gateway's format.
                let style = match e {
                    Error::Unauthorized(_) => ErrorStyle::Huawei,
                    _ => route.map_or(ErrorStyle::Openstack, |r| r.error_style),
                };
                let (mut parts, body) = e.render(style, &rt.config.errors).into_parts();
                let body = Leased::own(body);
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
        if let Some(exchange) = record.0.as_deref_mut() {
            exchange.decision = outcome.decision;
            exchange.rule = outcome.rule;
            exchange.error = error;
            exchange.status = response.status().as_u16();
            exchange.upstream = outcome.upstream;
            exchange.caller = caller.into_inner();
        }
        response.map(|()| Logged::new(body, record.answered()))
    }

    /// Checks the caller's signature once, on the request as it came (`downstream = "verify"`).
    fn authenticate(
        &self,
        cx: &Context<'_>,
        parts: &Parts,
        body: Option<&[u8]>,
    ) -> Result<(), Error> {
        if cx.authenticated.get().is_some() {
            return Ok(());
        }
        let _ = cx.authenticated.set(());
        let Some(signer) = cx.rt.signer() else {
            return Ok(());
        };
        match signer.verify(parts, body, SystemTime::now()) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    let _ = cx.caller.set(caller);
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.auth_failure(e.reason());
                tracing::info!(reason = e.reason(), error = %e, request_id = cx.id.to_str().unwrap_or("-"), "caller signature refused");
                Err(Error::Unauthorized(e))
            }
        }
    }

    /// When callers' signatures are verified, a request refused on its head alone is still
    /// checked first, its body read (within the policed body's bounds) for the purpose: an
    /// unauthenticated caller learns nothing from the policy. Otherwise the body streams on.
    async fn authenticate_first(
        &self,
        cx: &Context<'_>,
        parts: &Parts,
        body: Gather<Incoming>,
        pace: Pace,
    ) -> Result<ProxyBody, Error> {
        let verifying = cx
            .rt
            .signer()
            .is_some_and(|s| s.config().downstream == crate::signing::Downstream::Verify);
        if !verifying {
            return Ok(ProxyBody::stream(body, pace));
        }
        let limit = cx.rt.config.policy.max_body_bytes;
        match self.read_request_body(cx, body, limit).await? {
            Read::Whole(bytes) => {
                self.authenticate(cx, parts, Some(&bytes))?;
                Ok(ProxyBody::full(bytes))
            }
            Read::TooLarge(prefix, rest) => {
                self.authenticate(cx, parts, None)?;
                Ok(ProxyBody::prefixed(prefix, rest, pace))
            }
        }
    }

    /// Reads a request body whole, up to `limit` bytes, before anything goes upstream: within
    /// `timeouts.request_body` in all, and held to its pace and framing on the way. Every
    /// request body read whole (a small one, a policed one, one whose signature is verified)
    /// is read here, and a cut is counted here, by reason.
    async fn read_request_body(
        &self,
        cx: &Context<'_>,
        body: Gather<Incoming>,
        limit: usize,
    ) -> Result<Read<Gather<Incoming>>, Error> {
        let timeout = cx.rt.config.timeouts.request_body;
        let read = tokio::time::timeout(timeout, read_bounded(body, limit, Some(cx.progress)));
        match read.await {
            Err(_) => {
                self.metrics.cut("request_body_timeout");
                Err(Error::BodyTimeout(timeout))
            }
            Ok(Ok(read)) => Ok(read),
            Ok(Err(e)) => Err(match Stall::find(e.as_ref()) {
                Some(stall) => {
                    self.metrics.cut(stall.reason());
                    Error::BodyStalled(stall)
                }
                None => Error::BodyRead(e),
            }),
        }
    }

    /// A passthrough request body up to `limits.buffer_request_body` is read whole (within
    /// `timeouts.request_body`) before an upstream slot is taken, so a slow sender holds only its
    /// own connection; it also reaches the upstream in one piece, whatever its framing was. A
    /// larger body is streamed, held to its pace.
    async fn buffer_request(
        &self,
        cx: &Context<'_>,
        body: Gather<Incoming>,
        pace: Pace,
    ) -> Result<ProxyBody, Error> {
        let limit = cx.rt.config.limits.buffer_request_body;
        let declared = body.size_hint().exact();
        if body.is_end_stream() || declared.is_some_and(|n| n > limit as u64) {
            return Ok(ProxyBody::stream(body, pace));
        }
        Ok(match self.read_request_body(cx, body, limit).await? {
            Read::Whole(bytes) => ProxyBody::full(bytes),
            Read::TooLarge(prefix, rest) => ProxyBody::prefixed(prefix, rest, pace),
        })
    }

    /// A response body up to `limits.buffer_response_body` (while `limits.buffer_memory`
    /// allows) is read whole before it is relayed, and its connection goes back to the pool at
    /// once; a larger one is streamed, its connection kept until it has been sent.
    async fn buffer_response(
        &self,
        rt: &Runtime,
        body: Incoming,
        lease: Lease,
        request: &Arc<Progress>,
        pace: Pace,
    ) -> Result<Leased, Error> {
        let limits = &rt.config.limits;
        let declared = body.size_hint().exact();
        let wanted = match declared {
            _ if body.is_end_stream() => None,
            Some(n) if n > limits.buffer_response_body as u64 => None,
            Some(n) => Some(n as usize),
            None => Some(limits.buffer_response_body),
        };
        let reservation = wanted.and_then(|n| self.budget.reserve(n, limits.buffer_memory));
        let Some(reservation) = reservation else {
            let body = Gather::relay(body);
            return Ok(Leased::new(
                ProxyBody::stream(body, pace),
                lease,
                request.clone(),
            ));
        };
        let body = Watched::new(Gather::relay(body), pace);
        let read = read_bounded(body, limits.buffer_response_body, None);
        match read.await.map_err(Error::UpstreamBody)? {
            Read::Whole(bytes) => {
                let body = ProxyBody::full(reservation.hold(bytes));
                Ok(Leased::new(body, lease, request.clone()))
            }
            // Unknown length, and more than fits: the rest streams after what was read.
            Read::TooLarge(prefix, rest) => {
                drop(reservation);
                let body = ProxyBody::prefixed_watched(prefix, rest);
                Ok(Leased::new(body, lease, request.clone()))
            }
        }
    }

    /// Polices a request on `route`, then forwards what the policy allows.
    async fn police(
        &self,
        cx: &Context<'_>,
        req: Request<Gather<Incoming>>,
        route: &Route,
        project: Option<&str>,
    ) -> Outcome {
        let policy = &cx.rt.config.policy;
        let (mut parts, body) = req.into_parts();

        let bytes = match self
            .read_request_body(cx, body, policy.max_body_bytes)
            .await
        {
            Err(e) => return Outcome::refused(e),
            Ok(Read::TooLarge(prefix, rest)) => {
                // Nothing of the policy is told to a caller whose signature fails.
                if let Err(e) = self.authenticate(cx, &parts, None) {
                    return Outcome::refused(e);
                }
                let v = Violation::BodyTooLarge {
                    limit: policy.max_body_bytes,
                };
                let body = ProxyBody::prefixed(prefix, rest, Pace::of(&cx.rt.config));
                return self.violation(cx, v, parts, body).await;
            }
            Ok(Read::Whole(bytes)) => bytes,
        };

        // A caller's signature covers the body as it came, not as it will be normalized.
        if let Err(e) = self.authenticate(cx, &parts, Some(&bytes)) {
            return Outcome::refused(e);
        }
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
                    request_id = cx.id.to_str().unwrap_or("-"),
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
                    request_id = cx.id.to_str().unwrap_or("-"),
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
        // On the request as it came: HTTP/2 has its host in the URI only.
        if let Err(e) = self.authenticate(cx, &parts, body.buffered()) {
            return Outcome::refused(e);
        }
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
        // Headers a caller's signature covers reach the upstream as they came, unless snapguard
        // signs the request itself.
        // A list that cannot be read protects nothing (the gateway refuses such a signature
        // anyway), and no signature lets an untrusted peer choose its forwarding headers.
        let signed = match rt.signer() {
            Some(_) => None,
            None => policy::signed_headers(&parts.headers)
                .filter(|s| matches!(s, policy::SignedHeaders::Listed(_))),
        };
        let trusted = cx.peer.trusted;
        let untouchable = |name: &HeaderName| {
            signed.as_ref().is_some_and(|s| s.covers(name))
                && (trusted || !crate::headers::is_forwarding(name))
        };
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
            Some(host)
                if (upstream.preserve_host || untouchable(&header::HOST))
                    && crate::headers::is_host(host.as_bytes()) =>
            {
                host.clone()
            }
            _ => rt.upstream_host.clone(),
        };
        parts.headers.insert(header::HOST, host);
        if rt.config.forwarding.x_forwarded {
            add_forwarded(&mut parts.headers, cx.peer, downstream_host, untouchable);
        }
        if !untouchable(&X_REQUEST_ID) {
            parts.headers.insert(X_REQUEST_ID, cx.id.clone());
        }
        parts.version = Version::HTTP_11;
        if let Some(signer) = rt.signer() {
            // Last, over the headers as they will be sent: the body's hash when it was read
            // whole, `UNSIGNED-PAYLOAD` when it streams.
            if let Err(e) = signer.sign(
                &mut parts,
                &rt.upstream_host,
                body.buffered(),
                SystemTime::now(),
            ) {
                return Outcome::refused(Error::Sign(e));
            }
            self.metrics.signed();
        }

        // The upstream has `upstream_response` to answer once the request body is sent, and the
        // body may not stall for longer than that on its way.
        let limit = rt.config.timeouts.upstream_response;
        let body = Tracked::new(body, cx.progress.clone());
        let sent = Instant::now();
        let response = rt
            .upstream
            .send(Request::from_parts(parts, body), cx.progress);
        tokio::pin!(response);
        let result = loop {
            let deadline =
                tokio::time::Instant::from_std(cx.progress.last_moved().max(sent) + limit);
            tokio::select! {
                result = &mut response => break match result {
                    Ok(exchange) => Ok(exchange),
                    Err(SendError::Connect(e)) => Err(Error::UpstreamConnect(e)),
                    Err(SendError::Busy(kind)) => Err(Error::UpstreamBusy(kind)),
                    // The request body broke off (the client went away, or sent a malformed
                    // chunk, or stalled past its pace) while being sent on: the downstream's
                    // fault.
                    Err(SendError::Exchange(e)) if e.is_user() => Err(match Stall::find(&e) {
                        Some(stall) => Error::BodyStalled(stall),
                        None => Error::DownstreamBody(e),
                    }),
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
            // The request body's own failure: a stall is counted once, when the exchange ends
            // (Tracked recorded it in the request's progress).
            Err(Error::DownstreamBody(_) | Error::BodyStalled(_)) => {}
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

/// The record of an exchange until its response is handed on; dropped before that (the
/// request's future dropped: the client went away), it ends the exchange as abandoned.
struct Unanswered(Option<Box<Exchange>>);

impl Unanswered {
    /// The record, for the response to carry to the exchange's end.
    fn answered(mut self) -> Option<Box<Exchange>> {
        self.0.take()
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(exchange) = self.0.take() {
            exchange.finish(End::Abandoned);
        }
    }
}

/// A body, read up to a limit.
enum Read<B> {
    Whole(Bytes),
    /// Over the limit: what was read, and the unread rest.
    TooLarge(Bytes, B),
}

/// Reads `body` until it ends or exceeds `max` bytes, counting the bytes actually received
/// (when `progress` is given). A body that arrives in one frame is kept without a copy.
async fn read_bounded<B>(
    mut body: B,
    max: usize,
    progress: Option<&Progress>,
) -> Result<Read<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        // Trailers of a buffered body are dropped: it is re-framed with a Content-Length.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if let Some(progress) = progress {
            progress.add_received(data.len());
        }
        len += data.len();
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(earlier) => {
                // Sized once for what the body says it holds (within the limit), so that it is
                // not copied again at every doubling.
                let hint = body.size_hint();
                let expected = hint
                    .exact()
                    .unwrap_or(hint.lower())
                    .saturating_add(len as u64);
                let bounded = usize::try_from(expected).unwrap_or(usize::MAX).min(max + 1);
                buf.reserve(bounded.max(len));
                buf.extend_from_slice(&earlier);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
        if len > max {
            let read = first.take().unwrap_or_else(|| buf.split().freeze());
            return Ok(Read::TooLarge(read, body));
        }
    }
    Ok(Read::Whole(first.unwrap_or_else(|| buf.freeze())))
}
