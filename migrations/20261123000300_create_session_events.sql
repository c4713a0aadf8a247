-- Every accepted callback (progress events and state updates), in per-session order.
-- The sender's `webhook-id` is unique per tenant: a retried delivery finds its row and
-- changes nothing.
create table session_events
(
    session_pk      uuid        not null references sessions (id) on delete cascade,
    seq             bigint      not null check (seq > 0),
    organization_id text        not null,
    event_id        text        not null check (length(event_id) between 1 and 128),
    kind            text        not null check (kind in ('progress', 'state')),
    -- progress.type for progress events, the state for state updates.
    event_type      text        not null,
    body            jsonb       not null,
    -- SHA-256 over the kind, the session and the raw body: a reused id with another
    -- payload is told apart from a retry.
    fingerprint     bytea       not null,
    received_at     timestamptz not null default now(),
    primary key (session_pk, seq),
    constraint session_events_organization_event_key unique (organization_id, event_id)
);
