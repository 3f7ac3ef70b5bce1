//! An OTLP/gRPC receiver in the test process (the collector's side of the protocol, from
//! `opentelemetry-proto`): it keeps every metric point and span it is sent, flattened.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};

/// One data point: its resource, metric name, attributes and value (a histogram's sum, with
/// its count).
#[derive(Debug, Clone)]
pub struct Point {
    pub resource: HashMap<String, String>,
    pub name: String,
    pub unit: String,
    pub attributes: HashMap<String, String>,
    pub value: f64,
    pub count: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Span {
    pub resource: HashMap<String, String>,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub attributes: HashMap<String, String>,
    pub start_ns: u64,
    pub end_ns: u64,
}

#[derive(Default, Clone)]
struct Store {
    points: Arc<Mutex<Vec<Point>>>,
    spans: Arc<Mutex<Vec<Span>>>,
}

fn flat(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn number(v: &Option<number_data_point::Value>) -> f64 {
    match v {
        Some(number_data_point::Value::AsDouble(d)) => *d,
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        None => f64::NAN,
    }
}

#[tonic::async_trait]
impl MetricsService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rm in request.into_inner().resource_metrics {
            let resource = flat(rm.resource.as_ref().map_or(&[][..], |r| &r.attributes));
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let mut push = |attributes: &[KeyValue], value: f64, count: Option<u64>| {
                        out.push(Point {
                            resource: resource.clone(),
                            name: m.name.clone(),
                            unit: m.unit.clone(),
                            attributes: flat(attributes),
                            value,
                            count,
                        })
                    };
                    match &m.data {
                        Some(metric::Data::Gauge(g)) => {
                            for p in &g.data_points {
                                push(&p.attributes, number(&p.value), None);
                            }
                        }
                        Some(metric::Data::Sum(s)) => {
                            for p in &s.data_points {
                                push(&p.attributes, number(&p.value), None);
                            }
                        }
                        Some(metric::Data::Histogram(h)) => {
                            for p in &h.data_points {
                                push(&p.attributes, p.sum.unwrap_or(f64::NAN), Some(p.count));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.points.lock().unwrap().extend(out);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = flat(rs.resource.as_ref().map_or(&[][..], |r| &r.attributes));
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        resource: resource.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        attributes: flat(&s.attributes),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver, serving until dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    store: Store,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start() -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let store = Store::default();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(store.clone()))
            .add_service(TraceServiceServer::new(store.clone()))
            .serve_with_incoming(incoming);
        rt.spawn(server);
        Receiver {
            addr,
            store,
            _rt: rt,
        }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for a process that should export here.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn points(&self) -> Vec<Point> {
        self.store.points.lock().unwrap().clone()
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.spans.lock().unwrap().clone()
    }

    /// The environment that points a Kiln process at this receiver, exporting often.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), self.endpoint()),
            ("OTEL_METRIC_EXPORT_INTERVAL".into(), "500".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
            ("OTEL_BSP_MAX_QUEUE_SIZE".into(), "65536".into()),
        ]
    }
}
