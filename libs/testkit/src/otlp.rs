//! An OTLP/gRPC trace receiver that keeps every span it is sent, so a test
//! can check what a service exported: names, trace ids, parent links, times
//! and services.

use std::sync::{Arc, Mutex};

pub use hibiki_runtime::otlp::Span as ReceivedSpan;
use hibiki_runtime::otlp::{Span, SpanSink, trace_service};

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Span>>>);

impl SpanSink for Store {
    fn accept(&self, spans: Vec<Span>) {
        self.0
            .lock()
            .expect("the span store is never poisoned")
            .extend(spans);
    }
}

/// A running receiver on a free loopback port.
pub struct Receiver {
    url: String,
    store: Store,
}

impl Receiver {
    /// Starts one.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the OTLP receiver");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let store = Store::default();
        let service = trace_service(store.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("the OTLP receiver runs");
        });
        Self { url, store }
    }

    /// The endpoint to export to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store.0.lock().expect("never poisoned").clone()
    }
}
