-- The Slack channels each tenant's workspace has been seen in: a verified event from a mapped
-- team, naming the channel, is the proof that the channel belongs to that team. The notifier
-- posts a task's messages only to a channel seen for the task's organization and one of the
-- teams mapped to the task's namespace.
create table slack_channels
(
    organization_id text        not null,
    team_id         text        not null,
    channel         text        not null check (length(channel) between 1 and 255),
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    primary key (organization_id, team_id, channel)
);

select trigger_updated_at('slack_channels');

-- A task whose channel its tenant was never seen in keeps its row, marked refused, so exactly
-- one replica reports the refusal and none posts anything for it.
alter table slack_threads
    add column refused_at timestamptz;
