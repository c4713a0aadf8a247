-- A tenant's MCP connections: the upstream MCP server a provider's tools come from, and the
-- credentials the gateway calls it with. Secrets are never stored in clear: `ciphertext` is
-- AES-256-GCM over a JSON document of the secrets, with `nonce` fresh per encryption, the
-- associated data binding it to (organization_id, id), and `key_id` naming the master key.
create table mcp_connections
(
    id                uuid primary key,
    organization_id   text        not null check (length(organization_id) between 1 and 253),
    -- Tool names are `<provider>_<tool>`, so a provider is short and has no underscore.
    provider          text        not null check (provider ~ '^[a-z0-9-]{1,32}$'),
    upstream_url      text        not null,
    -- bearer: `Authorization: Bearer <token>`; api_key: `<auth_header>: <key>`;
    -- oauth2: `Authorization: Bearer <access token>`, refreshed at oauth_token_url.
    auth_kind         text        not null check (auth_kind in ('bearer', 'api_key', 'oauth2')),
    auth_header       text,
    oauth_token_url   text,
    oauth_client_id   text,
    state             text        not null default 'active'
        check (state in ('active', 'needs_reauthorization')),
    key_id            text        not null,
    nonce             bytea       not null check (length(nonce) = 12),
    ciphertext        bytea       not null,
    -- Expiry of the OAuth access token, when known.
    token_expires_at  timestamptz,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    constraint mcp_connections_organization_provider_key unique (organization_id, provider),
    constraint mcp_connections_api_key_header check ((auth_kind = 'api_key') = (auth_header is not null)),
    constraint mcp_connections_oauth_fields check (
        (auth_kind = 'oauth2') = (oauth_token_url is not null and oauth_client_id is not null))
);

select trigger_updated_at('mcp_connections');

-- Re-encryption after a key rotation looks for rows under other key ids.
create index mcp_connections_key_id_idx on mcp_connections (key_id);
