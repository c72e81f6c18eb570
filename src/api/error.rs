//! The one mapping from [`Error`] to HTTP: status, OpenAI error envelope, `Retry-After`.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::Error;

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Upstream { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI envelope, also used as the payload of an in-stream error event.
    pub fn envelope(&self) -> serde_json::Value {
        let (kind, code, param): (&str, Option<&str>, Option<&str>) = match self {
            Error::InvalidRequest { param, .. } => {
                ("invalid_request_error", None, param.as_deref())
            }
            Error::NotFound { param, .. } => (
                "invalid_request_error",
                Some(if param.as_deref() == Some("model") {
                    "model_not_found"
                } else {
                    "not_found"
                }),
                param.as_deref(),
            ),
            Error::Conflict(_) => ("invalid_request_error", Some("conflict"), None),
            Error::PayloadTooLarge(_) => ("invalid_request_error", Some("request_too_large"), None),
            Error::Overloaded { .. } => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            Error::Unavailable(_) => ("service_unavailable", Some("service_unavailable"), None),
            Error::Timeout(_) => ("timeout", Some("timeout"), None),
            Error::Unauthorized(_) => ("authentication_error", Some("invalid_api_key"), None),
            Error::Forbidden(_) => ("permission_error", Some("forbidden"), None),
            Error::Upstream {
                kind, param, code, ..
            } => (
                kind.as_deref().unwrap_or("upstream_error"),
                code.as_deref(),
                param.as_deref(),
            ),
            Error::Internal(_) => ("server_error", Some("internal_error"), None),
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Error::Internal(_) => tracing::error!(%status, error = %self, "request failed"),
            _ => tracing::debug!(%status, error = %self, "request refused"),
        }
        let mut resp = (status, axum::Json(self.envelope())).into_response();
        if let Error::Overloaded {
            retry_after_secs, ..
        } = &self
        {
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// A JSON body whose every failure is an OpenAI envelope: 413 past the body limit, 400 for
/// malformed JSON, and 400 naming the field (`param`) for a schema violation.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| match e {
                BytesRejection::FailedToBufferBody(ref inner)
                    if inner.status() == StatusCode::PAYLOAD_TOO_LARGE =>
                {
                    Error::PayloadTooLarge(
                        "the request body is larger than this server accepts".into(),
                    )
                }
                other => Error::invalid(format!("could not read the request body: {other}"), None),
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    // Syntax first, so that "not JSON" and "wrong shape" get different messages.
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let mut param = if path == "." { None } else { Some(path) };
        // serde reports a missing field at its parent; name the field itself.
        let inner = e.inner().to_string();
        if let Some(field) = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            param = Some(match param {
                Some(p) => format!("{p}.{field}"),
                None => field.to_owned(),
            });
        }
        Error::InvalidRequest {
            message: match &param {
                Some(p) => format!("invalid value for '{p}': {}", e.inner()),
                None => format!("invalid request: {}", e.inner()),
            },
            param,
        }
    })
}
