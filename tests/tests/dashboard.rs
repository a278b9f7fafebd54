//! The dashboard in a real browser: headless Chromium, driven over WebDriver
//! by chromedriver (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs), opens admin-bff's page for the campaign's tenant
//! while 200 friends tap the spring campaign through the whole mesh, and
//! sees the campaign segment's head count on the page reach 200 without a
//! reload. A wrong token gets the sign-in form back and no data.
//!
//! With `HIBIKI_DASHBOARD_SCREENSHOT=<file.png>` the test also saves what the
//! page looked like at the end (the README's screenshot).

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hibiki_testkit::{free_port, lifecycle, operator_token, random_id, wait_for_health};
use serde_json::{Value, json};
use support::{TENANT, mesh, taps};
use tonic_health::ServingStatus;

const TAPS: u64 = 200;

/// chromedriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver must be on PATH: apt-get install -y chromium chromium-driver \
                 (.ci/run installs them)",
            );
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = driver
                .http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success());
            if ready == Some(true) {
                return driver;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let status = response.status();
        let value: Value = response.json().await.expect("WebDriver answers JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {value}");
        value["value"].clone()
    }

    /// A new headless Chromium with a profile of its own.
    async fn browser(&self) -> Browser<'_> {
        let profile = std::env::temp_dir().join(format!("hibiki-chromium-{}", random_id()));
        let session = self
            .call(
                reqwest::Method::POST,
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", "--window-size=1280,1000",
                            format!("--user-data-dir={}", profile.display()),
                        ]
                    }
                }}})),
            )
            .await;
        Browser {
            driver: self,
            id: session["sessionId"]
                .as_str()
                .expect("a session id")
                .to_owned(),
            profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Browser<'d> {
    driver: &'d Driver,
    id: String,
    profile: std::path::PathBuf,
}

impl Browser<'_> {
    async fn open(&self, url: &str) {
        self.driver
            .call(
                reqwest::Method::POST,
                &format!("/session/{}/url", self.id),
                Some(json!({ "url": url })),
            )
            .await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.driver
            .call(
                reqwest::Method::POST,
                &format!("/session/{}/execute/sync", self.id),
                Some(json!({ "script": script, "args": [] })),
            )
            .await
    }

    /// Waits until `script` returns `want`; panics with the last value.
    async fn until(&self, script: &str, want: Value, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.eval(script).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {within:?}, `{script}` is {got}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, to: &str) {
        let png = self
            .driver
            .call(
                reqwest::Method::GET,
                &format!("/session/{}/screenshot", self.id),
                None,
            )
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a base64 PNG"))
            .expect("base64");
        std::fs::write(to, bytes).expect("writing the screenshot");
    }

    async fn close(self) {
        self.driver
            .call(
                reqwest::Method::DELETE,
                &format!("/session/{}", self.id),
                None,
            )
            .await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The campaign segment's head count as the page shows it.
const CAMPAIGN_COUNT: &str = "const c = document.querySelector('[data-name=\"spring campaign\"] .count'); \
     return c ? c.textContent : null;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_campaign_count_rises_to_200_on_the_page_without_a_reload() {
    let mesh = mesh().await;
    let dashboard = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut env = mesh.env.clone();
    env.insert("HIBIKI_HTTP_ADDR".into(), dashboard.to_string());
    env.insert("HIBIKI_ANALYTICS_URL".into(), mesh.analytics.clone());
    let (bff, stop_bff, _t) = lifecycle::start::<hibiki_admin_bff::Application>(&env).await;
    wait_for_health(&bff, ServingStatus::Serving).await;

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser
        .open(&format!(
            "http://{dashboard}/#tenant={TENANT}&token={}",
            operator_token(TENANT)
        ))
        .await;
    browser
        .until(CAMPAIGN_COUNT, json!("0"), Duration::from_secs(20))
        .await;
    browser
        .until(
            "return document.getElementById('live').classList.contains('on');",
            json!(true),
            Duration::from_secs(10),
        )
        .await;
    // A reload would lose this.
    browser.eval("window.hibikiMarker = 42; return null;").await;

    taps(&mesh, 0, TAPS).await;
    browser
        .until(CAMPAIGN_COUNT, json!("200"), Duration::from_secs(90))
        .await;
    assert_eq!(
        browser.eval("return window.hibikiMarker ?? null;").await,
        json!(42),
        "the page was reloaded"
    );
    // The rest of the overview arrived too.
    browser
        .until(
            "return document.querySelectorAll('#funnels .funnel').length > 0;",
            json!(true),
            Duration::from_secs(15),
        )
        .await;
    if let Ok(to) = std::env::var("HIBIKI_DASHBOARD_SCREENSHOT") {
        // Let the 10-second refresh bring the event rates and deliveries.
        tokio::time::sleep(Duration::from_secs(11)).await;
        browser.screenshot(&to).await;
    }
    browser.close().await;

    // A wrong token: the sign-in form again, with the reason, and no data.
    let stranger = driver.browser().await;
    stranger
        .open(&format!(
            "http://{dashboard}/#tenant={TENANT}&token=not-a-token-of-this-mesh"
        ))
        .await;
    stranger
        .until(
            "return document.getElementById('sign-in-error').textContent;",
            json!("unknown token"),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        stranger
            .eval(
                "return [document.getElementById('sign-in').hidden, \
                 document.getElementById('dashboard').hidden, \
                 document.querySelectorAll('.segment').length];"
            )
            .await,
        json!([false, true, 0])
    );
    let overview = stranger
        .eval("return fetch('/api/overview').then(async r => [r.status, await r.text()]);")
        .await;
    assert_eq!(overview[0], json!(401), "{overview}");
    assert!(
        !overview[1].as_str().unwrap_or("").contains("spring"),
        "{overview}"
    );
    stranger.close().await;
    stop_bff.trigger();
}
