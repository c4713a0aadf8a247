//! The web view's HTML, rendered on the server from the read API's views. Every value from a
//! task, a token or a query is escaped ([`escape`]); answers go through [`markdown::render`].
//! Pure functions: no I/O, so the markup is tested without a server.

use nubabel_crds::v1alpha1::TaskPhase;
use nubabel_store::events::StoredEvent;

use super::markdown::{self, escape};
use crate::task_views::{Page, TaskDetail, TaskFilter, TaskSummary};

/// Where the web view is served.
pub const BASE: &str = "/ui";
/// Most recent events the task page lists.
pub const ACTIVITY_EVENTS: usize = 50;

/// A whole page around `main`.
fn layout(title: &str, signed_in_as: Option<&str>, main: &str) -> String {
    let header_right = signed_in_as.map_or(String::new(), |org| {
        format!(
            "<span class=\"who\">Tenant <strong>{}</strong></span>\
             <form method=\"post\" action=\"{BASE}/sign-out\"><button type=\"submit\">Sign out</button></form>",
            escape(org)
        )
    });
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · Nubabel</title>\n\
         <link rel=\"stylesheet\" href=\"{BASE}/assets/app.css\">\n\
         <script src=\"{BASE}/assets/app.js\" defer></script>\n</head>\n<body>\n\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\n\
         <header><a class=\"home\" href=\"{BASE}/tasks\">Nubabel tasks</a>{header_right}</header>\n\
         <main id=\"main\" tabindex=\"-1\">\n{main}\n</main>\n</body>\n</html>\n",
        title = escape(title)
    )
}

/// The sign-in page, with what went wrong with the last attempt.
pub fn sign_in(problem: Option<&str>) -> String {
    let problem = problem.map_or(String::new(), |p| {
        format!(
            "<p class=\"problem\" role=\"alert\" id=\"sign-in-problem\">{}</p>",
            escape(p)
        )
    });
    layout(
        "Sign in",
        None,
        &format!(
            "<h1>Sign in</h1>\n{problem}\
             <form method=\"post\" action=\"{BASE}/sign-in\" class=\"sign-in\">\
             <label for=\"token\">Tenant API token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
             required spellcheck=\"false\" aria-describedby=\"token-help\">\
             <p id=\"token-help\" class=\"help\">A token from <code>nubabel-callback-api token create</code> \
             (it starts with <code>nbt_</code>).</p>\
             <button type=\"submit\">Sign in</button></form>"
        ),
    )
}

fn phase_badge(phase: &str) -> String {
    format!(
        "<span class=\"phase phase-{}\">{}</span>",
        escape(&phase.to_ascii_lowercase()),
        escape(phase)
    )
}

fn task_link(name: &str) -> String {
    format!(
        "<a href=\"{BASE}/tasks/{}\">{}</a>",
        escape(&encode_segment(name)),
        escape(name)
    )
}

/// The rows of the task list (also served alone, for the live refresh).
pub fn task_rows(tasks: &[TaskSummary]) -> String {
    if tasks.is_empty() {
        return "<tr><td colspan=\"5\">No tasks yet.</td></tr>".to_owned();
    }
    tasks
        .iter()
        .map(|t| {
            format!(
                "<tr data-task=\"{name}\"><td data-label=\"Task\">{link}</td>\
                 <td data-label=\"Phase\">{phase}</td><td data-label=\"Prompt\">{prompt}</td>\
                 <td data-label=\"User\">{user}</td><td data-label=\"Created\">{created}</td></tr>",
                name = escape(&t.name),
                link = task_link(&t.name),
                phase = phase_badge(&t.phase),
                prompt = escape(&t.prompt_excerpt),
                user = escape(t.user_id.as_deref().unwrap_or("")),
                created = escape(t.created_at.as_deref().unwrap_or("")),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The query string of `filter` (with a leading `?`, or empty).
pub fn filter_query(filter: &TaskFilter) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if let Some(phase) = filter.phase {
        query.append_pair("phase", phase.as_str());
    }
    if let Some(session) = &filter.session_id {
        query.append_pair("session", session);
    }
    if let Some(user) = &filter.user_id {
        query.append_pair("user", user);
    }
    let query = query.finish();
    if query.is_empty() {
        query
    } else {
        format!("?{query}")
    }
}

/// The task list page.
pub fn task_list(organization: &str, filter: &TaskFilter, page: &Page, paged: bool) -> String {
    let options: String = std::iter::once(("", "Any phase"))
        .chain(TaskPhase::ALL.iter().map(|p| (p.as_str(), p.as_str())))
        .map(|(value, label)| {
            let selected = filter.phase.map(TaskPhase::as_str) == Some(value)
                || (value.is_empty() && filter.phase.is_none());
            format!(
                "<option value=\"{value}\"{}>{label}</option>",
                if selected { " selected" } else { "" }
            )
        })
        .collect();
    let query = filter_query(filter);
    // A later page is a snapshot; the first page refreshes itself.
    let live = if paged {
        String::new()
    } else {
        format!(
            " data-live=\"{}\" data-interval=\"2000\"",
            escape(&format!("{BASE}/tasks/rows{query}"))
        )
    };
    let next = page.next.as_ref().map_or(String::new(), |cursor| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("cursor", &cursor.to_string());
        let separator = if query.is_empty() { "?" } else { "&" };
        format!(
            "<p><a href=\"{}\">Older tasks</a></p>",
            escape(&format!("{BASE}/tasks{query}{separator}{}", q.finish()))
        )
    });
    let text = |value: &Option<String>| escape(value.as_deref().unwrap_or(""));
    layout(
        "Tasks",
        Some(organization),
        &format!(
            "<h1>Tasks</h1>\n\
             <form method=\"get\" action=\"{BASE}/tasks\" class=\"filters\" aria-label=\"Filter tasks\">\
             <div><label for=\"phase\">Phase</label><select id=\"phase\" name=\"phase\">{options}</select></div>\
             <div><label for=\"session\">Session</label><input id=\"session\" name=\"session\" value=\"{session}\"></div>\
             <div><label for=\"user\">User</label><input id=\"user\" name=\"user\" value=\"{user}\"></div>\
             <button type=\"submit\">Filter</button></form>\n\
             <table class=\"tasks\"><caption>The tenant's tasks, newest first{refresh}</caption>\
             <thead><tr><th scope=\"col\">Task</th><th scope=\"col\">Phase</th><th scope=\"col\">Prompt</th>\
             <th scope=\"col\">User</th><th scope=\"col\">Created</th></tr></thead>\
             <tbody id=\"task-rows\"{live}>\n{rows}\n</tbody></table>\n{next}",
            session = text(&filter.session_id),
            user = text(&filter.user_id),
            refresh = if paged { "" } else { " (updates live)" },
            rows = task_rows(&page.tasks),
        ),
    )
}

/// One line of the activity list for `event`, if it says something.
fn activity(event: &StoredEvent) -> Option<String> {
    let body = &event.body;
    let field = |name: &str| body.get(name).and_then(|v| v.as_str());
    let tool = field("tool").or_else(|| field("name"));
    let (class, text) = match event.event_type.as_str() {
        nubabel_contract::progress::TOOL_EXECUTE_START => (
            "tool-start",
            format!("Tool {} started", tool.unwrap_or("?")),
        ),
        nubabel_contract::progress::TOOL_EXECUTE_END => {
            ("tool-end", format!("Tool {} finished", tool.unwrap_or("?")))
        }
        nubabel_contract::progress::MCP_TOOL_CALL => (
            "tool-end",
            format!("Gateway tool {} called", tool.unwrap_or("?")),
        ),
        // Text parts are many and their last line is in the summary.
        nubabel_contract::progress::MESSAGE_PART => return None,
        other if other.contains("subagent") || field("agent").is_some() => (
            "subagent",
            format!(
                "Subagent {}: {other}",
                field("agent").or(field("subagent")).unwrap_or("?")
            ),
        ),
        other => ("other", other.to_owned()),
    };
    Some(format!(
        "<li class=\"{class}\" data-seq=\"{}\">{}</li>",
        event.seq,
        escape(&text)
    ))
}

/// The part of the task page that changes while the task runs (also served alone).
pub fn task_live(task: &TaskDetail, events: &[StoredEvent], notice: Option<&str>) -> String {
    let finished = is_finished(&task.summary.phase);
    let progress = &task.progress;
    let mut html = format!(
        "<div id=\"task-live-state\" data-finished=\"{finished}\" data-phase=\"{phase_name}\">\
         <p>Phase: <span id=\"task-phase\">{phase}</span>{cancelling}</p>",
        phase_name = escape(&task.summary.phase),
        phase = phase_badge(&task.summary.phase),
        cancelling = if task.summary.cancel_requested && !finished {
            " (cancelling)"
        } else {
            ""
        },
    );
    if let Some(notice) = notice {
        html.push_str(&format!(
            "<p class=\"problem\" role=\"alert\" id=\"notice\">{}</p>",
            escape(notice)
        ));
    }
    if !finished && task.live {
        html.push_str(&format!(
            "<form method=\"post\" action=\"{BASE}/tasks/{}/cancel\">\
             <button type=\"submit\" class=\"danger\" id=\"cancel\">Cancel task</button></form>",
            escape(&encode_segment(&task.summary.name))
        ));
    }
    let text = |value: &Option<String>| escape(value.as_deref().unwrap_or("–"));
    html.push_str(&format!(
        "<dl class=\"facts\"><dt>Sidecar</dt><dd>{}</dd><dt>Dispatched</dt><dd>{}</dd>\
         <dt>Finished</dt><dd id=\"finished-at\">{}</dd></dl>",
        text(&task.sidecar),
        text(&task.dispatched_at),
        text(&task.summary.completed_at),
    ));
    html.push_str(&format!(
        "<h2>Progress</h2><dl class=\"progress\">\
         <dt>Tool calls started</dt><dd id=\"tools-started\">{}</dd>\
         <dt>Tool calls finished</dt><dd id=\"tools-completed\">{}</dd>\
         <dt>Last tool</dt><dd id=\"last-tool\">{}</dd>\
         <dt>Last message</dt><dd id=\"last-message\">{}</dd></dl>",
        progress.tools_started,
        progress.tools_completed,
        escape(progress.last_tool.as_deref().unwrap_or("–")),
        escape(progress.last_message.as_deref().unwrap_or("–")),
    ));
    if !task.subagents.is_empty() {
        html.push_str("<h2>Subagents</h2><ul id=\"subagents\">");
        for subagent in &task.subagents {
            html.push_str(&format!(
                "<li><strong>{}</strong> {}: {} ({} of {} tool calls finished)</li>",
                escape(subagent.agent.as_deref().unwrap_or("subagent")),
                escape(subagent.title.as_deref().unwrap_or(&subagent.session_id)),
                escape(&subagent.state),
                subagent.tools_completed,
                subagent.tools_started,
            ));
        }
        html.push_str("</ul>");
    }
    let lines: Vec<String> = events.iter().filter_map(activity).collect();
    html.push_str("<h2>Activity</h2>");
    if lines.is_empty() {
        html.push_str("<p id=\"activity-empty\">Nothing yet.</p>");
    } else {
        let skip = lines.len().saturating_sub(ACTIVITY_EVENTS);
        html.push_str(&format!(
            "<ol id=\"activity\">{}</ol>",
            lines[skip..].join("")
        ));
    }
    if let Some(error) = &task.error {
        html.push_str(&format!(
            "<h2>Error</h2><p id=\"task-error\"><strong>{}</strong>: {}</p>",
            escape(&error.reason),
            escape(&error.message)
        ));
    }
    if let Some(answer) = &task.answer {
        html.push_str(&format!(
            "<h2>Answer</h2><article id=\"answer\" class=\"answer\">{}</article>",
            markdown::render(answer)
        ));
    }
    if !task.changes.is_empty() {
        html.push_str("<h2>Changes</h2><ul id=\"changes\">");
        for change in &task.changes {
            html.push_str(&format!(
                "<li><code>{}</code>: {} files, +{} −{}{}</li>",
                escape(&change.path),
                change.files_changed,
                change.lines_added,
                change.lines_removed,
                if change.files.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", escape(&change.files.join(", ")))
                }
            ));
        }
        html.push_str("</ul>");
    }
    html.push_str("</div>");
    html
}

/// The task page.
pub fn task_page(
    organization: &str,
    task: &TaskDetail,
    events: &[StoredEvent],
    notice: Option<&str>,
) -> String {
    let s = &task.summary;
    let text = |value: &Option<String>| escape(value.as_deref().unwrap_or("–"));
    let live = if is_finished(&s.phase) {
        String::new()
    } else {
        format!(
            " data-live=\"{}\" data-interval=\"1000\"",
            escape(&format!("{BASE}/tasks/{}/live", encode_segment(&s.name)))
        )
    };
    let prompt = task.prompt.as_deref().map_or(String::new(), |p| {
        format!("<h2>Prompt</h2><pre class=\"prompt\">{}</pre>", escape(p))
    });
    layout(
        &format!("Task {}", s.name),
        Some(organization),
        &format!(
            "<p><a href=\"{BASE}/tasks\">← All tasks</a></p>\
             <h1>Task <span class=\"name\">{name}</span></h1>\
             <dl class=\"facts\"><dt>Session</dt><dd>{session}</dd><dt>User</dt><dd>{user}</dd>\
             <dt>Created</dt><dd>{created}</dd></dl>\
             {prompt}\
             <section id=\"task-live\" aria-live=\"polite\" aria-label=\"Task progress\"{live}>{body}</section>",
            name = escape(&s.name),
            session = text(&s.session_id),
            user = text(&s.user_id),
            created = text(&s.created_at),
            body = task_live(task, events, notice),
        ),
    )
}

/// A page that says what is wrong (unknown task and the like).
pub fn problem(organization: &str, title: &str, message: &str) -> String {
    layout(
        title,
        Some(organization),
        &format!(
            "<h1>{}</h1><p class=\"problem\" role=\"alert\">{}</p><p><a href=\"{BASE}/tasks\">All tasks</a></p>",
            escape(title),
            escape(message)
        ),
    )
}

fn is_finished(phase: &str) -> bool {
    TaskPhase::ALL
        .iter()
        .any(|p| p.as_str() == phase && p.is_finished())
}

/// Percent-encodes a path segment.
fn encode_segment(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task_views::ProgressView;

    fn detail(phase: &str, answer: Option<&str>) -> TaskDetail {
        TaskDetail {
            summary: TaskSummary {
                name: "t-1".into(),
                uid: "u".into(),
                phase: phase.into(),
                session_id: Some("<s>".into()),
                user_id: None,
                prompt_excerpt: "<b>hi</b>".into(),
                created_at: None,
                completed_at: None,
                cancel_requested: false,
            },
            prompt: Some("<b>hi</b>".into()),
            dispatched_at: None,
            sidecar: None,
            progress: ProgressView::default(),
            answer: answer.map(str::to_owned),
            error: None,
            changes: Vec::new(),
            subagents: Vec::new(),
            live: true,
        }
    }

    #[test]
    fn a_tasks_subagents_are_listed_with_their_agent_state_and_tools_escaped() {
        let mut task = detail("Running", None);
        assert!(!task_live(&task, &[], None).contains("id=\"subagents\""));
        task.subagents.push(crate::task_views::SubagentView {
            session_id: "ses_c".into(),
            parent_session_id: "ses_p".into(),
            agent: Some("Sisyphus-Junior".into()),
            title: Some("<i>child</i> work".into()),
            state: "Running".into(),
            tools_started: 2,
            tools_completed: 1,
        });
        let html = task_live(&task, &[], None);
        assert!(html.contains("<strong>Sisyphus-Junior</strong>"), "{html}");
        assert!(
            html.contains("Running (1 of 2 tool calls finished)"),
            "{html}"
        );
        assert!(!html.contains("<i>child"), "{html}");
    }

    #[test]
    fn a_running_task_page_refreshes_itself_and_offers_cancel_and_a_finished_one_does_neither() {
        let running = task_page("acme", &detail("Running", None), &[], None);
        assert!(running.contains("data-live=\"/ui/tasks/t-1/live\""));
        assert!(running.contains("id=\"cancel\""));
        let done = task_page("acme", &detail("Succeeded", Some("**ok**")), &[], None);
        assert!(!done.contains("data-live"));
        assert!(!done.contains("id=\"cancel\""));
        assert!(done.contains("<strong>ok</strong>"));
    }

    #[test]
    fn task_values_are_escaped_everywhere() {
        let page = task_page(
            "<org>",
            &detail("Succeeded", Some("<script>alert(1)</script>")),
            &[],
            None,
        );
        assert!(!page.contains("<script>alert"));
        assert!(!page.contains("<b>hi"));
        assert!(!page.contains("<s>"));
        assert!(!page.contains("<org>"));
        assert!(!task_rows(&[detail("Running", None).summary]).contains("<b>"));
    }

    #[test]
    fn tool_events_read_as_started_and_finished() {
        let event = |seq, kind: &str| StoredEvent {
            seq,
            event_id: format!("e{seq}"),
            kind: nubabel_store::events::EventKind::Progress,
            event_type: kind.into(),
            body: serde_json::json!({"tool": "bash"}),
            received_at: jiff::Timestamp::UNIX_EPOCH,
        };
        let html = task_live(
            &detail("Running", None),
            &[
                event(1, "tool_execute_start"),
                event(2, "tool_execute_end"),
                event(3, "message_part"),
            ],
            None,
        );
        assert!(html.contains("<li class=\"tool-start\" data-seq=\"1\">Tool bash started</li>"));
        assert!(html.contains("<li class=\"tool-end\" data-seq=\"2\">Tool bash finished</li>"));
        assert!(!html.contains("data-seq=\"3\""));
    }
}
