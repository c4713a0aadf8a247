//! Redis: per-session event streams for fan-out and replay, and the hot session state.
//!
//! Each session has a stream `nubabel:session:{pk}:events` whose entry ids are `0-{seq}`, the
//! event's position in Postgres. Explicit ids make appends idempotent (re-adding an event, or
//! adding it after a newer one, is refused by Redis and changes nothing) and let a reader
//! resume from any SSE `Last-Event-ID` with `XREAD`/`XRANGE`. Each append trims the oldest
//! entries until the stream is within its byte budget and its entry count (the newest entry
//! always stays), and streams expire when idle; Postgres keeps everything, so readers fall back
//! to it for older ids. Redis is never the record: losing it loses no event.

use std::{collections::HashMap, time::Duration};

use nubabel_contract::identity::OrganizationId;
use redis::{
    AsyncConnectionConfig, Client, RedisError, Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    streams::{StreamId, StreamRangeReply, StreamReadReply},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    events::StoredEvent,
};

/// Stream entries keep the event JSON under this field.
const EVENT_FIELD: &str = "e";

/// Appends one event (under [`EVENT_FIELD`], `e`) and trims the oldest entries until the
/// stream holds at most `ARGV[3]` bytes of event JSON and `ARGV[4]` entries, keeping the newest.
/// The running byte count lives beside the stream (`KEYS[2]`): it restarts with a new stream,
/// is recounted from the entries if it was lost while the stream was not, and is exact again
/// whenever the stream is down to its newest entry.
/// `KEYS[1]` stream; `ARGV` = entry id, event JSON, max bytes, max entries, ttl seconds.
/// Returns Redis' error when the id is not past the stream's top (a superseded append).
const APPEND_WITHIN_BUDGET: &str = r"
local added = redis.pcall('XADD', KEYS[1], ARGV[1], 'e', ARGV[2])
if type(added) == 'table' and added.err then
  return added
end
local function size(entry)
  local total = 0
  for i = 2, #entry[2], 2 do
    total = total + string.len(entry[2][i])
  end
  return total
end
local newest = string.len(ARGV[2])
local length = redis.call('XLEN', KEYS[1])
local bytes = tonumber(redis.call('GET', KEYS[2]) or '-1')
if length == 1 then
  bytes = newest
elseif bytes < 0 then
  bytes = 0
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
    bytes = bytes + size(entry)
  end
else
  bytes = bytes + newest
end
local max_bytes = tonumber(ARGV[3])
local max_len = tonumber(ARGV[4])
while length > 1 and (bytes > max_bytes or length > max_len) do
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  redis.call('XDEL', KEYS[1], oldest[1])
  bytes = bytes - size(oldest)
  length = length - 1
end
if length == 1 then
  bytes = newest
end
redis.call('SET', KEYS[2], bytes, 'EX', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
";

/// Stores only a newer state than the one kept: `KEYS[1]` hash, `ARGV` = seq, state, metadata
/// JSON, updatedAt, ttl seconds. Concurrent replicas may write out of order; the sequence wins.
const SET_STATE_IF_NEWER: &str = r"
local current = redis.call('HGET', KEYS[1], 'seq')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'state', ARGV[2], 'metadata', ARGV[3], 'updatedAt', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
";

/// Bytes of event JSON a session's stream keeps by default: about a thousand typical events,
/// and sixteen of the largest a callback may carry.
pub const DEFAULT_STREAM_MAX_BYTES: u64 = 1024 * 1024;

/// Tuning of the Redis side.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Most entries kept per session stream.
    pub stream_max_len: usize,
    /// Most bytes of event JSON kept per session stream (the newest entry always stays).
    pub stream_max_bytes: u64,
    /// Idle streams and hot state expire after this long.
    pub ttl: Duration,
    /// Commands fail after this long, so a hung Redis cannot hold a request.
    pub response_timeout: Duration,
    /// Connection attempts fail after this long.
    pub connection_timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            stream_max_len: 1000,
            stream_max_bytes: DEFAULT_STREAM_MAX_BYTES,
            ttl: Duration::from_secs(24 * 60 * 60),
            response_timeout: Duration::from_secs(1),
            connection_timeout: Duration::from_secs(1),
        }
    }
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamAppend {
    /// The entry was added.
    Added,
    /// The stream already holds this or a newer entry; readers fill the gap from Postgres.
    Superseded,
}

/// The latest state of a session, as kept in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HotState {
    /// Sequence number of the state update.
    pub seq: i64,
    /// The state.
    pub state: String,
    /// Its metadata.
    pub metadata: serde_json::Value,
    /// When the API accepted it (RFC 3339).
    pub updated_at: String,
}

/// Shared Redis access: a self-reconnecting multiplexed connection.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    manager: ConnectionManager,
    settings: RedisSettings,
    append: Script,
    set_state: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The stream key of a session.
pub fn stream_key(session_pk: Uuid) -> String {
    format!("nubabel:session:{session_pk}:events")
}

/// The key of the byte count of a session's stream (the event JSON it holds).
pub fn stream_bytes_key(session_pk: Uuid) -> String {
    format!("nubabel:session:{session_pk}:events:bytes")
}

fn state_key(session_pk: Uuid) -> String {
    format!("nubabel:session:{session_pk}:state")
}

fn entry_id(seq: i64) -> String {
    format!("0-{seq}")
}

impl RedisStore {
    /// Connects lazily (the first command connects), so a process can start while Redis is
    /// down; the manager reconnects by itself after failures.
    pub fn new(url: &str, settings: RedisSettings) -> Result<Self> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.response_timeout))
            .set_connection_timeout(Some(settings.connection_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            client,
            manager,
            settings,
            append: Script::new(APPEND_WITHIN_BUDGET),
            set_state: Script::new(SET_STATE_IF_NEWER),
        })
    }

    /// One round trip, for readiness probes.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.manager.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Appends a committed event to its session's stream, trimmed to the stream's budget, with
    /// a fresh TTL.
    pub async fn append(&self, session_pk: Uuid, event: &StoredEvent) -> Result<StreamAppend> {
        let json = serde_json::to_string(event).map_err(|e| Error::Corrupt(e.to_string()))?;
        let mut conn = self.manager.clone();
        let appended: std::result::Result<i64, RedisError> = self
            .append
            .key(stream_key(session_pk))
            .key(stream_bytes_key(session_pk))
            .arg(entry_id(event.seq))
            .arg(json)
            .arg(self.settings.stream_max_bytes)
            .arg(self.settings.stream_max_len)
            .arg(self.settings.ttl.as_secs())
            .invoke_async(&mut conn)
            .await;
        match appended {
            Ok(_) => Ok(StreamAppend::Added),
            Err(error) if is_superseded(&error) => Ok(StreamAppend::Superseded),
            Err(error) => Err(error.into()),
        }
    }

    /// Claims `request_id` of `organization` for `ttl`: true the first time, false while an
    /// earlier claim holds. Signed requests that must run at most once (a tool call) claim
    /// their `webhook-id` for as long as their signature could be replayed.
    pub async fn claim_request_id(
        &self,
        organization: &OrganizationId,
        request_id: &str,
        ttl: Duration,
    ) -> Result<bool> {
        let mut conn = self.manager.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("nubabel:request:{organization}:{request_id}"))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    /// Keeps `state` as the session's hot state unless a newer one is stored.
    pub async fn set_state(&self, session_pk: Uuid, event: &StoredEvent) -> Result<()> {
        let metadata = event.body.get("metadata").cloned().unwrap_or_default();
        let mut conn = self.manager.clone();
        let _: i64 = self
            .set_state
            .key(state_key(session_pk))
            .arg(event.seq)
            .arg(&event.event_type)
            .arg(metadata.to_string())
            .arg(event.received_at.to_string())
            .arg(self.settings.ttl.as_secs())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The hot state of a session, if Redis has it.
    pub async fn state(&self, session_pk: Uuid) -> Result<Option<HotState>> {
        let mut conn = self.manager.clone();
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(state_key(session_pk))
            .query_async(&mut conn)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| {
            fields
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Corrupt(format!("hot state lacks {name}")))
        };
        Ok(Some(HotState {
            seq: field("seq")?
                .parse()
                .map_err(|_| Error::Corrupt("hot state seq".into()))?,
            state: field("state")?,
            metadata: serde_json::from_str(&field("metadata")?)
                .map_err(|e| Error::Corrupt(e.to_string()))?,
            updated_at: field("updatedAt")?,
        }))
    }

    /// Entries of a session's stream with `seq > after`, oldest first, at most `count`.
    pub async fn range_after(
        &self,
        session_pk: Uuid,
        after: i64,
        count: usize,
    ) -> Result<Vec<StoredEvent>> {
        let mut conn = self.manager.clone();
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream_key(session_pk))
            .arg(format!("({}", entry_id(after)))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        reply.ids.iter().map(decode_entry).collect()
    }

    /// Opens a dedicated connection for blocking reads (a blocked `XREAD` would stall every
    /// other command on a shared multiplexed connection).
    pub async fn reader(&self, block: Duration) -> Result<StreamReader> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connection_timeout))
            .set_response_timeout(Some(block + self.settings.response_timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(StreamReader { conn, block })
    }
}

fn is_superseded(error: &RedisError) -> bool {
    error
        .to_string()
        .contains("equal or smaller than the target stream top item")
}

fn decode_entry(entry: &StreamId) -> Result<StoredEvent> {
    let Some(Value::BulkString(bytes)) = entry.map.get(EVENT_FIELD) else {
        return Err(Error::Corrupt(format!(
            "stream entry {} lacks its event",
            entry.id
        )));
    };
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(e.to_string()))
}

/// A dedicated connection that waits for new entries on many session streams at once.
pub struct StreamReader {
    conn: MultiplexedConnection,
    block: Duration,
}

impl StreamReader {
    /// Waits up to the block time for entries after each `(session, seq)` position; returns
    /// what arrived (possibly nothing), oldest first per session.
    pub async fn read(
        &mut self,
        positions: &[(Uuid, i64)],
        count: usize,
    ) -> Result<Vec<(Uuid, StoredEvent)>> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let keys: HashMap<String, Uuid> = positions
            .iter()
            .map(|(pk, _)| (stream_key(*pk), *pk))
            .collect();
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(u64::try_from(self.block.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS");
        for (pk, _) in positions {
            cmd.arg(stream_key(*pk));
        }
        for (_, seq) in positions {
            cmd.arg(entry_id(*seq));
        }
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.conn).await?;
        let mut out = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(pk) = keys.get(&stream.key) else {
                continue;
            };
            for entry in &stream.ids {
                out.push((*pk, decode_entry(entry)?));
            }
        }
        Ok(out)
    }
}
