-- House style for every table: lowercase sql, `created_at` and `updated_at` on every row,
-- `updated_at` maintained by a trigger so no query has to remember it.

create or replace function set_updated_at()
    returns trigger as
$$
begin
    new.updated_at = now();
    return new;
end;
$$ language plpgsql;

-- Usage: `select trigger_updated_at('<table name>');` after creating a table with an
-- `updated_at timestamptz not null default now()` column.
create or replace function trigger_updated_at(tablename regclass)
    returns void as
$$
begin
    execute format('create trigger set_updated_at
        before update
        on %s
        for each row
        when (old is distinct from new)
    execute function set_updated_at();', tablename);
end;
$$ language plpgsql;
