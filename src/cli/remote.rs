//! The client side of the control socket: while a daemon serves the data directory, a
//! command is sent to it instead of being run here.

use anyhow::{Context, Result, bail};
use snapvol::daemon::control::{self, Request};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

/// Sends this process's command line to the daemon serving `data_dir`, prints its reply
/// and returns the exit code to use; `Ok(None)` when no daemon serves it (no control
/// socket, or a stale one) and the command should run here.
pub fn forward(data_dir: &Path) -> Result<Option<ExitCode>> {
    let Some(stream) = connect(data_dir)? else {
        return Ok(None);
    };
    let request = request(data_dir)?;
    let reply = control::call(stream, &request).with_context(|| {
        format!(
            "running the command in the daemon serving {}",
            data_dir.display()
        )
    })?;
    // Output goes out even if the other stream is closed.
    let _ = std::io::stdout().write_all(reply.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(reply.stderr.as_bytes());
    Ok(Some(ExitCode::from(reply.exit.clamp(0, 255) as u8)))
}

/// A connection to the control socket of the daemon serving `data_dir`; `Ok(None)` when
/// no daemon serves it (no control socket, or a stale one).
pub fn connect(data_dir: &Path) -> Result<Option<UnixStream>> {
    let socket = control::socket_path(data_dir);
    // No socket file: no daemon. (Checked first, so that a data directory whose path is
    // too long for a socket address still works without a daemon.)
    if std::fs::symlink_metadata(&socket).is_err() {
        return Ok(None);
    }
    match UnixStream::connect(&socket) {
        Ok(s) => Ok(Some(s)),
        // A daemon that died leaves its socket behind: nothing answers.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            tracing::debug!(socket = %socket.display(), "stale control socket: running the command here");
            Ok(None)
        }
        Err(e) => bail!(
            "a daemon serves {} but its control socket {} cannot be reached: {e}",
            data_dir.display(),
            socket.display()
        ),
    }
}

/// This process's command line as a control request.
pub fn request(data_dir: &Path) -> Result<Request> {
    let argv = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string().map_err(|a| {
                anyhow::anyhow!(
                    "argument {a:?} is not valid UTF-8, so it cannot be sent to the daemon \
                     serving {}",
                    data_dir.display()
                )
            })
        })
        .collect::<Result<Vec<String>>>()?;
    let cwd = std::env::current_dir().context("cannot determine the current directory")?;
    Ok(Request {
        argv,
        cwd,
        env: control::forwarded_env(),
        stream: false,
        pass_fd: false,
    })
}
