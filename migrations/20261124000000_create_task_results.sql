-- The whole final answer (or error) of each finished DelegatedTask. The task's status keeps a
-- few KiB; this row keeps everything, keyed by the task's uid so a re-created task of the same
-- name never overwrites an earlier one.
create table task_results
(
    task_uid        uuid primary key,
    organization_id text        not null check (length(organization_id) between 1 and 253),
    task_namespace  text        not null,
    task_name       text        not null,
    session_id      text,
    phase           text        not null,
    output          text,
    error_reason    text,
    error_message   text,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);

select trigger_updated_at('task_results');

create index task_results_task_idx on task_results (task_namespace, task_name);
