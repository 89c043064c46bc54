//! Persistent state (SQLite through sqlx): sandboxes, templates, API keys.
