-- The Slack bot's shared state, so every callback API replica agrees.

-- Slack event ids already accepted: Slack retries an event it thinks was not acknowledged,
-- and any replica may receive the retry.
create table slack_events
(
    event_id   text primary key check (length(event_id) between 1 and 255),
    team_id    text        not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

select trigger_updated_at('slack_events');

-- One row per DelegatedTask that reports to a Slack thread: the acknowledgement message the
-- bot edits with progress, and the claim on the final answer (exactly one replica posts it).
create table slack_threads
(
    task_uid         uuid primary key,
    task_namespace   text        not null,
    task_name        text        not null,
    channel          text        not null,
    thread_ts        text,
    ack_ts           text,
    progress_text    text,
    progress_at      timestamptz,
    final_claimed_at timestamptz,
    final_posted_at  timestamptz,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);

select trigger_updated_at('slack_threads');
