-- How many messages of a task's final answer are in the thread: a retry after a failed part
-- posts the rest, never the parts Slack already shows.
alter table slack_threads
    add column final_parts_posted integer not null default 0 check (final_parts_posted >= 0);
