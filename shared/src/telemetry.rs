//! Logging and trace export set-up shared by every herd binary.
//!
//! Logs go to stderr: human-readable on a terminal, one JSON object a line otherwise (what log
//! shippers want), or as chosen with `--log-format`. The filter comes from `HERD_LOG` (or
//! `RUST_LOG`), in `tracing_subscriber::EnvFilter` syntax, default `info`.
//!
//! Traces (OpenTelemetry, off by default): with `[tracing] enabled = true` the spans that the
//! gateway and the worker open on purpose (see [`TRACE_TARGET`]) are exported over OTLP —
//! HTTP/protobuf or gRPC — through a batching processor with a bounded queue that runs on its own
//! thread: a slow or unreachable collector drops spans, it never slows or fails a request. The
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_BSP_*` variables apply; a
//! config key that is set wins over its variable. See `docs/observability.md`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{ConfigError, check};

/// The `tracing` target of the spans meant for export. Only spans with this target go to the
/// OpenTelemetry layer, so the crates' own debug spans (hyper, h2, redis) never do.
pub const TRACE_TARGET: &str = "herd::trace";

/// Set once trace export is installed: the request paths check it (one relaxed load) and open
/// no span at all when it is off.
static TRACING: AtomicBool = AtomicBool::new(false);

/// The share of new traces kept (bits of an `f64`), decided at the edge by [`should_trace`].
static RATIO: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000); // 1.0

/// Whether spans are exported (set by [`init_with_tracing`]). The request paths test this before
/// doing any trace work, so tracing off costs one load of a boolean per request.
#[inline]
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// Protobuf over HTTP POST to `{endpoint}/v1/traces` (the collector's port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC (the collector's port 4317).
    #[serde(rename = "grpc")]
    Grpc,
}

/// The `[tracing]` section of the gateway's and the worker's configuration (default: off).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Export spans over OTLP. Default false: no span is even created.
    pub enabled: bool,
    /// Collector base URL (`http://host:4318` for HTTP, `http://host:4317` for gRPC). Unset:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else the OTLP default for the protocol.
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`. Unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub protocol: Option<Protocol>,
    /// Share of new traces sampled, 0.0 to 1.0 (parent-based: a request that arrives with a
    /// `traceparent` follows its caller's decision). Unset: `OTEL_TRACES_SAMPLER(_ARG)`, else 1.0.
    pub sample_ratio: Option<f64>,
}

impl TracingConfig {
    /// Checks the section; keys are named `{section}.…`.
    pub fn validate_in(&self, section: &str) -> Result<(), ConfigError> {
        if let Some(ratio) = self.sample_ratio {
            check::range(&format!("{section}.sample_ratio"), ratio, 0.0, 1.0)?;
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::new(
                format!("{section}.endpoint"),
                format!("must be an http:// or https:// URL, got {endpoint:?}"),
            ));
        }
        Ok(())
    }
}

/// Why trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter rejected its settings (endpoint, headers, protocol).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The runtime that carries gRPC exports could not start.
    #[error("gRPC export runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// The thread that builds the HTTP exporter panicked.
    #[error("OTLP exporter set-up panicked")]
    SetUpPanicked,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names a protocol herd does not speak.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL: {0:?} is not http/protobuf or grpc")]
    Protocol(String),
}

/// Keeps trace export alive; dropping it flushes the spans still queued (bounded by the
/// exporter's timeout) and stops the export thread. Hold it until `main` returns.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// The gRPC client's runtime (tonic needs one); unused for HTTP.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.provider.is_some())
            .finish()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            TRACING.store(false, Ordering::Relaxed);
            let _ = provider.shutdown();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Installs the global subscriber without trace export. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    install(format, None);
}

/// Installs the global subscriber and, when `config.enabled`, OTLP trace export for a service
/// named `service` (unless `OTEL_SERVICE_NAME` says otherwise). Call once, first thing in `main`,
/// outside any async runtime; keep the guard until the end of `main`.
pub fn init_with_tracing(
    format: LogFormat,
    config: &TracingConfig,
    service: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    let disabled_by_env = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    if !config.enabled || disabled_by_env {
        install(format, None);
        return Ok(TelemetryGuard {
            provider: None,
            runtime: None,
        });
    }
    let protocol = match config.protocol {
        Some(protocol) => protocol,
        None => match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok().as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => return Err(TelemetryError::Protocol(other.into())),
        },
    };
    let (exporter, runtime) = match protocol {
        Protocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(endpoint) = &config.endpoint {
                // A configured endpoint is a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT.
                builder =
                    builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
            }
            // Built on a thread of its own: the blocking HTTP client refuses to be made on an
            // async runtime's thread, and `main` may already be in one.
            let exporter = std::thread::scope(|scope| scope.spawn(|| builder.build()).join())
                .map_err(|_| TelemetryError::SetUpPanicked)??;
            (exporter, None)
        }
        Protocol::Grpc => {
            // tonic's channel runs on a Tokio runtime; a small one of its own keeps exports off
            // the request-serving runtimes.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()?;
            let exporter = {
                let _entered = runtime.enter();
                let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(endpoint) = &config.endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                builder.build()?
            };
            (exporter, Some(runtime))
        }
    };
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    // Sampling is decided before any span exists ([`should_trace`]): an unsampled request then
    // costs no span at all, which the SDK's own samplers cannot offer (they run once the span
    // is being built). Every span that is created is therefore kept.
    let ratio = config.sample_ratio.unwrap_or_else(ratio_from_env);
    RATIO.store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .build();
    let tracer = provider.tracer("herd");
    install(format, Some(tracer));
    TRACING.store(true, Ordering::Relaxed);
    Ok(TelemetryGuard {
        provider: Some(provider),
        runtime,
    })
}

/// The ratio `OTEL_TRACES_SAMPLER(_ARG)` ask for (the ratio and always/never samplers; parent
/// based or not, herd always follows a caller's decision); 1.0 when unset or unknown.
fn ratio_from_env() -> f64 {
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
        .ok()
        .and_then(|value| value.trim().parse::<f64>().ok());
    match std::env::var("OTEL_TRACES_SAMPLER")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("always_off" | "parentbased_always_off") => 0.0,
        Some("traceidratio" | "parentbased_traceidratio") => arg.unwrap_or(1.0),
        _ => 1.0,
    }
}

/// Whether the request with these headers is traced (call only when [`tracing_enabled`]): a
/// valid W3C `traceparent` decides by its sampled flag; otherwise a draw at the configured ratio.
pub fn should_trace(headers: &http::HeaderMap) -> bool {
    match headers.get("traceparent").map(http::HeaderValue::as_bytes) {
        Some(value) if is_traceparent(value) => std::str::from_utf8(&value[53..55])
            .ok()
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1),
        _ => {
            let ratio = f64::from_bits(RATIO.load(Ordering::Relaxed));
            ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio)
        }
    }
}

/// The edge's decision (the gateway's): whether this request is traced ([`should_trace`]).
/// When it is not, the request leaves with a `traceparent` that says so — the caller's, or a
/// fresh unsampled one — so the workers behind do not trace it either.
pub fn decide(headers: &mut http::HeaderMap) -> bool {
    if should_trace(headers) {
        return true;
    }
    let valid = headers
        .get("traceparent")
        .is_some_and(|value| is_traceparent(value.as_bytes()));
    if !valid {
        headers.insert("traceparent", unsampled_traceparent());
    }
    false
}

/// Whether the code runs inside a traced request (a herd span is current): the spans of
/// inner work (Redis calls) are made only then, never as roots of their own.
pub fn in_traced_request() -> bool {
    tracing_enabled()
        && tracing::Span::current()
            .metadata()
            .is_some_and(|metadata| metadata.target() == TRACE_TARGET)
}

/// `00-<32 hex>-<16 hex>-<2 hex>` with non-zero ids.
fn is_traceparent(value: &[u8]) -> bool {
    let hex = |range: std::ops::Range<usize>| value[range].iter().all(u8::is_ascii_hexdigit);
    value.len() == 55
        && value.starts_with(b"00-")
        && value[35] == b'-'
        && value[52] == b'-'
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && value[3..35].iter().any(|&b| b != b'0')
        && value[36..52].iter().any(|&b| b != b'0')
}

/// A fresh `traceparent` that is *not* sampled, for a request the gateway does not trace, so the
/// workers behind it do not start traces of their own for it.
pub fn unsampled_traceparent() -> http::HeaderValue {
    let (trace, span): (u128, u64) = (rand::random::<u128>() | 1, rand::random::<u64>() | 1);
    let text = format!("00-{trace:032x}-{span:016x}-00");
    http::HeaderValue::from_str(&text).expect("hex digits and dashes")
}

fn install(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    let filter = std::env::var("HERD_LOG")
        .ok()
        .and_then(|value| EnvFilter::try_new(value).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Pretty => false,
        LogFormat::Json => true,
    };
    // Log lines inside a traced request carry its span's fields (`request_id`, `trace_id`):
    // the JSON formatter writes the current span with each event.
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed()
    };
    // Export only herd's own request spans, whatever the log filter says: the filter is about
    // what is printed, the target about what is traced.
    let traces = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.target() == TRACE_TARGET
            }))
    });
    // A second init (e.g. in tests) keeps the first subscriber; that is fine.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
}

/// Reads W3C trace context from request headers (for [`extract`]).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context from `traceparent` / `tracestate`, or an empty context (a new
/// trace starts) when absent or malformed.
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    use opentelemetry::propagation::TextMapPropagator as _;
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Makes `span` a child of the caller's context in `headers` (a no-op for an empty context).
pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if headers.contains_key("traceparent") {
        let _ = span.set_parent(extract(headers));
    }
}

/// The `traceparent` (and `tracestate`, if any) naming `span` as the parent, for a request sent
/// on its behalf; `None` when the span is not traced.
pub fn trace_headers(
    span: &tracing::Span,
) -> Option<(http::HeaderValue, Option<http::HeaderValue>)> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if !span_context.is_valid() {
        return None;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    let state = span_context.trace_state().header();
    Some((
        http::HeaderValue::from_str(&parent).ok()?,
        (!state.is_empty())
            .then(|| http::HeaderValue::from_str(&state).ok())
            .flatten(),
    ))
}

/// The trace id of `span` as 32 hex digits, for log lines; `None` when not traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Runs `future` inside `span` when there is one (tracing on), as is otherwise: the request
/// paths build their spans only when [`tracing_enabled`].
pub fn in_span<F: std::future::Future>(
    span: Option<tracing::Span>,
    future: F,
) -> tracing::instrument::Instrumented<F> {
    use tracing::Instrument as _;
    // Not an `async fn`: that would hold `future` twice (the argument and what awaits it), and
    // the request's future — moved once per request by hyper — would double in size.
    future.instrument(span.unwrap_or_else(tracing::Span::none))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        map.insert("traceparent", traceparent.parse().unwrap());
        map
    }

    #[test]
    fn a_valid_traceparent_decides_by_its_sampled_flag() {
        let id = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
        assert!(should_trace(&headers(&format!("{id}-01"))));
        assert!(should_trace(&headers(&format!("{id}-0b"))));
        // RATIO is 1.0 in unit tests: a false here can only come from the flag.
        assert!(!should_trace(&headers(&format!("{id}-00"))));
        assert!(!should_trace(&headers(&format!("{id}-0a"))));
    }

    #[test]
    fn bad_tracing_keys_are_named() {
        let ratio = TracingConfig {
            sample_ratio: Some(1.5),
            ..TracingConfig::default()
        };
        let error = ratio.validate_in("tracing").unwrap_err().to_string();
        assert!(error.contains("tracing.sample_ratio"), "{error}");
        let endpoint = TracingConfig {
            endpoint: Some("collector:4318".into()),
            ..TracingConfig::default()
        };
        let error = endpoint.validate_in("tracing").unwrap_err().to_string();
        assert!(error.contains("tracing.endpoint"), "{error}");
        assert!(TracingConfig::default().validate_in("tracing").is_ok());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-00",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-00",
            "garbage",
        ] {
            assert!(!is_traceparent(bad.as_bytes()), "{bad}");
        }
        let fresh = unsampled_traceparent();
        assert!(is_traceparent(fresh.as_bytes()));
        assert!(!should_trace(&headers(fresh.to_str().unwrap())));
    }
}
