-- Which associated data a connection's ciphertext is sealed with. 1: (organization_id, id).
-- 2: also where the secrets are sent (auth kind, upstream URL, API key header, token URL,
-- client id), so a row whose destination is changed behind the API's back no longer opens.
-- The default is 1, the format of every row written before this column; the API names the
-- version it writes and re-seals version 1 rows as version 2 at startup.
alter table mcp_connections
    add column aad_version smallint not null default 1 check (aad_version in (1, 2));
