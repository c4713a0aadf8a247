-- The lowest MCP token generation the gateway still accepts per sidecar fleet. A fleet without
-- a row accepts every generation; an administrator raises the floor once the fleet's pods run
-- a newer token, and tokens below it are refused from then on.
create table mcp_token_floors
(
    organization_id  text        not null,
    namespace        text        not null,
    name             text        not null,
    lowest_generation bigint     not null check (lowest_generation >= 0),
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    primary key (organization_id, namespace, name)
);

select trigger_updated_at('mcp_token_floors');
