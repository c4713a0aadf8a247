//! The data layer's error type.

/// What can go wrong in the data layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Postgres query failed.
    #[error("postgres query failed")]
    Postgres(#[from] sqlx::Error),
    /// Running the embedded migrations failed.
    #[error("running migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A Redis command failed.
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    /// An id or name handed to the data layer is invalid.
    #[error(transparent)]
    Invalid(#[from] nubabel_contract::identity::InvalidIdentity),
    /// The session does not exist (for this tenant).
    #[error("session not found")]
    SessionNotFound,
    /// The OpenCode session is already mapped to another Nubabel session of the tenant.
    #[error("opencode session {0} already belongs to another session")]
    MappingConflict(String),
    /// A stored value could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl Error {
    /// True when Postgres could not be reached or is shutting down: the caller should answer
    /// 503 and let the client retry, as nothing was written.
    pub fn is_postgres_unavailable(&self) -> bool {
        let Self::Postgres(error) = self else {
            return false;
        };
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // Class 08: connection exceptions; 57P0x: shutdown in progress; 53300: too
                // many connections.
                code.starts_with("08") || code.starts_with("57P0") || code == "53300"
            }),
            _ => false,
        }
    }
}

impl Error {
    /// True when Postgres refused a text for a character it cannot store (NUL, in `text` or
    /// in a `jsonb` string): the input is at fault, so the caller answers 4xx. Texts from
    /// outside are made storable first ([`crate::storable`]); this catches any that was not.
    pub fn is_unstorable_text(&self) -> bool {
        // 22021: character_not_in_repertoire; 22P05: untranslatable_character.
        matches!(self, Self::Postgres(sqlx::Error::Database(db))
            if db.code().is_some_and(|code| code == "22021" || code == "22P05"))
    }
}

/// The data layer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
