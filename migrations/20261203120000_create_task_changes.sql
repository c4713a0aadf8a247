-- What a task's turn changed in each repository of its conversation's workspace: the commits
-- before and after, the files with lines added and removed, and the whole patch. The task's
-- status keeps a bounded summary; this row keeps everything. Rows go with their task result
-- (retention deletes those).
create table task_changes
(
    task_uid        uuid        not null references task_results (task_uid) on delete cascade,
    repository_path text        not null,
    commit_before   text        not null,
    commit_after    text        not null,
    files           jsonb       not null,
    patch           text        not null,
    created_at      timestamptz not null default now(),
    primary key (task_uid, repository_path)
);
