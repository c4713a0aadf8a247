//! What finished tasks changed in their workspaces: the operator records each repository's
//! files and whole patch here, while the task's status keeps a bounded summary.

use nubabel_contract::workspace::{FileChange, RepositoryChanges};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use crate::{error::Result, storable};

/// One repository's change, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChange {
    /// Where the repository is in the workspace (`.` for the workspace itself).
    pub repository_path: String,
    /// The commit the turn started from.
    pub commit_before: String,
    /// The commit checked out when it ended.
    pub commit_after: String,
    /// Files changed, with lines added and removed.
    pub files: Vec<FileChange>,
    /// The whole patch.
    pub patch: String,
}

/// A `task_changes` row: path, commits before and after, files, patch.
type ChangeRow = (String, String, String, Json<Vec<FileChange>>, String);

/// Records (or, for a repeated write of the same task, replaces) what task `task_uid` changed;
/// its result must be recorded first. Patches are stored with any NUL replaced ([`storable`]).
pub async fn record(pool: &PgPool, task_uid: Uuid, changes: &[RepositoryChanges]) -> Result<()> {
    let mut tx = pool.begin().await?;
    for change in changes {
        sqlx::query(
            "insert into task_changes (task_uid, repository_path, commit_before, commit_after,
                                       files, patch)
             values ($1, $2, $3, $4, $5, $6)
             on conflict (task_uid, repository_path) do update
             set commit_before = excluded.commit_before, commit_after = excluded.commit_after,
                 files = excluded.files, patch = excluded.patch",
        )
        .bind(task_uid)
        .bind(change.now.path.to_string())
        .bind(&change.commit_before)
        .bind(&change.now.commit)
        .bind(Json(&change.files))
        .bind(storable::text(&change.patch))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// What task `task_uid` changed, by repository path.
pub async fn for_task(pool: &PgPool, task_uid: Uuid) -> Result<Vec<StoredChange>> {
    let rows: Vec<ChangeRow> = sqlx::query_as(
        "select repository_path, commit_before, commit_after, files, patch
         from task_changes where task_uid = $1 order by repository_path",
    )
    .bind(task_uid)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(repository_path, commit_before, commit_after, files, patch)| StoredChange {
                repository_path,
                commit_before,
                commit_after,
                files: files.0,
                patch,
            },
        )
        .collect())
}
