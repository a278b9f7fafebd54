//! `hibiki trace collect` receives the mesh's spans over OTLP/gRPC and
//! writes them to a file, one JSON object per line; `hibiki trace report`
//! reads such a file and says where the time went (see [`report`]).
//!
//! ```text
//! hibiki trace collect --out storm.spans &          # listens on 127.0.0.1:4317
//! HIBIKI_OTLP_ENDPOINT=http://127.0.0.1:4317 hibiki dev
//! hibiki storm --users 10000 --rate 1000
//! kill %1                                           # flushes and says what it got
//! hibiki trace report storm.spans
//! ```

pub mod report;

use std::io::{BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use hibiki_runtime::Shutdown;
use hibiki_runtime::otlp::{Span, SpanSink, trace_service};

/// Options of `hibiki trace`.
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    command: TraceCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TraceCommand {
    /// Receive spans over OTLP/gRPC and write them to a file (JSON lines)
    /// until Ctrl-C, SIGTERM or --seconds.
    Collect(CollectArgs),
    /// Time per stage, queue wait versus work, the critical path of the
    /// slowest traces and the top bottleneck, from a collected file.
    Report(ReportArgs),
}

/// Options of `hibiki trace collect`.
#[derive(Debug, clap::Args)]
pub struct CollectArgs {
    /// Where to listen for OTLP/gRPC (point the services'
    /// HIBIKI_OTLP_ENDPOINT at http://<this>).
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: SocketAddr,
    /// The file to write (replaced if it exists).
    #[arg(long, default_value = "hibiki.spans")]
    out: PathBuf,
    /// Stop after this many seconds (default: at Ctrl-C or SIGTERM).
    #[arg(long)]
    seconds: Option<u64>,
}

/// Options of `hibiki trace report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A file written by `hibiki trace collect`.
    file: PathBuf,
    /// How many of the slowest traces' critical paths to print.
    #[arg(long, default_value_t = 3)]
    slowest: usize,
    /// Only the traces whose first span has this name (e.g. `webhook` for
    /// the taps of a storm, leaving out the checks made after it).
    #[arg(long)]
    root: Option<String>,
}

pub async fn run(args: TraceArgs) -> ExitCode {
    let result = match args.command {
        TraceCommand::Collect(args) => collect(args).await,
        TraceCommand::Report(args) => report_file(&args.file, args.slowest, args.root.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hibiki trace: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Hands received spans to the writer thread, counting them.
struct FileSink {
    spans: mpsc::Sender<Vec<Span>>,
    received: Arc<AtomicU64>,
}

impl SpanSink for FileSink {
    fn accept(&self, spans: Vec<Span>) {
        self.received
            .fetch_add(spans.len() as u64, Ordering::Relaxed);
        // The writer only goes away after the server has stopped.
        let _ = self.spans.send(spans);
    }
}

/// Writes batches as JSON lines; returns how many spans it wrote.
fn write_spans(file: std::fs::File, batches: mpsc::Receiver<Vec<Span>>) -> std::io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut written = 0;
    for batch in batches {
        for span in batch {
            serde_json::to_writer(&mut out, &span)?;
            out.write_all(b"\n")?;
            written += 1;
        }
    }
    out.flush()?;
    Ok(written)
}

async fn collect(args: CollectArgs) -> Result<(), String> {
    let file = std::fs::File::create(&args.out)
        .map_err(|e| format!("--out {}: {e}", args.out.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let (tx, rx) = mpsc::channel();
    let writer = std::thread::spawn(move || write_spans(file, rx));
    let received = Arc::new(AtomicU64::new(0));
    let sink = FileSink {
        spans: tx,
        received: received.clone(),
    };
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    if let Some(seconds) = args.seconds {
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            s.trigger();
        });
    }
    println!(
        "hibiki trace collect: OTLP/gRPC on http://{} → {} (Ctrl-C stops)",
        args.listen,
        args.out.display()
    );
    let progress = {
        let received = received.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.is_triggered() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = stop.cancelled() => break,
                }
                let now = received.load(Ordering::Relaxed);
                if now != last {
                    eprintln!("hibiki trace collect: {now} spans so far");
                    last = now;
                }
            }
        })
    };
    // The server owns the sink; when it stops, the writer's channel closes.
    tonic::transport::Server::builder()
        .add_service(trace_service(sink))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.wait(),
        )
        .await
        .map_err(|e| format!("the OTLP server stopped: {e}"))?;
    progress.abort();
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| format!("the writer: {e}"))?
        .map_err(|_| "the writer panicked".to_owned())?
        .map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    println!(
        "hibiki trace collect: {written} spans written to {}",
        args.out.display()
    );
    Ok(())
}

/// Reads a collected file.
pub fn read_spans(path: &Path) -> Result<Vec<Span>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut spans = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let span: Span = serde_json::from_str(&line).map_err(|e| {
            format!(
                "{} line {}: not a span written by hibiki trace collect: {e}",
                path.display(),
                n + 1
            )
        })?;
        spans.push(span);
    }
    Ok(spans)
}

fn report_file(path: &Path, slowest: usize, root: Option<&str>) -> Result<(), String> {
    let spans = read_spans(path)?;
    let report = report::analyse(&spans, slowest, root);
    print!("{}", report.text);
    if report.incomplete > report.traces {
        eprintln!(
            "hibiki trace report: most traces are incomplete; if the services dropped spans, \
             raise OTEL_BSP_MAX_QUEUE_SIZE (default 2048) or lower HIBIKI_TRACE_SAMPLE_RATIO"
        );
    }
    if report.traces == 0 {
        return Err(format!(
            "{}: no complete trace (were the services' HIBIKI_OTLP_ENDPOINT pointed at the collector?)",
            path.display()
        ));
    }
    Ok(())
}
