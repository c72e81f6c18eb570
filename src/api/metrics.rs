//! Prometheus metrics: the recorder, the HTTP middleware that counts requests, and `/metrics`.
//!
//! Other modules record with the `metrics` macros (`experient_queue_depth`, token counters...);
//! this module only installs the exporter and measures HTTP.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::AppState;

/// The handle to the process's Prometheus recorder that `/metrics` renders. metrics' macros
/// record into one process-wide recorder, so every in-process server shares it.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the process-wide recorder once and returns a handle to it; later calls share it.
    pub fn install() -> Metrics {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        Matcher::Suffix("_seconds".into()),
                        &[
                            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                            60.0, 120.0,
                        ],
                    )
                    .expect("static buckets are valid")
                    .build_recorder();
                let handle = recorder.handle();
                // Fails only if something else installed a recorder first; then our handle
                // simply stays empty rather than taking the server down.
                let _ = metrics::set_global_recorder(recorder);
                describe();
                handle
            })
            .clone();
        Metrics { handle }
    }
}

fn describe() {
    metrics::describe_counter!(
        "experient_http_requests_total",
        "HTTP requests by route and status"
    );
    metrics::describe_histogram!(
        "experient_http_request_duration_seconds",
        "Time to the response head, by route"
    );
    metrics::describe_gauge!("experient_http_inflight_requests", "Requests being handled");
    metrics::describe_gauge!(
        "experient_queue_depth",
        "Requests waiting for a generation slot"
    );
    metrics::describe_gauge!("experient_inflight_sequences", "Sequences being generated");
    metrics::describe_counter!("experient_prompt_tokens_total", "Prompt tokens processed");
    metrics::describe_counter!(
        "experient_completion_tokens_total",
        "Completion tokens generated"
    );
    metrics::describe_counter!(
        "experient_iterresearch_rounds_total",
        "IterResearch rounds run, by model"
    );
    metrics::describe_counter!(
        "experient_plan_runs_total",
        "Planning requests, by family and whether a kept program was reused"
    );
    metrics::describe_counter!(
        "experient_plan_rounds_total",
        "Programs the model wrote (first and refinements), by family"
    );
    metrics::describe_counter!(
        "experient_plan_instances_total",
        "Instances solved by planning programs, by family"
    );
    metrics::describe_counter!(
        "experient_embedding_inputs_total",
        "Inputs embedded by /v1/embeddings, by model"
    );
    metrics::describe_counter!(
        "experient_embedding_tokens_total",
        "Tokens embedded by /v1/embeddings, by model"
    );
}

/// `GET /metrics` in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "server", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn render(State(s): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.handle.render(),
    )
        .into_response()
}

/// Middleware: requests in flight, and each request counted with its latency by route and
/// status.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    // A guard, so that a request whose client went away (its future dropped) is uncounted too.
    struct InFlight(metrics::Gauge);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.decrement(1.0);
        }
    }
    let inflight = InFlight(metrics::gauge!("experient_http_inflight_requests"));
    inflight.0.increment(1.0);
    let resp = next.run(req).await;
    drop(inflight);
    let status = resp.status().as_u16().to_string();
    metrics::counter!("experient_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("experient_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}
