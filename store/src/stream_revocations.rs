//! Revocations of stream tokens: "no token issued at or before this second may read this
//! tenant's sessions (or this one session)". Stream tokens are verified without a lookup, so a
//! revocation is a mark per organization, or per organization and session, that every replica
//! checks when a stream opens and while it is open.
//!
//! A mark matters only while tokens issued before it can still be valid, an hour and the clock
//! skew after it; older marks are deleted whenever a new one is written.

use sqlx::PgPool;

use crate::error::Result;

/// The session key of a mark that covers every session of its organization.
const EVERY_SESSION: &str = "";

/// Marks every stream token of `organization_id` issued at or before `revoked_through` (Unix
/// seconds) as revoked, for one Nubabel session or, with `None`, for all of them; forgets marks
/// older than `forget_before`. Returns the mark now in force, which a later call never lowers.
pub async fn revoke(
    pool: &PgPool,
    organization_id: &str,
    session_id: Option<&str>,
    revoked_through: i64,
    forget_before: i64,
) -> Result<i64> {
    sqlx::query("delete from stream_token_revocations where revoked_through < $1")
        .bind(forget_before)
        .execute(pool)
        .await?;
    let mark: i64 = sqlx::query_scalar(
        "insert into stream_token_revocations (organization_id, session_id, revoked_through)
         values ($1, $2, $3)
         on conflict (organization_id, session_id) do update
             set revoked_through = greatest(stream_token_revocations.revoked_through,
                                            excluded.revoked_through)
         returning revoked_through",
    )
    .bind(organization_id)
    .bind(session_id.unwrap_or(EVERY_SESSION))
    .bind(revoked_through)
    .fetch_one(pool)
    .await?;
    Ok(mark)
}

/// The latest second through which tokens reading `session_id` of `organization_id` are
/// revoked (by a mark for that session or for all of the organization's), if any.
pub async fn revoked_through(
    pool: &PgPool,
    organization_id: &str,
    session_id: &str,
) -> Result<Option<i64>> {
    let mark: Option<i64> = sqlx::query_scalar(
        "select max(revoked_through) from stream_token_revocations
         where organization_id = $1 and session_id in ($2, $3)",
    )
    .bind(organization_id)
    .bind(session_id)
    .bind(EVERY_SESSION)
    .fetch_one(pool)
    .await?;
    Ok(mark)
}
