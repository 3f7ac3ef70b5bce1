//! Kiln's telemetry: logs to stderr, and, when the standard OpenTelemetry variables ask for
//! it, metrics and traces exported over OTLP/gRPC.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the per-signal
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`) is set and
//! `OTEL_SDK_DISABLED` is not `true`; `OTEL_TRACES_EXPORTER=none` or
//! `OTEL_METRICS_EXPORTER=none` turn one signal off. `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` add to the resource; the SDK reads the other standard variables
//! (`OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, ...).
//!
//! Only Kiln's own spans are exported (targets `kiln*` at INFO or above): one `step` span per
//! optimizer step with `data`, `forward`, `backward`, `collective`, `optimizer` children,
//! `checkpoint.snapshot` / `checkpoint.save` / `checkpoint.load`, `evaluate`, and the
//! coordinator's `recovery`. The metric names are in [`names`].

pub mod names;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// What a process is, for the resource its telemetry carries.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `service.name` unless `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) names it.
    pub service: String,
    /// Resource attributes (`kiln.job.id`, `kiln.rank`, ...); they win over the same keys in
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    pub attributes: Vec<(String, String)>,
}

impl Identity {
    pub fn new(service: &str) -> Identity {
        Identity {
            service: service.to_string(),
            attributes: vec![(names::HOST.to_string(), host_name())],
        }
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Identity {
        self.attributes.push((key.to_string(), value.to_string()));
        self
    }
}

/// Keeps the exporters running; flushes and stops them when dropped (at the end of `main`).
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    // The gRPC channels of the exporters live on this runtime.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether metrics go anywhere (instruments are no-ops otherwise).
    pub fn exporting_metrics(&self) -> bool {
        self.meter.is_some()
    }

    /// Exports what is pending now (before a process exits on its own terms).
    pub fn flush(&self) {
        if let Some(t) = &self.tracer {
            let _ = t.force_flush();
        }
        if let Some(m) = &self.meter {
            let _ = m.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn signal_on(signal: &str) -> bool {
    let upper = signal.to_ascii_uppercase();
    let exporter = var(&format!("OTEL_{upper}_EXPORTER")).unwrap_or_default();
    if exporter.eq_ignore_ascii_case("none") {
        return false;
    }
    var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || var(&format!("OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")).is_some()
}

/// Sets up logging (`RUST_LOG`, default `warn`, to stderr) and, when the environment asks for
/// it, OTLP export of metrics and traces for `identity`. Problems with the exporter are
/// reported on stderr and do not stop the process.
pub fn init(identity: &Identity) -> Telemetry {
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let (traces, metrics) = if disabled {
        (false, false)
    } else {
        (signal_on("traces"), signal_on("metrics"))
    };
    let mut telemetry = Telemetry {
        tracer: None,
        meter: None,
        runtime: None,
    };
    let mut problems = Vec::new();
    if traces || metrics {
        if let Some(p) = var("OTEL_EXPORTER_OTLP_PROTOCOL").filter(|p| p != "grpc") {
            problems.push(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL is {p:?}; Kiln exports OTLP over gRPC"
            ));
        }
        match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kiln-otlp")
            .enable_all()
            .build()
        {
            Ok(rt) => telemetry.runtime = Some(rt),
            Err(e) => problems.push(format!("cannot start the exporter's runtime: {e}")),
        }
    }
    let resource = resource(identity);
    if let Some(rt) = &telemetry.runtime {
        let _entered = rt.enter();
        if traces {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exporter) => {
                    telemetry.tracer = Some(
                        SdkTracerProvider::builder()
                            .with_batch_exporter(exporter)
                            .with_resource(resource.clone())
                            .build(),
                    )
                }
                Err(e) => problems.push(format!("traces: {e}")),
            }
        }
        if metrics {
            match opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exporter) => {
                    let provider = SdkMeterProvider::builder()
                        .with_reader(PeriodicReader::builder(exporter).build())
                        .with_resource(resource)
                        .build();
                    opentelemetry::global::set_meter_provider(provider.clone());
                    telemetry.meter = Some(provider);
                }
                Err(e) => problems.push(format!("metrics: {e}")),
            }
        }
    }

    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // An exporter that cannot reach its collector fails at every export: say so once per
    // kind of failure, not every few seconds for the whole run.
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    let once = tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| {
        !meta.target().starts_with("opentelemetry")
            || seen
                .lock()
                .map_or(true, |mut seen| seen.insert(meta.callsite()))
    }); // (a dynamic filter: asked at every event, not once per call site)
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(log_filter.and(once));
    let spans = telemetry.tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("kiln"))
            // Spans carry Kiln's attributes only, not source locations or thread names.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("kiln") && *meta.level() <= tracing::Level::INFO
            }))
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    for problem in problems {
        tracing::warn!("OpenTelemetry export: {problem}");
    }
    telemetry
}

fn resource(identity: &Identity) -> Resource {
    let named_by_env = var("OTEL_SERVICE_NAME").is_some()
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let mut builder = Resource::builder().with_attributes(
        identity
            .attributes
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    if !named_by_env {
        builder = builder.with_service_name(identity.service.clone());
    }
    builder.build()
}

/// This machine's name (`HOSTNAME`, else `/etc/hostname`, else `localhost`).
pub fn host_name() -> String {
    var("HOSTNAME")
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_string())
}

/// The meter Kiln's instruments come from (a no-op one unless export is on).
pub fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter("kiln")
}

/// An instrument for `metric`, with its unit and description.
pub fn f64_gauge(metric: &names::Metric) -> opentelemetry::metrics::Gauge<f64> {
    meter()
        .f64_gauge(metric.name)
        .with_unit(metric.unit)
        .with_description(metric.description)
        .build()
}

pub fn f64_counter(metric: &names::Metric) -> opentelemetry::metrics::Counter<f64> {
    meter()
        .f64_counter(metric.name)
        .with_unit(metric.unit)
        .with_description(metric.description)
        .build()
}

pub fn u64_counter(metric: &names::Metric) -> opentelemetry::metrics::Counter<u64> {
    meter()
        .u64_counter(metric.name)
        .with_unit(metric.unit)
        .with_description(metric.description)
        .build()
}

pub fn f64_histogram(metric: &names::Metric) -> opentelemetry::metrics::Histogram<f64> {
    meter()
        .f64_histogram(metric.name)
        .with_unit(metric.unit)
        .with_description(metric.description)
        .build()
}
