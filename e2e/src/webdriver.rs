//! A real headless Chromium for browser tests, driven over W3C WebDriver by a small client:
//! `chromedriver` (Debian's `chromium-driver`, installed by scripts/install-deps.sh) runs as a
//! child process on a free port, and each [`Browser`] is one WebDriver session.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::process::{ProcessSpec, SupervisedProcess};

/// The WebDriver spec's key for element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Where Debian puts the driver and the browser.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// How often [`Browser::wait_for`] looks again.
const POLL: Duration = Duration::from_millis(200);

/// A headless Chromium session.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    // Stops chromedriver and the browser under it (one process group) when dropped.
    _driver: SupervisedProcess,
    _logs: tempfile::TempDir,
}

/// The path of `name` from `NUBABEL_<ENV>` or Debian's place, or an error saying how to get it.
fn tool(default: &str, env: &str) -> Result<PathBuf> {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    if !path.exists() {
        bail!(
            "{} not found: run scripts/install-deps.sh (Debian packages chromium, chromium-driver) or set {env}",
            path.display()
        );
    }
    Ok(path)
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width` × `height` window.
    pub async fn start(width: u32, height: u32) -> Result<Self> {
        let driver = tool(CHROMEDRIVER, "NUBABEL_CHROMEDRIVER")?;
        let chromium = tool(CHROMIUM, "NUBABEL_CHROMIUM")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let logs = tempfile::tempdir()?;
        let child = SupervisedProcess::spawn(
            ProcessSpec::new("chromedriver", driver).arg(format!("--port={port}")),
            logs.path().join("chromedriver.log"),
        )
        .await?;
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let mut ready = false;
        for _ in 0..100 {
            let status = http.get(format!("{base}/status")).send().await;
            if let Ok(status) = status
                && let Ok(body) = status.json::<Value>().await
                && body["value"]["ready"] == true
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ready {
            bail!("chromedriver on port {port} did not become ready");
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--window-size={width},{height}")],
            },
        }}});
        let answer: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await?
            .json()
            .await?;
        let session = answer["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {answer}"))?
            .to_owned();
        Ok(Self {
            http,
            session: format!("{base}/session/{session}"),
            _driver: child,
            _logs: logs,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await?.json().await?;
        if let Some(error) = answer["value"]["error"].as_str() {
            bail!(
                "WebDriver {path}: {error}: {}",
                answer["value"]["message"].as_str().unwrap_or_default()
            );
        }
        Ok(answer["value"].clone())
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await
            .map(drop)
    }

    /// The current page's URL.
    pub async fn url(&self) -> Result<String> {
        let url = self.call(reqwest::Method::GET, "/url", None).await?;
        Ok(url.as_str().unwrap_or_default().to_owned())
    }

    /// The current page's title.
    pub async fn title(&self) -> Result<String> {
        let title = self.call(reqwest::Method::GET, "/title", None).await?;
        Ok(title.as_str().unwrap_or_default().to_owned())
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Result<Option<String>> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .and_then(|all| all.first())
            .and_then(|e| e[ELEMENT_KEY].as_str())
            .map(str::to_owned))
    }

    async fn must_find(&self, css: &str) -> Result<String> {
        self.find(css)
            .await?
            .with_context(|| format!("no element matches {css}"))
    }

    /// Types `text` into the element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let element = self.must_find(css).await?;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
        )
        .await
        .map(drop)
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) -> Result<()> {
        let element = self.must_find(css).await?;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await
        .map(drop)
    }

    /// The visible text of the element matching `css` (empty when none does: the page may be
    /// refreshing it).
    pub async fn text(&self, css: &str) -> Result<String> {
        let Some(element) = self.find(css).await? else {
            return Ok(String::new());
        };
        match self
            .call(
                reqwest::Method::GET,
                &format!("/element/{element}/text"),
                None,
            )
            .await
        {
            Ok(text) => Ok(text.as_str().unwrap_or_default().to_owned()),
            // Replaced by a refresh between finding and reading it.
            Err(error) if error.to_string().contains("stale element") => Ok(String::new()),
            Err(error) => Err(error),
        }
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    pub async fn execute(&self, script: &str) -> Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until `condition` of the page's text at `css` holds, at most `limit`; returns
    /// that text.
    pub async fn wait_for(
        &self,
        css: &str,
        what: &str,
        limit: Duration,
        condition: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let text = self.text(css).await?;
            if condition(&text) {
                return Ok(text);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out after {limit:?} waiting for {css} to show {what}; it shows {text:?}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .context("decoding the screenshot")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// Ends the session (chromedriver stops when the browser is dropped).
    pub async fn quit(self) -> Result<()> {
        self.call(reqwest::Method::DELETE, "", None).await.map(drop)
    }
}
