//! The one mapping from [`Error`] to HTTP: status, OpenAI error envelope, `Retry-After`.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::Error;

impl Error {
    /// The one mapping from an error to its HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
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
            Error::RequestTimeout(_) => ("invalid_request_error", Some("request_timeout"), None),
            Error::UnsupportedMediaType(_) => (
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
            ),
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
        let message = match self {
            // Said by the server about itself: the log keeps the paths, the client does not
            // need the layout of the server's disk.
            Error::Internal(_) | Error::Unavailable(_) | Error::Conflict(_) => {
                without_paths(&self.to_string())
            }
            _ => self.to_string(),
        };
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
    }
}

/// `text` with every absolute file path (two or more components) replaced by `<path>`.
fn without_paths(text: &str) -> String {
    static PATH: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"(?:/[A-Za-z0-9._@+\-]+){2,}/?").expect("a valid pattern")
    });
    PATH.replace_all(text, "<path>").into_owned()
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

/// Bodies larger than this are parsed on a blocking thread: a 4 MiB body of many small values
/// (60,000 tools) took seconds of CPU, and on an async worker that stalls every connection the
/// worker serves.
const PARSE_INLINE_BYTES: usize = 64 << 10;

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send + 'static,
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
        if bytes.len() <= PARSE_INLINE_BYTES {
            return parse_json(&bytes).map(JsonBody);
        }
        tokio::task::spawn_blocking(move || parse_json(&bytes).map(JsonBody))
            .await
            .map_err(Error::internal)?
    }
}

/// Parses a request body in one pass straight into its type; building a `serde_json::Value`
/// first doubled the parse on every request. Only when that fails is the body checked for
/// syntax again, so that "not JSON" and "wrong shape" still get different messages.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let not_json = |e: serde_json::Error| {
        Error::invalid(format!("the request body is not valid JSON: {e}"), None)
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let typed = serde_path_to_error::deserialize(&mut de);
    if typed.is_ok() {
        de.end().map_err(not_json)?;
    } else if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return Err(not_json(e));
    }
    typed.map_err(|e| {
        let path = e.path().to_string();
        let mut param = if path == "." { None } else { Some(path) };
        // serde reports a missing field at its parent; name the field itself.
        let inner = e.inner().to_string();
        let named = |prefix: &str| {
            inner
                .strip_prefix(prefix)
                .and_then(|r| r.split('`').next())
                .map(str::to_owned)
        };
        if let Some(field) = named("unknown field `") {
            // OpenAI refuses arguments it does not know, and so do we: a field that is
            // dropped without a word is a setting the client believes took effect.
            // The path already ends in the field (serde_path_to_error reports it there).
            let param = param.unwrap_or(field);
            return Error::InvalidRequest {
                message: format!("unrecognized request argument supplied: {param}"),
                param: Some(param),
            };
        }
        if let Some(field) = named("missing field `") {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_do_not_show_server_paths() {
        let e = Error::Internal(
            "cannot create experience directory /srv/data/experience/math: permission denied"
                .into(),
        );
        let m = e.envelope()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            m,
            "cannot create experience directory <path>: permission denied"
        );
        // A client's own field values are its to see.
        let e = Error::invalid("no file /tmp/tasks/x.jsonl", "dataset");
        assert!(e.envelope()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/tmp/tasks/x.jsonl"));
    }

    #[derive(serde::Deserialize, Debug)]
    struct Body {
        #[allow(dead_code)]
        model: String,
        #[allow(dead_code)]
        n: Option<u32>,
    }

    fn invalid(r: Result<Body, Error>) -> (String, Option<String>) {
        match r {
            Err(Error::InvalidRequest { message, param }) => (message, param),
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn syntax_and_shape_errors_are_told_apart() {
        assert!(parse_json::<Body>(br#"{"model": "m", "n": 2}"#).is_ok());
        for not_json in [
            &br#"{"model": "m""#[..],
            br#"{"model": 5, oops"#,
            br#"{"model": "m"} x"#,
        ] {
            let (message, param) = invalid(parse_json(not_json));
            assert!(
                message.starts_with("the request body is not valid JSON"),
                "{message}"
            );
            assert_eq!(param, None);
        }
        let (message, param) = invalid(parse_json(br#"{"model": "m", "n": "two"}"#));
        assert!(message.starts_with("invalid value for 'n'"), "{message}");
        assert_eq!(param.as_deref(), Some("n"));
        let (_, param) = invalid(parse_json(br#"{"n": 1}"#));
        assert_eq!(param.as_deref(), Some("model"));
    }
}
