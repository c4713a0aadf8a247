-- A Nubabel session (one conversation of one tenant) and what the callback API knows of it.
-- Rows are created when the operator records a session mapping, never by a callback, so a
-- callback for a session nobody registered is a 404.
create table sessions
(
    id               uuid primary key     default gen_random_uuid(),
    organization_id  text        not null check (length(organization_id) between 1 and 253),
    -- The Nubabel session id (DelegatedTask.spec.sessionId, or one the operator made up).
    session_id       text        not null check (length(session_id) between 1 and 253),
    -- The DelegatedTask the session currently works for; the status mirror writes there.
    task_namespace   text,
    task_name        text,
    -- Latest state reported by the sidecar (busy, idle, completed, failed, ...).
    state            text,
    state_metadata   jsonb       not null default '{}'::jsonb,
    state_updated_at timestamptz,
    -- Sequence number of the session's newest event; bumped under the row lock, so events
    -- of one session are numbered 1, 2, 3, ... in commit order with no gaps.
    last_seq         bigint      not null default 0,
    -- Progress summary of the current task, reset when the task changes (status.progress).
    progress_events  bigint      not null default 0,
    tools_started    bigint      not null default 0,
    tools_completed  bigint      not null default 0,
    last_tool        text,
    last_message     text,
    last_event_at    timestamptz,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    constraint sessions_organization_session_key unique (organization_id, session_id),
    constraint sessions_task_complete check ((task_namespace is null) = (task_name is null))
);

select trigger_updated_at('sessions');

create index sessions_task_idx on sessions (task_namespace, task_name) where task_name is not null;
