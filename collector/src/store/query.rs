//! SQL for timelines, shared by both backends: `?` placeholders (PostgreSQL's `$n` are
//! substituted by [`numbered`]) and typed parameters each backend binds its own way.

use super::{Cursor, Filter, SessionFilter, prefix_end};

/// A query parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    Int(i64),
    Text(String),
}

/// A WHERE clause under construction.
#[derive(Default)]
pub struct Where {
    clauses: Vec<String>,
    pub params: Vec<Param>,
}

impl Where {
    pub fn push(&mut self, clause: &str, params: impl IntoIterator<Item = Param>) {
        self.clauses.push(clause.to_owned());
        self.params.extend(params);
    }

    pub fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.clauses.join(" AND "))
        }
    }
}

fn user_clause(w: &mut Where, user: &str, with_uid: bool) {
    match user.parse::<i64>() {
        Ok(uid) if with_uid => w.push(
            "(login_user = ? OR user_name = ? OR uid = ?)",
            [
                Param::Text(user.to_owned()),
                Param::Text(user.to_owned()),
                Param::Int(uid),
            ],
        ),
        _ if with_uid => w.push(
            "(login_user = ? OR user_name = ?)",
            [Param::Text(user.to_owned()), Param::Text(user.to_owned())],
        ),
        _ => w.push("user_name = ?", [Param::Text(user.to_owned())]),
    }
}

/// Where a timeline page's time range starts: the filter's start, or the cursor's time when
/// that is later (a page holds no record older than the cursor).
pub fn page_since(filter: &Filter, after: Option<&Cursor>) -> Option<i64> {
    match (filter.since_ns, after) {
        (Some(s), Some(c)) => Some(s.max(c.time_ns)),
        (None, Some(c)) => Some(c.time_ns),
        (s, None) => s,
    }
}

/// `SELECT host_id, seq, hash, body, time_ns, session FROM records …` for a timeline page.
pub fn timeline(filter: &Filter, after: Option<&Cursor>, limit: usize) -> (String, Vec<Param>) {
    let mut w = Where::default();
    if let Some(h) = &filter.host {
        w.push("host_id = ?", [Param::Text(h.clone())]);
    }
    // Rows after the cursor are no older than it: starting the time range there lets the
    // index seek straight to the page. (The row-value condition below alone is checked row by
    // row, so every page rescanned the window from its start: quadratic in its size.)
    if let Some(s) = page_since(filter, after) {
        w.push("time_ns >= ?", [Param::Int(s)]);
    }
    if let Some(u) = filter.until_ns {
        w.push("time_ns < ?", [Param::Int(u)]);
    }
    if let Some(u) = &filter.user {
        user_clause(&mut w, u, true);
    }
    if let Some(p) = &filter.path_prefix {
        w.push(
            "path >= ? AND path < ?",
            [Param::Text(p.clone()), Param::Text(prefix_end(p))],
        );
    }
    if !filter.kinds.is_empty() {
        let marks = vec!["?"; filter.kinds.len()].join(", ");
        w.push(
            &format!("kind IN ({marks})"),
            filter.kinds.iter().map(|k| Param::Text(k.clone())),
        );
    }
    if let Some(s) = &filter.session {
        w.push("session = ?", [Param::Text(s.clone())]);
    }
    if let Some(c) = after {
        w.push(
            "(time_ns, host_id, seq) > (?, ?, ?)",
            [
                Param::Int(c.time_ns),
                Param::Text(c.host_id.clone()),
                Param::Int(c.seq as i64),
            ],
        );
    }
    let sql = format!(
        "SELECT host_id, seq, hash, body, time_ns, session FROM records {} \
         ORDER BY time_ns, host_id, seq LIMIT {}",
        w.sql(),
        limit.max(1)
    );
    (sql, w.params)
}

pub const SESSION_COLUMNS: &str = "session, host_id, boot_id, audit_session, kind, user_name, \
    source_address, source_port, tty, login_ns, first_ns, last_ns, first_seq, last_seq, \
    records, phi_accesses, denied, execs";

pub fn sessions(filter: &SessionFilter) -> (String, Vec<Param>) {
    let mut w = Where::default();
    if let Some(h) = &filter.host {
        w.push("host_id = ?", [Param::Text(h.clone())]);
    }
    // A session overlaps the window when it was active in it.
    if let Some(s) = filter.since_ns {
        w.push("last_ns >= ?", [Param::Int(s)]);
    }
    if let Some(u) = filter.until_ns {
        w.push("first_ns < ?", [Param::Int(u)]);
    }
    if let Some(u) = &filter.user {
        user_clause(&mut w, u, false);
    }
    let sql = format!(
        "SELECT {SESSION_COLUMNS} FROM sessions {} ORDER BY first_ns, session",
        w.sql()
    );
    (sql, w.params)
}

/// Replaces each `?` with `$1`, `$2`, … (PostgreSQL). The SQL here has no `?` in literals.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_filters_in_order_and_numbers_placeholders() {
        let f = Filter {
            host: Some("db1".into()),
            user: Some("1001".into()),
            kinds: vec!["open".into(), "exec".into()],
            ..Default::default()
        };
        let (sql, params) = timeline(&f, None, 100);
        assert!(sql.contains("host_id = ? AND (login_user = ? OR user_name = ? OR uid = ?)"));
        assert!(sql.contains("kind IN (?, ?)"));
        assert_eq!(params.len(), 6);
        assert_eq!(params[3], Param::Int(1001));
        assert_eq!(
            numbered("a = ? AND b IN (?, ?)"),
            "a = $1 AND b IN ($2, $3)"
        );
    }

    #[test]
    fn a_cursor_starts_the_time_range() {
        let f = Filter {
            host: Some("db1".into()),
            since_ns: Some(100),
            until_ns: Some(1000),
            ..Default::default()
        };
        let cursor = Cursor {
            time_ns: 500,
            host_id: "db1".into(),
            seq: 7,
        };
        let (sql, params) = timeline(&f, Some(&cursor), 10);
        assert!(sql.contains("host_id = ? AND time_ns >= ? AND time_ns < ?"));
        assert!(sql.contains("(time_ns, host_id, seq) > (?, ?, ?)"));
        assert_eq!(params[1], Param::Int(500));
        let (sql, params) = timeline(&Filter::default(), Some(&cursor), 10);
        assert!(sql.contains("WHERE time_ns >= ? AND (time_ns, host_id, seq) > (?, ?, ?)"));
        assert_eq!(params[0], Param::Int(500));
        let (_, params) = timeline(&f, None, 10);
        assert_eq!(params[1], Param::Int(100));
    }
}
