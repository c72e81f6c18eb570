//! The crate's one error type.
//!
//! Every layer below `api` speaks in these variants and nothing else, so that the HTTP mapping
//! (status, OpenAI envelope, `Retry-After`) lives in exactly one place: `api::error`.

/// An error that can reach a client. The variant decides the HTTP status; the message is shown
/// to the client verbatim, so it must say what was wrong in words a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or out of range. `param` names the offending field, in the
    /// dotted/indexed form OpenAI uses (`messages[0].role`).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// A named thing (model, library, experience, job) does not exist.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
    },
    /// The thing being created exists already.
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than the configured limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The client did not send its whole request body in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// A body that is not declared as JSON where JSON is read.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Every generation slot and every queue place is taken; the client should retry later.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u64,
    },
    /// The backend is not ready (model still loading) or the server is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// Work ran past its deadline.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// An upstream server answered with an error; its status and fields are passed on.
    #[error("{message}")]
    Upstream {
        status: u16,
        message: String,
        kind: Option<String>,
        param: Option<String>,
        code: Option<String>,
    },
    /// Anything else: a bug or an environment failure. The message is logged and sent.
    #[error("{0}")]
    Internal(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A 400 naming the request field at fault.
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<&'static str>>) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param: param.into().map(str::to_owned),
        }
    }

    /// A 400 naming a field path built at run time (`experient.instances[2].grid`).
    pub fn invalid_param(message: impl Into<String>, param: impl Into<String>) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>, param: impl Into<Option<&'static str>>) -> Self {
        Error::NotFound {
            message: message.into(),
            param: param.into().map(str::to_owned),
        }
    }

    /// A 500 for what the client cannot fix; the message is logged and sent.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(format!("I/O error: {e}"))
    }
}

/// The text a panic was raised with, when it was a string, for the error that replaces it.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
