//! The HTTP client: one method per OpenCode route the operator and the bridge use.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, RequestBuilder, Response, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::events::{EventEnvelope, EventStream, SseDecoder};
use crate::types::{Health, MessageWithParts, PromptRequest, Session, SessionStatus};

/// The basic-auth user OpenCode expects unless `OPENCODE_SERVER_USERNAME` says otherwise.
pub const DEFAULT_USERNAME: &str = "opencode";

/// Longest OpenCode id accepted in a path.
const MAX_ID_LEN: usize = 128;
/// Longest error body quoted in an error.
const MAX_ERROR_BODY_CHARS: usize = 512;

/// Where the server is and how to talk to it.
#[derive(Clone)]
pub struct ClientConfig {
    /// `http://host:port` of `opencode serve`.
    pub base_url: String,
    /// Basic-auth user.
    pub username: String,
    /// The server password (`OPENCODE_SERVER_PASSWORD`); no auth header when absent.
    pub password: Option<SecretString>,
    /// Bound on a whole request (not the event stream).
    pub request_timeout: Duration,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Longest silence on the event stream before it counts as dead; OpenCode sends a
    /// heartbeat every 10 s, so this must be longer.
    pub event_read_timeout: Duration,
    /// Bound on opening the event stream (until its response headers): a ready server answers
    /// at once, while one still starting can hold a request it took; trying again is faster.
    pub event_open_timeout: Duration,
    /// The project directory to address (`x-opencode-directory`); the server's working
    /// directory when absent.
    pub directory: Option<String>,
}

impl ClientConfig {
    /// Defaults: user `opencode`, no password, 30 s requests, 5 s connect, 30 s event silence,
    /// 2 s to open the event stream.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            username: DEFAULT_USERNAME.to_owned(),
            password: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            event_read_timeout: Duration::from_secs(30),
            event_open_timeout: Duration::from_secs(2),
            directory: None,
        }
    }

    /// Sets the server password.
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(SecretString::from(password.into()));
        self
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("request_timeout", &self.request_timeout)
            .field("event_read_timeout", &self.event_read_timeout)
            .field("directory", &self.directory)
            .finish()
    }
}

/// A client of one OpenCode server. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct OpencodeClient {
    http: reqwest::Client,
    // The event stream has no overall deadline, only a read timeout.
    events_http: reqwest::Client,
    // Bound on the event stream's start: its response headers come at once from a ready server.
    events_open_timeout: Duration,
    base_url: Url,
    username: String,
    password: Option<SecretString>,
    directory: Option<String>,
}

impl fmt::Debug for OpencodeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpencodeClient")
            .field("base_url", &self.base_url.as_str())
            .finish_non_exhaustive()
    }
}

impl OpencodeClient {
    /// Builds a client; fails only on an unusable URL.
    pub fn new(config: ClientConfig) -> Result<Self> {
        let base_url = Url::parse(&config.base_url).map_err(|error| Error::InvalidUrl {
            url: config.base_url.clone(),
            reason: error.to_string(),
        })?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.cannot_be_a_base() {
            return Err(Error::InvalidUrl {
                url: config.base_url,
                reason: "must be an http(s) URL".to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .build()
            .map_err(Error::Build)?;
        let events_http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.event_read_timeout)
            .build()
            .map_err(Error::Build)?;
        Ok(Self {
            http,
            events_http,
            events_open_timeout: config.event_open_timeout,
            base_url,
            username: config.username,
            password: config.password,
            directory: config.directory,
        })
    }

    /// The same server, addressing project directory `directory` (`x-opencode-directory`):
    /// sessions created through it work there, and its session status lists that directory's.
    pub fn in_directory(&self, directory: impl Into<String>) -> Self {
        Self {
            directory: Some(directory.into()),
            ..self.clone()
        }
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        self.base_url.as_str()
    }

    /// `GET /global/health`.
    pub async fn health(&self) -> Result<Health> {
        self.call(Method::GET, "/global/health".to_owned(), &[], None::<&()>)
            .await
    }

    /// `POST /session`: a new session, titled when `title` is given (otherwise OpenCode asks
    /// the small model for a title after the first prompt).
    pub async fn create_session(&self, title: Option<&str>) -> Result<Session> {
        let body = match title {
            Some(title) => json!({ "title": title }),
            None => json!({}),
        };
        self.call(Method::POST, "/session".to_owned(), &[], Some(&body))
            .await
    }

    /// `GET /session/{id}`.
    pub async fn session(&self, session_id: &str) -> Result<Session> {
        let path = format!("/session/{}", checked_id(session_id)?);
        self.call(Method::GET, path, &[], None::<&()>).await
    }

    /// `GET /session/{id}/children`: the sessions created under it (subagents, oldest first).
    pub async fn children(&self, session_id: &str) -> Result<Vec<Session>> {
        let path = format!("/session/{}/children", checked_id(session_id)?);
        self.call(Method::GET, path, &[], None::<&()>).await
    }

    /// `POST /session/{id}/prompt_async`: queues the prompt and returns at once (204). A prompt
    /// sent while the session is busy runs after the current turn.
    pub async fn prompt_async(&self, session_id: &str, prompt: &PromptRequest) -> Result<()> {
        let path = format!("/session/{}/prompt_async", checked_id(session_id)?);
        let response = self
            .send(Method::POST, &path, &[], Some(prompt), &self.http)
            .await?;
        // 204 with an empty body; nothing to decode.
        drop(response);
        Ok(())
    }

    /// `GET /session/{id}/message`: the session's messages, oldest first; with `limit`, only
    /// the last `limit` of them.
    pub async fn messages(
        &self,
        session_id: &str,
        limit: Option<u32>,
    ) -> Result<Vec<MessageWithParts>> {
        let path = format!("/session/{}/message", checked_id(session_id)?);
        let limit = limit.map(|limit| limit.to_string());
        let query: Vec<(&str, &str)> = limit.iter().map(|l| ("limit", l.as_str())).collect();
        self.call(Method::GET, path, &query, None::<&()>).await
    }

    /// `GET /session/status`: the sessions that are busy or waiting to retry. Idle sessions
    /// are absent.
    pub async fn session_status(&self) -> Result<HashMap<String, SessionStatus>> {
        self.call(Method::GET, "/session/status".to_owned(), &[], None::<&()>)
            .await
    }

    /// `POST /session/{id}/abort`: stops the running turn (the session goes idle).
    pub async fn abort(&self, session_id: &str) -> Result<bool> {
        let path = format!("/session/{}/abort", checked_id(session_id)?);
        self.call(Method::POST, path, &[], None::<&()>).await
    }

    /// `GET /event`: the server's events from now on (no replay).
    ///
    /// Fails when the connection cannot be opened; afterwards, a broken connection or a
    /// silence longer than the read timeout yields one error and ends the stream.
    pub async fn events(&self) -> Result<EventStream> {
        self.event_stream("/event", EventEnvelope::parse).await
    }

    /// `GET /global/event`: the events of every project directory the server serves, from now
    /// on (no replay), unwrapped from their `{directory, payload}` envelope.
    ///
    /// Fails and ends like [`Self::events`].
    pub async fn global_events(&self) -> Result<EventStream> {
        self.event_stream("/global/event", EventEnvelope::parse_global)
            .await
    }

    async fn event_stream(
        &self,
        path: &str,
        parse: fn(&str) -> Option<EventEnvelope>,
    ) -> Result<EventStream> {
        let opening = self.send(Method::GET, path, &[], None::<&()>, &self.events_http);
        let response = tokio::time::timeout(self.events_open_timeout, opening)
            .await
            .map_err(|_| Error::NoAnswer {
                path: path.to_owned(),
                seconds: self.events_open_timeout.as_secs(),
            })??;
        let state = EventState {
            bytes: Box::pin(response.bytes_stream()),
            decoder: SseDecoder::default(),
            pending: VecDeque::new(),
            finished: false,
            parse,
        };
        Ok(Box::pin(futures::stream::unfold(state, next_event)))
    }

    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: String,
        query: &[(&str, &str)],
        body: Option<&B>,
    ) -> Result<T> {
        let method_name = method_name(&method);
        let response = self.send(method, &path, query, body, &self.http).await?;
        let bytes = response.bytes().await.map_err(|source| Error::Transport {
            method: method_name,
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Decode {
            method: method_name,
            path,
            source,
        })
    }

    /// Sends a request and turns error statuses into [`Error::Status`].
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&B>,
        http: &reqwest::Client,
    ) -> Result<Response> {
        let method_name = method_name(&method);
        let mut url = self.base_url.clone();
        url.set_path(&format!(
            "{}{path}",
            self.base_url.path().trim_end_matches('/')
        ));
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request: RequestBuilder = http
            .request(method, url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(password) = &self.password {
            request = request.basic_auth(&self.username, Some(password.expose_secret()));
        }
        if let Some(directory) = &self.directory {
            request = request.header("x-opencode-directory", directory);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|source| Error::Transport {
            method: method_name,
            path: path.to_owned(),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // The body explains the error: `{"name": "...", "data": {"message": "..."}}`.
        let text = response.text().await.unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        let name = parsed
            .as_ref()
            .and_then(|body| body.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let message = parsed
            .as_ref()
            .and_then(|body| body.pointer("/data/message"))
            .and_then(Value::as_str)
            .map_or_else(
                || text.chars().take(MAX_ERROR_BODY_CHARS).collect(),
                str::to_owned,
            );
        Err(Error::Status {
            method: method_name,
            path: path.to_owned(),
            status: status.as_u16(),
            name,
            message,
        })
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

struct EventState {
    bytes: ByteStream,
    decoder: SseDecoder,
    pending: VecDeque<String>,
    finished: bool,
    parse: fn(&str) -> Option<EventEnvelope>,
}

async fn next_event(mut state: EventState) -> Option<(Result<EventEnvelope>, EventState)> {
    loop {
        if let Some(data) = state.pending.pop_front() {
            match (state.parse)(&data) {
                Some(envelope) => return Some((Ok(envelope), state)),
                None => {
                    tracing::debug!(data, "skipping an SSE payload that is not a JSON object");
                    continue;
                }
            }
        }
        if state.finished {
            return None;
        }
        match state.bytes.next().await {
            Some(Ok(chunk)) => {
                let complete = state.decoder.push(&chunk);
                state.pending.extend(complete);
            }
            Some(Err(error)) => {
                state.finished = true;
                return Some((Err(Error::EventStream(error)), state));
            }
            None => state.finished = true,
        }
    }
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        _ => "HTTP",
    }
}

/// OpenCode ids are `<prefix>_<alphanumerics>`; anything else would change the URL's meaning.
fn checked_id(id: &str) -> Result<&str> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(id)
    } else {
        Err(Error::InvalidId(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_change_the_path_are_refused() {
        assert!(checked_id("ses_df57b452cffeqpHGaSh7yk18ys").is_ok());
        for bad in ["", "../global", "ses_1/abort", "ses 1", "ses_1?x=1"] {
            assert!(matches!(checked_id(bad), Err(Error::InvalidId(_))), "{bad}");
        }
    }

    #[test]
    fn only_http_urls_are_accepted_and_the_password_is_never_printed() {
        assert!(OpencodeClient::new(ClientConfig::new("http://127.0.0.1:4096")).is_ok());
        assert!(matches!(
            OpencodeClient::new(ClientConfig::new("unix:/tmp/x")),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            OpencodeClient::new(ClientConfig::new("not a url")),
            Err(Error::InvalidUrl { .. })
        ));
        let config = ClientConfig::new("http://x").with_password("hunter2");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn an_event_stream_a_starting_server_holds_fails_within_the_open_timeout() {
        // A server that takes the connection and never answers, as OpenCode can while it starts.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(socket);
        });
        let mut config = ClientConfig::new(url);
        config.event_open_timeout = Duration::from_millis(300);
        let client = OpencodeClient::new(config).unwrap();
        let started = std::time::Instant::now();
        let error = client
            .global_events()
            .await
            .err()
            .expect("no answer is an error");
        assert!(matches!(error, Error::NoAnswer { .. }), "{error:?}");
        assert!(error.is_transient());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        held.abort();
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_transient_transport_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let client =
            OpencodeClient::new(ClientConfig::new(format!("http://127.0.0.1:{port}"))).unwrap();
        let error = client.health().await.unwrap_err();
        assert!(matches!(error, Error::Transport { .. }), "{error:?}");
        assert!(error.is_transient());
        assert!(client.events().await.is_err());
    }
}
