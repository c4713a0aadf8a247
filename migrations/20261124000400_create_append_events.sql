-- Appends a batch of events in one call and one transaction: the API gathers the callbacks
-- that arrive while earlier commits are in flight and commits them together, so a burst costs
-- one round trip and one WAL flush instead of one per callback.
--
-- Each event is appended exactly as a single append does it: numbered after its session's
-- `last_seq`, read under the session's row lock; a retried delivery conflicts on
-- `(organization_id, event_id)` and then nothing changes, not even the sequence. Callers pass
-- events sorted by session, so two batches lock sessions in the same order and cannot
-- deadlock. One row comes back per event that was inserted, with its position `ord` in the
-- arrays; an event without a row was not inserted (its session is gone or its id is taken).
create function append_events(
    session_pks uuid[],
    organization_ids text[],
    event_ids text[],
    kinds text[],
    event_types text[],
    bodies jsonb[],
    fingerprints bytea[],
    progress_counts int8[],
    tools_started_counts int8[],
    tools_completed_counts int8[],
    last_tools text[],
    last_messages text[],
    states text[],
    metadatas jsonb[]
)
    returns table
            (
                ord              int4,
                last_seq         int8,
                task_namespace   text,
                task_name        text,
                progress_events  int8,
                tools_started    int8,
                tools_completed  int8,
                last_tool        text,
                last_message     text,
                last_event_at_us int8,
                received_at_us   int8
            )
as
$$
#variable_conflict use_column
declare
    previous int8;
    accepted timestamptz;
begin
    for i in 1 .. coalesce(array_length(session_pks, 1), 0)
        loop
            select s.last_seq into previous from sessions s where s.id = session_pks[i] for update;
            if not found then
                continue;
            end if;
            accepted := clock_timestamp();
            insert into session_events
            (session_pk, seq, organization_id, event_id, kind, event_type, body, fingerprint,
             received_at)
            values (session_pks[i], previous + 1, organization_ids[i], event_ids[i], kinds[i],
                    event_types[i], bodies[i], fingerprints[i], accepted)
            on conflict on constraint session_events_organization_event_key do nothing;
            if not found then
                continue;
            end if;
            return query
                update sessions s
                    set last_seq = previous + 1,
                        progress_events = s.progress_events + progress_counts[i],
                        tools_started = s.tools_started + tools_started_counts[i],
                        tools_completed = s.tools_completed + tools_completed_counts[i],
                        last_tool = coalesce(last_tools[i], s.last_tool),
                        last_message = coalesce(last_messages[i], s.last_message),
                        last_event_at = case
                                            when progress_counts[i] = 1 then accepted
                                            else s.last_event_at end,
                        state = coalesce(states[i], s.state),
                        state_metadata = coalesce(metadatas[i], s.state_metadata),
                        state_updated_at = case
                                               when states[i] is null then s.state_updated_at
                                               else accepted end
                    where s.id = session_pks[i]
                    returning i, s.last_seq, s.task_namespace, s.task_name, s.progress_events,
                        s.tools_started, s.tools_completed, s.last_tool, s.last_message,
                        (extract(epoch from s.last_event_at) * 1000000)::int8,
                        (extract(epoch from accepted) * 1000000)::int8;
        end loop;
end;
$$ language plpgsql;
