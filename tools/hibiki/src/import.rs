//! `hibiki import contacts.csv --tenant T`: streams a CSV of the company's
//! contacts through contacts' `ImportContacts`, with a progress bar, and
//! prints a summary: rows imported, rows rejected with their reasons, time,
//! rows per second.
//!
//! The CSV has a header row. Columns:
//! - `line_user_id` (required): the LINE user id;
//! - `display_name` (optional);
//! - `tags` (optional): tags separated by `;`;
//! - any other column is an attribute, typed by a suffix on its name:
//!   `age:number`, `vip:bool`, `signup:timestamp` (RFC 3339), `city` or
//!   `city:string`. An empty cell leaves the attribute out.
//!
//! A row the CLI cannot read (a wrong number of cells, a number that is not
//! one) is reported with its line and column and skipped; rows the service
//! rejects come back with their line and field. Re-running the same file
//! resumes: the import id is derived from the file's name, size and
//! modification time unless `--import-id` is given.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hibiki_proto::common::v1::{Value, value::Kind};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::{
    ImportBatch, ImportContactsRequest, ImportHeader, ImportRecord, RowError,
    import_contacts_request::Item,
};
use hibiki_runtime::config::{DEV_SERVICE_TOKEN, Secret};
use hibiki_runtime::grpc::{self, ClientInterceptor};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Records per streamed message.
const BATCH_RECORDS: usize = 1000;

/// Options of `hibiki import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The CSV file.
    file: PathBuf,
    /// The tenant the contacts belong to.
    #[arg(long)]
    tenant: String,
    /// The import id; re-running with the same id resumes. Default: derived
    /// from the file's name, size and modification time.
    #[arg(long)]
    import_id: Option<String>,
    /// Replace each contact's tags with the file's instead of adding them.
    #[arg(long)]
    replace_tags: bool,
    /// The contacts service.
    #[arg(
        long,
        env = "HIBIKI_CONTACTS_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    contacts: String,
    /// Bearer token (an operator token of the tenant, or a service token).
    #[arg(long, env = "HIBIKI_TOKEN", default_value = DEV_SERVICE_TOKEN, hide_default_value = true)]
    token: String,
    /// No progress bar (for scripts and logs).
    #[arg(long)]
    quiet: bool,
}

/// How one column maps onto a record.
#[derive(Debug, Clone)]
enum Column {
    UserId,
    DisplayName,
    Tags,
    Attribute { name: String, kind: AttrKind },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AttrKind {
    String,
    Number,
    Bool,
    Timestamp,
}

fn parse_header(header: &csv::StringRecord) -> Result<Vec<Column>, String> {
    let mut columns = Vec::new();
    for name in header {
        let name = name.trim();
        let column = match name {
            "line_user_id" => Column::UserId,
            "display_name" => Column::DisplayName,
            "tags" => Column::Tags,
            _ => {
                let (attr, kind) = match name.rsplit_once(':') {
                    Some((a, "string")) => (a, AttrKind::String),
                    Some((a, "number")) => (a, AttrKind::Number),
                    Some((a, "bool")) => (a, AttrKind::Bool),
                    Some((a, "timestamp")) => (a, AttrKind::Timestamp),
                    Some((_, other)) if !other.is_empty() && !other.contains(' ') => {
                        return Err(format!(
                            "column {name:?}: unknown type {other:?} (string, number, bool or timestamp)"
                        ));
                    }
                    _ => (name, AttrKind::String),
                };
                Column::Attribute {
                    name: attr.to_owned(),
                    kind,
                }
            }
        };
        columns.push(column);
    }
    if !columns.iter().any(|c| matches!(c, Column::UserId)) {
        return Err("the header has no line_user_id column".into());
    }
    Ok(columns)
}

fn parse_value(cell: &str, kind: AttrKind) -> Result<Value, String> {
    let kind = match kind {
        AttrKind::String => Kind::StringValue(cell.to_owned()),
        AttrKind::Number => Kind::NumberValue(
            cell.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .ok_or_else(|| format!("{cell:?} is not a number"))?,
        ),
        AttrKind::Bool => Kind::BoolValue(match cell.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("{cell:?} is not true or false")),
        }),
        AttrKind::Timestamp => {
            let t = chrono::DateTime::parse_from_rfc3339(cell)
                .map_err(|e| format!("{cell:?} is not an RFC 3339 time: {e}"))?;
            Kind::TimestampValue(hibiki_runtime::timestamp::to_proto(t.to_utc()))
        }
    };
    Ok(Value { kind: Some(kind) })
}

/// Reads one CSV record; the error names the column.
fn to_record(
    columns: &[Column],
    row: u64,
    cells: &csv::StringRecord,
) -> Result<ImportRecord, RowError> {
    let mut record = ImportRecord {
        row,
        ..Default::default()
    };
    for (column, cell) in columns.iter().zip(cells.iter()) {
        let cell = cell.trim();
        match column {
            Column::UserId => record.line_user_id = cell.to_owned(),
            Column::DisplayName => record.display_name = cell.to_owned(),
            Column::Tags => {
                record.tags = cell
                    .split(';')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            Column::Attribute { name, kind } => {
                if cell.is_empty() {
                    continue;
                }
                let value = parse_value(cell, *kind).map_err(|message| RowError {
                    row,
                    field: format!("attributes.{name}"),
                    message,
                })?;
                record.attributes.insert(name.clone(), value);
            }
        }
    }
    Ok(record)
}

fn default_import_id(path: &std::path::Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let modified = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let stem: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    Ok(format!("{stem}-{}-{modified}", meta.len()))
}

pub async fn run(args: ImportArgs) -> ExitCode {
    match import(args).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("hibiki import: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn import(args: ImportArgs) -> Result<ExitCode, String> {
    let import_id = match args.import_id.clone() {
        Some(id) => id,
        None => {
            default_import_id(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?
        }
    };
    let size = std::fs::metadata(&args.file)
        .map_err(|e| format!("{}: {e}", args.file.display()))?
        .len();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(&args.file)
        .map_err(|e| format!("{}: {e}", args.file.display()))?;
    let header = reader
        .headers()
        .map_err(|e| format!("reading the header: {e}"))?
        .clone();
    let columns = parse_header(&header)?;

    let channel = grpc::channel(&args.contacts).map_err(|e| format!("--contacts: {e}"))?;
    let interceptor = ClientInterceptor::new(&Secret::new(args.token.clone()))
        .map_err(|_| "--token: not a valid header value".to_owned())?;
    let mut client = ContactServiceClient::with_interceptor(channel, interceptor);

    let progress = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .expect("a valid template"),
    );
    progress.enable_steady_tick(Duration::from_millis(200));

    // The reader runs on a blocking thread and feeds the stream.
    let (tx, rx) = mpsc::channel::<ImportContactsRequest>(8);
    let header_message = ImportContactsRequest {
        item: Some(Item::Header(ImportHeader {
            tenant_id: args.tenant.clone(),
            import_id: import_id.clone(),
            replace_tags: args.replace_tags,
        })),
    };
    tx.send(header_message)
        .await
        .map_err(|_| "the import stream closed".to_owned())?;
    let bar = progress.clone();
    let width = columns.len();
    let reader_task = tokio::task::spawn_blocking(move || {
        let mut local_errors: Vec<RowError> = Vec::new();
        let mut rows: u64 = 0;
        let mut batch: Vec<ImportRecord> = Vec::with_capacity(BATCH_RECORDS);
        let mut cells = csv::StringRecord::new();
        loop {
            let line = reader.position().line();
            match reader.read_record(&mut cells) {
                Ok(false) => break,
                Ok(true) => {
                    rows += 1;
                    let row = cells.position().map_or(line, |p| p.line());
                    if cells.len() != width {
                        local_errors.push(RowError {
                            row,
                            field: String::new(),
                            message: format!("{} cells, the header has {width}", cells.len()),
                        });
                        continue;
                    }
                    match to_record(&columns, row, &cells) {
                        Ok(r) => batch.push(r),
                        Err(e) => local_errors.push(e),
                    }
                }
                Err(e) => {
                    rows += 1;
                    local_errors.push(RowError {
                        row: line + 1,
                        field: String::new(),
                        message: format!("unreadable CSV: {e}"),
                    });
                    if !matches!(
                        e.kind(),
                        csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
                    ) {
                        break;
                    }
                }
            }
            if batch.len() == BATCH_RECORDS {
                let message = ImportContactsRequest {
                    item: Some(Item::Batch(ImportBatch {
                        records: std::mem::take(&mut batch),
                    })),
                };
                if tx.blocking_send(message).is_err() {
                    break;
                }
                bar.set_position(reader.position().byte());
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(ImportContactsRequest {
                item: Some(Item::Batch(ImportBatch { records: batch })),
            });
        }
        bar.set_position(size);
        (rows, local_errors)
    });

    let started = Instant::now();
    let response = client.import_contacts(ReceiverStream::new(rx)).await;
    let (rows, mut errors) = reader_task
        .await
        .map_err(|e| format!("reading the file: {e}"))?;
    progress.finish_and_clear();
    let response = response
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let status = response.status.unwrap_or_default();
    let elapsed = started.elapsed();
    errors.extend(status.errors.iter().cloned());
    errors.sort_by_key(|e| e.row);
    let rejected = errors.len() as u64 + status.rejected.saturating_sub(status.errors.len() as u64);
    println!("import {import_id} into tenant {}", args.tenant);
    println!("  rows read      {rows}");
    println!("  imported       {}", status.upserted);
    println!("  rejected       {rejected}");
    println!(
        "  time           {:.1} s ({:.0} rows/s)",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    for e in errors.iter().take(20) {
        let field = if e.field.is_empty() {
            String::new()
        } else {
            format!(" {}", e.field)
        };
        println!("  line {}{field}: {}", e.row, e.message);
    }
    if errors.len() > 20 {
        println!("  … and {} more", rejected - 20);
    }
    Ok(if rejected > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
