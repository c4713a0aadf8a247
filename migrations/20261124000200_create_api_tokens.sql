-- Tenant API tokens for `POST /api/delegate`. Only the SHA-256 of a token is stored; the token
-- itself is shown once when it is issued. Each token is bound to one organization and to the
-- namespace where that tenant's DelegatedTasks are created.
create table api_tokens
(
    id              uuid primary key,
    token_sha256    bytea       not null unique check (length(token_sha256) = 32),
    organization_id text        not null check (length(organization_id) between 1 and 253),
    namespace       text        not null check (length(namespace) between 1 and 63),
    name            text        not null default '',
    revoked_at      timestamptz,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);

select trigger_updated_at('api_tokens');
