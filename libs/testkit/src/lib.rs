//! Test helpers for hibiki's integration tests, so tests cannot interfere
//! with each other: a fresh PostgreSQL database per test (dropped when the
//! test ends), a fresh Redis key prefix, private `redis-server` processes a
//! test may stop and restart, free ports, and waits on gRPC health and
//! reflection with deadlines instead of sleeps.
//!
//! The shared PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) must be
//! running: `.ci/run` starts them. A helper that cannot reach them panics
//! with the command that starts them; it never skips.
#![forbid(unsafe_code)]

pub mod otlp;
pub mod probe;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hibiki_runtime::config::{DEFAULT_REDIS_URL, PostgresConfig, Secret};
use hibiki_runtime::postgres;
use rand::Rng;
use sqlx::Connection;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// PostgreSQL server tests use, as root with trust auth.
pub const POSTGRES_SERVER: &str = "postgres://root@127.0.0.1:5432";

/// A short random lowercase id, for database names and key prefixes.
pub fn random_id() -> String {
    let mut rng = rand::rng();
    (0..12)
        .map(|_| (b'a' + rng.random_range(0..26)) as char)
        .collect()
}

/// Ports [`free_port`] and [`free_port_run`] handed out in this process.
/// Never the same port twice: a port handed out is not bound until its user
/// binds it, so a second pick could find it free too (the k8s test's
/// eighteen ports met that once).
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A free TCP port on 127.0.0.1, bound and released. It is taken below the
/// kernel's ephemeral range (`net.ipv4.ip_local_port_range`), where no
/// outgoing connection can take it in between: a port that port 0 hands
/// out is ephemeral, and the many connections of a test run reused such
/// ports before the server under test could bind them.
pub fn free_port() -> u16 {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let top = ephemeral_from.saturating_sub(16).max(12_000);
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(10_000..top);
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
}

/// A base port with the `len - 1` ports after it free too, for a process
/// that takes consecutive ports (`hibiki dev`).
pub fn free_port_run(len: u16) -> u16 {
    loop {
        let base = free_port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if base <= u16::MAX - len
            && (1..len).all(|i| {
                !handed_out.contains(&(base + i))
                    && TcpListener::bind(("127.0.0.1", base + i)).is_ok()
            })
        {
            handed_out.extend((1..len).map(|i| base + i));
            return base;
        }
    }
}

/// A database of its own for one test, and a Redis key prefix to go with it
/// ([`service_env`] uses it); both dropped (forcibly) when this value is.
pub struct TestDatabase {
    name: String,
    url: String,
    keys: RedisKeys,
}

impl TestDatabase {
    /// Creates `hibiki_test_<random>` on the shared server.
    pub async fn create() -> Self {
        let id = random_id();
        let name = format!("hibiki_test_{id}");
        let url = format!("{POSTGRES_SERVER}/{name}");
        let config = PostgresConfig {
            url: Secret::new(url.clone()),
            max_connections: 2,
        };
        postgres::ensure_database(&config).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {POSTGRES_SERVER} is needed by this test and is not reachable: {e}\n\
                 start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
            )
        });
        Self::named(&id, name, url)
    }

    fn named(id: &str, name: String, url: String) -> Self {
        Self {
            name,
            url,
            keys: RedisKeys::new(DEFAULT_REDIS_URL, &format!("test-{id}")),
        }
    }

    /// A fresh database name that is not created: for code under test that
    /// creates its database itself. Dropped like one created here.
    pub fn reserve() -> Self {
        let id = random_id();
        let name = format!("hibiki_test_{id}");
        let url = format!("{POSTGRES_SERVER}/{name}");
        Self::named(&id, name, url)
    }

    /// The Redis key prefix of this test (`test-<id>`): its keys in the
    /// shared Redis are deleted when this value is dropped.
    pub fn redis_prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// Whether the database exists on the shared server.
    pub async fn exists(&self) -> bool {
        let mut conn = sqlx::PgConnection::connect(&format!("{POSTGRES_SERVER}/postgres"))
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 answers");
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&self.name)
            .fetch_one(&mut conn)
            .await
            .expect("pg_database can be read")
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on async
        // work: do it on a thread with a runtime of its own.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for dropping the test database");
            rt.block_on(async move {
                let mut conn =
                    sqlx::PgConnection::connect(&format!("{POSTGRES_SERVER}/postgres")).await?;
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
    }
}

/// `GET /metrics` from `addr`: the status code and the body.
pub async fn scrape_metrics(addr: std::net::SocketAddr) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to the metrics port {addr}: {e}"));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: hibiki\r\nConnection: close\r\n\r\n")
        .await
        .expect("sending the scrape");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("reading the scrape");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A `redis-server` of the test's own on a free port, which the test may stop
/// and start again (on the same port) to see how a service copes.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers PING.
    pub async fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
        };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, waiting until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (apt-get install -y redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_answers(&self.url()).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of the test's own: three primaries on free ports (each
/// with its cluster bus port, 10,000 above, free too), the 16,384 slots
/// spread over them by `redis-cli --cluster create`. Stopped on drop.
pub struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts the three nodes and waits until the cluster reports `ok`.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("hibiki-cluster-{}", random_id()));
        std::fs::create_dir_all(&dir).expect("a directory for the nodes' files");
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let port = free_port();
            if port < 55_000
                && !ports.contains(&port)
                && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                ports.push(port);
            }
        }
        let children = ports
            .iter()
            .map(|port| {
                Command::new("redis-server")
                    .args(["--bind", "127.0.0.1", "--port"])
                    .arg(port.to_string())
                    .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                    .arg(dir.join(format!("nodes-{port}.conf")))
                    .arg("--dir")
                    .arg(&dir)
                    .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server must be on PATH (apt-get install -y redis-server)")
            })
            .collect();
        let cluster = Self {
            ports,
            children,
            dir,
        };
        for url in cluster.node_urls() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !redis_answers(&url).await {
                assert!(
                    Instant::now() < deadline,
                    "{url} did not answer within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be on PATH (apt-get install -y redis-tools)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for url in cluster.node_urls() {
            loop {
                let state = cluster_state(&url).await;
                if state.as_deref() == Some("ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "{url}: cluster_state {state:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    /// Every node's `redis://127.0.0.1:<port>`.
    pub fn node_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// `HIBIKI_REDIS_URL` for the cluster: its nodes, comma-separated.
    pub fn url(&self) -> String {
        self.node_urls().join(",")
    }

    /// The settings that point a service at the cluster.
    pub fn settings(&self) -> [(String, String); 2] {
        [
            ("HIBIKI_REDIS_URL".into(), self.url()),
            ("HIBIKI_REDIS_CLUSTER".into(), "true".into()),
        ]
    }

    /// How many keys the node at `url` holds: that the keys are spread.
    pub async fn keys_on(url: &str) -> u64 {
        let client = hibiki_runtime::redis::redis::Client::open(url).expect("a node URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("the node answers");
        hibiki_runtime::redis::redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .expect("DBSIZE")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn cluster_state(url: &str) -> Option<String> {
    let client = hibiki_runtime::redis::redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = hibiki_runtime::redis::redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.trim().strip_prefix("cluster_state:"))
        .map(str::to_owned)
}

async fn redis_answers(url: &str) -> bool {
    let Ok(client) = hibiki_runtime::redis::redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    hibiki_runtime::redis::redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

/// One keep-alive HTTP/1.1 connection to a server of ours (the gateway's
/// webhook port, line-sim), reconnecting when the server closed it.
pub struct HttpConnection {
    addr: std::net::SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl HttpConnection {
    /// A connection to `addr`, opened on first use.
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    async fn sender(
        &mut self,
    ) -> std::io::Result<
        &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    > {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just connected"))
    }

    /// POSTs `body` to `path` with `headers`; returns the status and the
    /// body. Errors only when no answer came (connection refused or cut).
    pub async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<bytes::Bytes>,
    ) -> std::io::Result<(u16, String)> {
        use http_body_util::BodyExt;
        let mut request = http::Request::post(path).header("host", self.addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Full::new(body.into()))
            .map_err(std::io::Error::other)?;
        let sender = self.sender().await?;
        sender.ready().await.map_err(std::io::Error::other)?;
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(std::io::Error::other(e));
            }
        };
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

impl HttpConnection {
    /// POSTs `body` every 50 ms until the answer is 200, for up to
    /// `within`: waiting until a server accepts (started, recovered, has
    /// room again). The error is the last answer seen.
    pub async fn post_until_ok(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<bytes::Bytes>,
        within: Duration,
    ) -> Result<String, String> {
        let body = body.into();
        let deadline = Instant::now() + within;
        loop {
            let last = match self.post(path, headers, body.clone()).await {
                Ok((200, text)) => return Ok(text),
                Ok((status, text)) => format!("{status} {text}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Deletes every key under a Redis key prefix when dropped, so a test's
/// streams and dedupe hashes do not outlive it (also when it fails).
pub struct RedisKeys {
    url: String,
    prefix: String,
}

impl RedisKeys {
    /// Keys `<prefix>:*` at `url`, deleted on drop.
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

/// A handle on the local Redis (`DEFAULT_REDIS_URL`) under a fresh
/// `test-<random>` prefix, with the guard that deletes its keys.
pub fn redis_of_its_own() -> (hibiki_runtime::redis::Redis, RedisKeys) {
    use hibiki_runtime::config::{DEFAULT_REDIS_URL, RedisConfig, Secret};
    let prefix = format!("test-{}", random_id());
    let redis = hibiki_runtime::redis::Redis::connect_lazy(&RedisConfig {
        url: Secret::new(DEFAULT_REDIS_URL.to_owned()),
        cluster: false,
        key_prefix: prefix.clone(),
        pool_size: 2,
    })
    .expect("a Redis handle");
    (redis, RedisKeys::new(DEFAULT_REDIS_URL, &prefix))
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and the test's runtime
        // may be shutting down.
        let Ok(client) = hibiki_runtime::redis::redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return;
        };
        let _: Result<(), _> = hibiki_runtime::redis::redis::cmd("EVAL")
            .arg(
                "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                 redis.call('UNLINK', k) n = n + 1 end return n",
            )
            .arg(0)
            .arg(format!("{}:*", self.prefix))
            .query::<i64>(&mut conn)
            .map(|_| ());
    }
}

/// The service token services under test accept.
pub const SERVICE_TOKEN: &str = "test-service-token-0123456789";

/// Tenants for which services under test accept an operator token.
pub const OPERATOR_TENANTS: [&str; 2] = ["acme", "globex"];

/// The operator token of `tenant` (one of [`OPERATOR_TENANTS`]).
pub fn operator_token(tenant: &str) -> String {
    format!("operator-{tenant}-token-0123456789")
}

/// A channel to `url` that presents `token` and the current trace context
/// on every call: wrap it in a generated client.
pub fn authorized(
    url: &str,
    token: &str,
) -> tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    hibiki_runtime::grpc::ClientInterceptor,
> {
    let channel = hibiki_runtime::grpc::channel(url).expect("a valid URL");
    let interceptor =
        hibiki_runtime::grpc::ClientInterceptor::new(&Secret::new(token)).expect("an ASCII token");
    tonic::service::interceptor::InterceptedService::new(channel, interceptor)
}

/// The `p` field of every entry of the Redis stream `key` at `redis_url`,
/// oldest first: how hibiki's streams carry their protobuf payloads.
pub async fn stream_payloads(redis_url: &str, key: &str) -> Vec<Vec<u8>> {
    stream_fields(redis_url, key, "p").await
}

/// The `field` of every entry of the Redis stream `key` at `redis_url`,
/// oldest first.
pub async fn stream_fields(redis_url: &str, key: &str, field: &str) -> Vec<Vec<u8>> {
    /// (entry id, [(field, value)]).
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let client = hibiki_runtime::redis::redis::Client::open(redis_url).expect("a Redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let entries: Vec<Entry> = hibiki_runtime::redis::redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE works");
    entries
        .into_iter()
        .filter_map(|(_, fields)| fields.into_iter().find(|(f, _)| f == field).map(|(_, v)| v))
        .collect()
}

/// Settings for a service under test: its own database, the shared Redis
/// (or `redis_url`), the database's key prefix (deleted with it), port 0 for
/// every listener, the test service token and operator tokens for
/// [`OPERATOR_TENANTS`].
pub fn service_env(database: &TestDatabase, redis_url: Option<&str>) -> HashMap<String, String> {
    HashMap::from([
        ("HIBIKI_DATABASE_URL".into(), database.url().to_owned()),
        (
            "HIBIKI_REDIS_URL".into(),
            redis_url.unwrap_or(DEFAULT_REDIS_URL).to_owned(),
        ),
        (
            "HIBIKI_REDIS_PREFIX".into(),
            database.redis_prefix().to_owned(),
        ),
        ("HIBIKI_GRPC_ADDR".into(), "127.0.0.1:0".into()),
        ("HIBIKI_METRICS_ADDR".into(), "127.0.0.1:0".into()),
        ("HIBIKI_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("HIBIKI_SERVICE_TOKENS".into(), SERVICE_TOKEN.into()),
        (
            "HIBIKI_OPERATOR_TOKENS".into(),
            OPERATOR_TENANTS
                .iter()
                .map(|t| format!("{t}={}", operator_token(t)))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ])
}

/// Waits until `url` reports `want` over gRPC health; panics after 20 s.
pub async fn wait_for_health(url: &str, want: tonic_health::ServingStatus) {
    if let Err(e) = hibiki_runtime::grpc::wait_for_health(url, want, Duration::from_secs(20)).await
    {
        panic!("{e}");
    }
}

/// The services `url` lists over gRPC reflection (v1), sorted.
pub async fn reflected_services(url: &str) -> Vec<String> {
    let channel = hibiki_runtime::grpc::channel(url).expect("a valid URL");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("a reflection response")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

/// A service binary running as a child process.
pub struct ServiceProcess {
    child: Child,
    /// Its gRPC URL.
    pub url: String,
    /// Its metrics address.
    pub metrics_addr: std::net::SocketAddr,
}

impl ServiceProcess {
    /// Starts `binary` with `env` (on top of the test's environment) on a free
    /// gRPC and metrics port.
    pub fn spawn(binary: &Path, mut env: HashMap<String, String>) -> Self {
        let port = free_port();
        let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        env.insert("HIBIKI_GRPC_ADDR".into(), format!("127.0.0.1:{port}"));
        env.insert("HIBIKI_METRICS_ADDR".into(), metrics_addr.to_string());
        env.entry("HIBIKI_LOG_FORMAT".into())
            .or_insert_with(|| "json".into());
        // Warnings and errors reach the test's output; the rest is noise.
        env.entry("HIBIKI_LOG".into())
            .or_insert_with(|| "warn".into());
        // The shared test settings name every service's variables; give the
        // binary only those it reads, so that it has nothing to warn about.
        let output = Command::new(binary)
            .arg("settings")
            .output()
            .unwrap_or_else(|e| panic!("running {} settings: {e}", binary.display()));
        let reads: std::collections::HashSet<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        env.retain(|k, _| !k.starts_with("HIBIKI_") || reads.contains(k));
        let child = Command::new(binary)
            .envs(env)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            metrics_addr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit; `None` if it is still running after
    /// `timeout`.
    /// (Async so that the test's own client connections keep running and can
    /// answer the server's GOAWAY while it drains.)
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder a test can cut and restore, to see how a service copes
/// with a store going away and coming back without stopping the shared
/// server itself.
pub struct TcpProxy {
    port: u16,
    target: std::net::SocketAddr,
    cut: Option<tokio_util::sync::CancellationToken>,
}

impl TcpProxy {
    /// Forwards a free local port to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Self {
        // A port found free can be taken before it is bound again (CI saw
        // it twice): bind at once, and pick another if it was.
        for _ in 0..50 {
            let port = free_port();
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(listener) => {
                    let mut proxy = Self {
                        port,
                        target,
                        cut: None,
                    };
                    proxy.forward(listener);
                    return proxy;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("binding the proxy port {port}: {e}"),
            }
        }
        panic!("no free port for the proxy after 50 tries");
    }

    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes the listener and every forwarded connection.
    pub fn cut(&mut self) {
        if let Some(token) = self.cut.take() {
            token.cancel();
        }
    }

    /// Listens and forwards again, on the same port.
    pub async fn restore(&mut self) {
        self.cut();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebinding the proxy port");
        self.forward(listener);
    }

    /// Forwards what `listener` accepts until the next cut.
    fn forward(&mut self, listener: tokio::net::TcpListener) {
        let token = tokio_util::sync::CancellationToken::new();
        let target = self.target;
        let stop = token.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        self.cut = Some(token);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Behaviour every service shares, checked once per service so that each
/// binary and each service's wiring of stores is proven, not assumed.
pub mod lifecycle {
    use super::*;
    use hibiki_runtime::Shutdown;
    use hibiki_runtime::app::Service;
    use tonic_health::ServingStatus;

    /// The services every hibiki server lists over reflection.
    pub const BASE_SERVICES: [&str; 2] = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];

    /// The binary starts against the real stores, reports SERVING, lists
    /// `expected_services` (besides health and reflection) over reflection,
    /// serves Prometheus metrics, and exits cleanly within a second of
    /// SIGTERM.
    pub async fn binary_serves_and_stops_on_sigterm(binary: &Path, expected_services: &[&str]) {
        binary_serves_and_stops_on_sigterm_with(binary, expected_services, &[]).await;
    }

    /// [`binary_serves_and_stops_on_sigterm`] with extra settings (e.g. where
    /// another service it needs is).
    pub async fn binary_serves_and_stops_on_sigterm_with(
        binary: &Path,
        expected_services: &[&str],
        settings: &[(&str, &str)],
    ) {
        let database = TestDatabase::create().await;
        let mut env = service_env(&database, None);
        for (k, v) in settings {
            env.insert((*k).into(), (*v).into());
        }
        let mut process = ServiceProcess::spawn(binary, env);
        wait_for_health(&process.url, ServingStatus::Serving).await;

        let mut want: Vec<String> = BASE_SERVICES
            .iter()
            .chain(expected_services)
            .map(|s| (*s).to_owned())
            .collect();
        want.sort();
        assert_eq!(reflected_services(&process.url).await, want);

        let (status, body) = scrape_metrics(process.metrics_addr).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("hibiki_serving"),
            "metrics lack hibiki_serving:\n{body}"
        );

        process.terminate();
        let status = process
            .wait_exit(Duration::from_secs(1))
            .await
            .expect("the service exits within a second of SIGTERM");
        assert!(status.success(), "exit status after SIGTERM: {status}");
    }

    /// Starts `S` in-process with `env`; returns its gRPC URL, its shutdown
    /// signal and its task. With `HIBIKI_TEST_LOG` set (a log filter such as
    /// `info`), the service's logs go to the test's output.
    pub async fn start<S: Service>(
        env: &HashMap<String, String>,
    ) -> (
        String,
        Shutdown,
        tokio::task::JoinHandle<Result<(), hibiki_runtime::HostError>>,
    ) {
        if let Ok(filter) = std::env::var("HIBIKI_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let config = S::config_from_env(env).expect("a valid test configuration");
        let app = S::build(config).await.expect("the service builds");
        let url = format!("http://{}", app.grpc_addr());
        let shutdown = Shutdown::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        (url, shutdown, task)
    }

    /// Health goes NOT_SERVING while Redis is down and SERVING again once it
    /// is back, with no restart of the service.
    pub async fn health_follows_redis<S: Service>() {
        health_follows_redis_with::<S>(&[]).await;
    }

    /// [`health_follows_redis`] with extra settings.
    pub async fn health_follows_redis_with<S: Service>(settings: &[(&str, &str)]) {
        let database = TestDatabase::create().await;
        let mut redis = RedisServer::start().await;
        let mut env = service_env(&database, Some(&redis.url()));
        for (k, v) in settings {
            env.insert((*k).into(), (*v).into());
        }
        let (url, shutdown, task) = start::<S>(&env).await;
        wait_for_health(&url, ServingStatus::Serving).await;

        redis.stop();
        wait_for_health(&url, ServingStatus::NotServing).await;

        redis.restart().await;
        wait_for_health(&url, ServingStatus::Serving).await;

        shutdown.trigger();
        task.await.expect("no panic").expect("a clean stop");
    }

    /// Health is NOT_SERVING while PostgreSQL is unreachable (from the
    /// start: migrations cannot run), and SERVING once it is reachable.
    pub async fn health_follows_postgres<S: Service>() {
        health_follows_postgres_with::<S>(&[]).await;
    }

    /// [`health_follows_postgres`] with extra settings.
    pub async fn health_follows_postgres_with<S: Service>(settings: &[(&str, &str)]) {
        let database = TestDatabase::create().await;
        let mut proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
        proxy.cut();
        let mut env = service_env(&database, None);
        for (k, v) in settings {
            env.insert((*k).into(), (*v).into());
        }
        let name = database.url().rsplit('/').next().unwrap().to_owned();
        env.insert(
            "HIBIKI_DATABASE_URL".into(),
            format!("postgres://root@127.0.0.1:{}/{name}", proxy.port()),
        );
        let (url, shutdown, task) = start::<S>(&env).await;
        wait_for_health(&url, ServingStatus::NotServing).await;
        // Liveness stays SERVING: an outage must not get every pod restarted.
        assert_eq!(
            hibiki_runtime::grpc::health_status(&url, hibiki_runtime::host::LIVENESS)
                .await
                .expect("liveness answers"),
            ServingStatus::Serving,
            "liveness while PostgreSQL is away"
        );

        proxy.restore().await;
        wait_for_health(&url, ServingStatus::Serving).await;

        proxy.cut();
        wait_for_health(&url, ServingStatus::NotServing).await;

        shutdown.trigger();
        task.await.expect("no panic").expect("a clean stop");
    }
}
