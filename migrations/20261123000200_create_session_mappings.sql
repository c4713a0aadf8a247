-- Which OpenCode session (on which pod of which sidecar fleet) serves a Nubabel session.
-- Append-only history: the newest row is the current mapping, older rows keep resolving
-- late callbacks that name an earlier OpenCode session.
create table session_mappings
(
    id                  bigint generated always as identity primary key,
    session_pk          uuid        not null references sessions (id) on delete cascade,
    organization_id     text        not null,
    opencode_session_id text        not null check (length(opencode_session_id) between 1 and 253),
    sidecar_namespace   text        not null,
    sidecar_name        text        not null,
    pod_name            text        not null,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    constraint session_mappings_organization_opencode_session_key
        unique (organization_id, opencode_session_id)
);

select trigger_updated_at('session_mappings');

create index session_mappings_session_idx on session_mappings (session_pk, id desc);
