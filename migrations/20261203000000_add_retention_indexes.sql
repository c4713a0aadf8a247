-- Retention deletes rows older than a cutoff in small batches; these indexes find them without
-- scanning the tables.
create index session_events_received_at_idx on session_events (received_at);
create index task_results_updated_at_idx on task_results (updated_at);
create index slack_threads_updated_at_idx on slack_threads (updated_at);
