//! Which generations of a sidecar fleet's MCP token the gateway still accepts: every
//! generation at or above the fleet's floor (all of them for a fleet without one). Rotating a
//! token is raising the fleet's `spec.mcpTokenGeneration`, waiting for its pods to run the new
//! token, then raising the floor here, so no pod is ever without a valid token.

use nubabel_contract::identity::SidecarIdentity;
use sqlx::PgPool;

use crate::error::Result;

/// Raises the floor of `fleet` to `lowest_generation` (never lowers it); returns the floor now
/// in force.
pub async fn retire_below(
    pool: &PgPool,
    fleet: &SidecarIdentity,
    lowest_generation: u32,
) -> Result<u32> {
    let floor: i64 = sqlx::query_scalar(
        "insert into mcp_token_floors (organization_id, namespace, name, lowest_generation)
         values ($1, $2, $3, $4)
         on conflict (organization_id, namespace, name) do update
             set lowest_generation = greatest(mcp_token_floors.lowest_generation,
                                              excluded.lowest_generation)
         returning lowest_generation",
    )
    .bind(fleet.organization_id().as_str())
    .bind(fleet.namespace())
    .bind(fleet.name())
    .bind(i64::from(lowest_generation))
    .fetch_one(pool)
    .await?;
    Ok(u32::try_from(floor).unwrap_or(u32::MAX))
}

/// The lowest generation of `fleet`'s MCP token the gateway accepts (0 without a floor).
pub async fn lowest_accepted(pool: &PgPool, fleet: &SidecarIdentity) -> Result<u32> {
    let floor: Option<i64> = sqlx::query_scalar(
        "select lowest_generation from mcp_token_floors
         where organization_id = $1 and namespace = $2 and name = $3",
    )
    .bind(fleet.organization_id().as_str())
    .bind(fleet.namespace())
    .bind(fleet.name())
    .fetch_optional(pool)
    .await?;
    Ok(floor.map_or(0, |floor| u32::try_from(floor).unwrap_or(u32::MAX)))
}
