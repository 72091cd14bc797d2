//! The one error type of the request path, and the one place it is rendered.
//!
//! Downstream faults (the policy, an unreadable body) are 4xx; upstream faults are 502/504
//! (pingora's split). Every error is rendered in the route's error style, Cinder's `Fault` or
//! Huawei's `{"error": ...}`, so clients see the format they already parse. Internal causes go to
//! the log, never into a response.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::config::ErrorsConfig;
use crate::lifetime::Stall;
use crate::policy::{abbreviate, Violation};
use crate::route::ErrorStyle;
use crate::signing::AuthError;
use crate::upstream::{BoxError, ConnectError};

/// Why a request did not get an upstream response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Policy(#[from] Violation),
    #[error("request body not received within {}", humantime::format_duration(*.0))]
    BodyTimeout(Duration),
    #[error("request body could not be read: {0}")]
    BodyRead(#[source] BoxError),
    #[error("request body broke off while being forwarded: {0}")]
    DownstreamBody(#[source] hyper::Error),
    /// A streamed request body stood still or crawled past its pace.
    #[error("request body cut: {0}")]
    BodyStalled(#[source] Stall),
    #[error("request target {shown:?} cannot be forwarded", shown = abbreviate(.0))]
    BadTarget(String),
    /// An HTTP/1.1 request without exactly one plain `host[:port]` (RFC 9112 section 3.2).
    #[error("invalid request: {0}")]
    BadHost(&'static str),
    #[error("method {shown} is not proxied", shown = abbreviate(.0.as_str()))]
    Method(http::Method),
    /// Its text says what failed, where, and the likely fix: for the log, never the downstream.
    #[error(transparent)]
    UpstreamConnect(ConnectError),
    #[error("upstream request failed: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("upstream sent no response within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    /// The upstream's response body failed, or stalled, while being read to be buffered.
    #[error("upstream response body could not be read: {0}")]
    UpstreamBody(#[source] BoxError),
    /// The caller's own signature was refused (`[upstream.signing] downstream = "verify"`).
    #[error("caller signature refused: {0}")]
    Unauthorized(#[source] AuthError),
    /// Re-signing failed (it cannot with checked keys; kept so a bug is an error, not a panic).
    #[error("re-signing failed: {0}")]
    Sign(#[source] crate::sign::SignError),
    /// Every upstream slot is taken and the queue for them is full (or was waited on too long).
    #[error("no upstream slot: {0}")]
    UpstreamBusy(&'static str),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Policy(v) => match v {
                Violation::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                Violation::ContentEncoding(_) | Violation::ContentType(_) => {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE
                }
                _ => StatusCode::BAD_REQUEST,
            },
            // Not a timeout: the body came whole, in pieces no client sends.
            Self::BodyStalled(Stall::Fragmented(_)) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout(_) | Self::BodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead(_) | Self::DownstreamBody(_) | Self::BadTarget(_) | Self::BadHost(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamConnect(_) | Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamBody(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Sign(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, low-cardinality name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Policy(v) => v.kind(),
            Self::BodyTimeout(_) => "body_timeout",
            Self::BodyRead(_) => "body_read",
            Self::DownstreamBody(_) => "downstream_body",
            Self::BadTarget(_) => "bad_target",
            Self::BadHost(_) => "bad_host",
            Self::Method(_) => "method",
            Self::UpstreamConnect(_) => "connect",
            Self::Upstream(_) => "reset",
            Self::UpstreamTimeout(_) => "timeout",
            Self::BodyStalled(stall) => stall.reason(),
            Self::UpstreamBody(e) => Stall::find(e.as_ref()).map_or("reset", Stall::reason),
            Self::UpstreamBusy(kind) => kind,
            Self::Unauthorized(_) => "unauthorized",
            Self::Sign(_) => "sign",
        }
    }

    /// Whether the downstream HTTP/1 connection must close after the error: the rest of a body
    /// that was not read would otherwise be taken as the next request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::Policy(Violation::BodyTooLarge { .. })
                | Self::BodyTimeout(_)
                | Self::BodyRead(_)
                | Self::BodyStalled(_)
                | Self::DownstreamBody(_)
        )
    }

    /// What the downstream is told. Upstream failures get a fixed text: their causes are ours.
    fn public_message(&self) -> String {
        match self {
            Self::Policy(v) => v.to_string(),
            Self::BodyTimeout(d) => format!(
                "The request body was not received within {} s.",
                d.as_secs_f64()
            ),
            Self::BodyRead(_) | Self::DownstreamBody(_) => {
                "The request body could not be read.".to_owned()
            }
            Self::BadTarget(_) => "The request target cannot be forwarded.".to_owned(),
            Self::BadHost(why) => format!("Invalid request: {why}."),
            Self::Method(m) => format!(
                "The method {} is not supported by this proxy.",
                abbreviate(m.as_str())
            ),
            Self::UpstreamConnect(_) | Self::Upstream(_) => {
                "The block storage service could not be reached.".to_owned()
            }
            Self::BodyStalled(stall) => format!("The request body was cut: {stall}."),
            Self::UpstreamBody(_) => "The block storage service could not be reached.".to_owned(),
            Self::UpstreamBusy(_) => {
                "The block storage service is busy; try again later.".to_owned()
            }
            // The reason is logged, not told: an unknown key and a wrong secret look the same.
            Self::Unauthorized(_) => "The request signature was refused.".to_owned(),
            Self::Sign(_) => "The request could not be signed.".to_owned(),
            Self::UpstreamTimeout(_) => {
                "The block storage service did not respond in time.".to_owned()
            }
        }
    }

    /// The error document, in `style`, as the upstream would have written it.
    pub fn document(&self, style: ErrorStyle, codes: &ErrorsConfig) -> String {
        let status = self.status();
        let message = self.public_message();
        let body = match style {
            ErrorStyle::Openstack => serde_json::json!({
                cinder_fault_name(status): { "code": status.as_u16(), "message": message }
            }),
            ErrorStyle::Huawei => serde_json::json!({
                "error": { "code": codes.huawei_code(status), "message": message }
            }),
        };
        body.to_string()
    }

    /// Renders the error as a response.
    pub fn render(&self, style: ErrorStyle, codes: &ErrorsConfig) -> Response<ProxyBody> {
        let mut response = Response::new(ProxyBody::full(Bytes::from(self.document(style, codes))));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// The names of `cinder.api.openstack.wsgi.Fault._fault_names`.
fn cinder_fault_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflictingRequest",
        413 | 429 => "overLimit",
        415 => "badMediaType",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "computeFault",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(e: &Error, style: ErrorStyle) -> (StatusCode, serde_json::Value) {
        let r = e.render(style, &ErrorsConfig::default());
        let status = r.status();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn openstack_style_uses_cinder_fault_names() {
        let cases = [
            (
                Error::from(Violation::MissingRoot("snapshot".into())),
                400,
                "badRequest",
                "Missing required element 'snapshot' in request body.",
            ),
            (
                Error::from(Violation::BodyTooLarge { limit: 1 }),
                413,
                "overLimit",
                "Request body is larger than 1 bytes.",
            ),
            (
                Error::from(Violation::ContentType("text/plain".into())),
                415,
                "badMediaType",
                "Unsupported Content-Type \"text/plain\": a policed body must be JSON in UTF-8.",
            ),
            (
                Error::UpstreamTimeout(Duration::from_secs(1)),
                504,
                "computeFault",
                "The block storage service did not respond in time.",
            ),
            (
                Error::BodyTimeout(Duration::from_secs(1)),
                408,
                "computeFault",
                "The request body was not received within 1 s.",
            ),
        ];
        for (e, code, name, message) in cases {
            let (status, body) = render(&e, ErrorStyle::Openstack).await;
            assert_eq!(status.as_u16(), code);
            assert_eq!(body[name]["code"], code, "{body}");
            assert_eq!(body[name]["message"], message);
        }
    }

    #[test]
    fn request_data_is_quoted_in_part() {
        let method = http::Method::from_bytes(&[b'X'; 8192]).unwrap();
        for e in [
            Error::Method(method),
            Error::BadTarget("/".repeat(8192)),
            Error::from(Violation::ContentType("x".repeat(65536))),
            Error::from(Violation::ContentEncoding("x".repeat(65536))),
        ] {
            // What the downstream is told, and what the log says.
            let (shown, logged) = (e.public_message(), e.to_string());
            assert!(shown.len() < 200, "{shown}");
            assert!(logged.len() < 200 && logged.contains("..."), "{logged}");
        }
    }

    #[tokio::test]
    async fn huawei_style_uses_evs_codes() {
        let e = Error::from(Violation::MissingRoot("snapshot".into()));
        let (status, body) = render(&e, ErrorStyle::Huawei).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "EVS.5400");
        assert_eq!(
            body["error"]["message"],
            "Missing required element 'snapshot' in request body."
        );
    }
}
