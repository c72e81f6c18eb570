//! Retrying what may pass on a second try: overload, timeouts, a model still loading, an
//! upstream's 429 or 5xx. One policy for every caller (upstream requests, learning rollouts):
//! exponential backoff with full jitter, so that many callers refused at once do not come back
//! at once; a server's Retry-After honoured when it is longer; never past a deadline.
//!
//! Re-asking a model whose reply did not parse (learning, IterResearch) is not this: the call
//! succeeded, the answer was unusable, and the retry changes the request (it samples) instead
//! of waiting.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};

use crate::error::{Error, Result};

/// Whether an error may pass if the same call is made again.
pub fn transient(e: &Error) -> bool {
    match e {
        Error::Unavailable(_) | Error::Timeout(_) | Error::Overloaded { .. } => true,
        Error::Upstream { status, .. } => *status == 429 || *status >= 500,
        _ => false,
    }
}

/// How many times to try again, and how long to wait.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Retries after the first try.
    pub retries: usize,
    /// The first wait, before jitter; each later one doubles.
    pub first: Duration,
    /// No wait is longer, not even one a Retry-After asked for.
    pub max: Duration,
    /// Give up rather than wait past this.
    pub deadline: Option<Instant>,
}

/// Runs `call`, and again after a wait while it fails with a [`transient`] error and the
/// policy allows; returns the last outcome. `what` names the call in the log.
pub async fn retry<T, F, Fut>(what: &str, policy: Policy, call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(policy.first)
        .with_max_delay(policy.max)
        .with_max_times(policy.retries)
        .with_jitter();
    call.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(transient)
        .adjust(move |e, wait| wait_for(e, wait?, &policy))
        .notify(|e, wait| {
            tracing::warn!(what, error = %e, wait_ms = wait.as_millis() as u64, "failed; retrying");
        })
        .await
}

/// The wait before the next try: the backoff's, or a longer one the server asked for, capped;
/// none (give up) when it would end past the deadline.
fn wait_for(e: &Error, backoff: Duration, p: &Policy) -> Option<Duration> {
    let hinted = match e {
        Error::Overloaded {
            retry_after_secs, ..
        } => Duration::from_secs(*retry_after_secs),
        _ => Duration::ZERO,
    };
    let wait = backoff.max(hinted).min(p.max);
    match p.deadline {
        Some(d) if Instant::now() + wait >= d => None,
        _ => Some(wait),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn policy(retries: usize) -> Policy {
        Policy {
            retries,
            first: Duration::from_millis(1),
            max: Duration::from_millis(5),
            deadline: None,
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_one_passes() {
        let calls = AtomicUsize::new(0);
        let out = retry("test", policy(3), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(Error::Unavailable("loading".into())),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn other_failures_and_spent_retries_end_it() {
        let calls = AtomicUsize::new(0);
        let out: Result<()> = retry("test", policy(3), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::invalid("bad", None))
        })
        .await;
        assert!(matches!(out, Err(Error::InvalidRequest { .. })));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a bad request is not retried"
        );
        let calls = AtomicUsize::new(0);
        let out: Result<()> = retry("test", policy(2), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::Timeout("slow".into()))
        })
        .await;
        assert!(matches!(out, Err(Error::Timeout(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "one try and two retries");
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap_and_the_deadline_wins() {
        let p = Policy {
            retries: 5,
            first: Duration::from_millis(100),
            max: Duration::from_secs(30),
            deadline: None,
        };
        let overloaded = Error::Overloaded {
            message: "busy".into(),
            retry_after_secs: 3,
        };
        assert_eq!(
            wait_for(&overloaded, Duration::from_millis(100), &p),
            Some(Duration::from_secs(3))
        );
        let long = Error::Overloaded {
            message: "busy".into(),
            retry_after_secs: 600,
        };
        assert_eq!(
            wait_for(&long, Duration::from_millis(100), &p),
            Some(Duration::from_secs(30))
        );
        let soon = Policy {
            deadline: Some(Instant::now() + Duration::from_secs(1)),
            ..p
        };
        assert_eq!(
            wait_for(&overloaded, Duration::from_millis(100), &soon),
            None
        );
        assert!(transient(&Error::Upstream {
            status: 503,
            message: String::new(),
            kind: None,
            param: None,
            code: None
        }));
    }
}
