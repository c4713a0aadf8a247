-- Revoked stream tokens: a token of the organization issued at or before `revoked_through`
-- (Unix seconds) may no longer read the session (`session_id`), or any of the organization's
-- sessions when `session_id` is empty. Checked when a stream opens and while it is open.
create table stream_token_revocations
(
    organization_id text        not null,
    session_id      text        not null,
    revoked_through bigint      not null,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    primary key (organization_id, session_id)
);

select trigger_updated_at('stream_token_revocations');
