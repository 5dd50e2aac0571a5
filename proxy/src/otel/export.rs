//! The export side of tracing: one task drains the span queue in batches (up to
//! `max_batch_spans`, or what arrived within `batch_timeout_ms` of a batch's first span) and
//! hands each batch to the `opentelemetry-otlp` exporter. One export at a time; while it runs the
//! queue keeps filling, and overflows are dropped at the request side (never waited for).

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{OtlpProtocol, SpanCounters, Tracer, TracingConfig};

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("tracing: cannot build the OTLP exporter for {endpoint}: {reason}")]
pub struct ExportError {
    endpoint: String,
    reason: String,
}

/// The HTTP URL spans are posted to: a bare base URL gets OTLP's `/v1/traces`.
pub fn http_traces_url(endpoint: &str) -> String {
    match endpoint.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.path(), "" | "/") => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_owned(),
    }
}

/// The running export task; [`Flush::finish`] exports what is queued and stops it.
pub struct Flush {
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Flush {
    /// Exports the spans still queued (waiting at most `within`) and ends the task.
    pub async fn finish(self, within: Duration) {
        self.stop.notify_one();
        let _ = tokio::time::timeout(within, self.task).await;
    }
}

/// Builds the exporter and spawns the export task on the current runtime.
pub fn start(
    config: &TracingConfig,
    service_name: &str,
    counters: SpanCounters,
) -> Result<(Arc<Tracer>, Flush), ExportError> {
    let fail = |reason: String| ExportError {
        endpoint: config.otlp_endpoint.clone(),
        reason,
    };
    let timeout = Duration::from_millis(config.export_timeout_ms);
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let mut exporter = match config.protocol {
        OtlpProtocol::Grpc => builder
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .with_timeout(timeout)
            .build(),
        OtlpProtocol::Http => builder
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(http_traces_url(&config.otlp_endpoint))
            .with_timeout(timeout)
            .build(),
    }
    .map_err(|e| fail(e.to_string()))?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(service_name.to_owned())
            .build(),
    );
    let (tx, rx) = mpsc::channel(config.max_queue_spans);
    let tracer = Arc::new(Tracer::new(config, tx, counters.clone()));
    let batch = Batching {
        max_spans: config.max_batch_spans,
        wait: Duration::from_millis(config.batch_timeout_ms),
        timeout,
    };
    let stop = Arc::new(Notify::new());
    let task = tokio::spawn(export_loop(rx, exporter, batch, counters, Arc::clone(&stop)));
    Ok((tracer, Flush { stop, task }))
}

#[derive(Clone, Copy)]
struct Batching {
    max_spans: usize,
    wait: Duration,
    timeout: Duration,
}

async fn export_loop(
    mut queue: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    batching: Batching,
    counters: SpanCounters,
    stop: Arc<Notify>,
) {
    let mut stopping = false;
    while !stopping {
        let mut batch = Vec::with_capacity(batching.max_spans.min(64));
        tokio::select! {
            first = queue.recv() => match first {
                Some(span) => batch.push(span),
                None => return,
            },
            _ = stop.notified() => stopping = true,
        }
        let deadline = tokio::time::Instant::now() + batching.wait;
        while batch.len() < batching.max_spans {
            if stopping {
                // Shutting down: what is queued now, without waiting for more.
                match queue.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
                continue;
            }
            tokio::select! {
                next = tokio::time::timeout_at(deadline, queue.recv()) => match next {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(_) => break,
                },
                _ = stop.notified() => stopping = true,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(batching.timeout, exporter.export(batch)).await {
            Ok(Ok(())) => {
                counters.exported.inc_by(n);
                debug!(spans = n, "exported spans");
            }
            Ok(Err(e)) => {
                counters.failed.inc_by(n);
                warn!(spans = n, "span export failed: {e}");
            }
            Err(_) => {
                counters.failed.inc_by(n);
                warn!(
                    spans = n,
                    "span export timed out after {} ms",
                    batching.timeout.as_millis()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_gets_the_traces_path() {
        assert_eq!(
            http_traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://c:4318/otlp/v1/traces"),
            "http://c:4318/otlp/v1/traces"
        );
    }
}
