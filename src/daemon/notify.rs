//! The systemd notify protocol (`Type=notify`): READY=1 once every listener is bound and
//! the volumes are open, STOPPING=1 when shutdown begins. A no-op unless systemd (or
//! anything else) set `NOTIFY_SOCKET`; a failure to notify is logged, never fatal.

use sd_notify::NotifyState;

/// Tells the service manager that the daemon serves.
pub fn ready() {
    send(&[NotifyState::Ready], "READY=1");
}

/// Tells the service manager that the daemon is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

fn send(states: &[NotifyState<'_>], what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, state = what, "cannot notify the service manager");
    }
}
