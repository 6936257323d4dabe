//! `serve --config FILE`: the daemon's options in a TOML file, named as the command-line
//! flags are (`tls-certificates = "..."` for `--tls-certificates`), plus `data-dir` and
//! `log-level`. Flags given on the command line (or `SNAPVOL_DATA_DIR`) override the file;
//! a list on the command line (`--listen`, `--socket`) replaces the file's list. An unknown
//! key or a bad value is one error naming the key. Relative paths in the file are relative
//! to the file's directory.

use super::args::{ServeArgs, TlsArg};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Largest config file read (a config is a few hundred bytes).
const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// The file's contents. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    pub data_dir: Option<PathBuf>,
    pub log_level: Option<LogLevel>,
    pub listen: Option<Vec<String>>,
    pub socket: Option<Vec<PathBuf>>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub max_connections: Option<u32>,
    pub tls: Option<TlsMode>,
    pub tls_certificates: Option<PathBuf>,
    pub tls_verify_peer: Option<bool>,
    pub authz: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub create_default_size: Option<String>,
    pub metrics: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Off,
    On,
    Require,
}

/// Which of the defaulted options the command line (or the environment) set: those keep
/// their value over the file's.
#[derive(Debug, Clone, Copy, Default)]
pub struct GivenFlags {
    pub data_dir: bool,
    pub tls: bool,
    pub max_connections: bool,
}

/// What `serve` runs with once the file and the command line are merged.
#[derive(Debug)]
pub struct Effective {
    pub data_dir: PathBuf,
    pub args: ServeArgs,
    pub log_level: Option<LogLevel>,
}

impl ServeConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ServeConfig> {
        let shown = path.display();
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read config file {shown}"))?;
        if !meta.is_file() {
            bail!("config file {shown} is not a regular file");
        }
        if meta.len() > CONFIG_BYTES_MAX {
            bail!("config file {shown} is larger than {CONFIG_BYTES_MAX} bytes");
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {shown}"))?;
        let mut config: ServeConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {shown}: {}", describe(&e, &text)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in [
            config.data_dir.as_mut(),
            config.tls_certificates.as_mut(),
            config.authz.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            rebase(p);
        }
        config.socket.iter_mut().flatten().for_each(rebase);
        Ok(config)
    }

    /// The command line over the file.
    pub fn merge(self, data_dir: PathBuf, args: ServeArgs, given: GivenFlags) -> Effective {
        let mut a = args;
        let data_dir = match self.data_dir {
            Some(d) if !given.data_dir => d,
            _ => data_dir,
        };
        if a.listen.is_empty() {
            a.listen = self.listen.unwrap_or_default();
        }
        if a.sockets.is_empty() {
            a.sockets = self.socket.unwrap_or_default();
        }
        a.socket_mode = a.socket_mode.or(self.socket_mode);
        a.socket_group = a.socket_group.or(self.socket_group);
        if !given.max_connections
            && let Some(n) = self.max_connections
        {
            a.max_connections = n;
        }
        if !given.tls
            && let Some(mode) = self.tls
        {
            a.tls = match mode {
                TlsMode::Off => TlsArg::Off,
                TlsMode::On => TlsArg::On,
                TlsMode::Require => TlsArg::Require,
            };
        }
        a.tls_certificates = a.tls_certificates.or(self.tls_certificates);
        a.tls_verify_peer |= self.tls_verify_peer.unwrap_or(false);
        a.authz = a.authz.or(self.authz);
        a.insecure |= self.insecure.unwrap_or(false);
        a.create_default_size = a.create_default_size.or(self.create_default_size);
        a.metrics = a.metrics.or(self.metrics);
        Effective {
            data_dir,
            args: a,
            log_level: self.log_level,
        }
    }

    /// Checks the values serde cannot (the same checks `serve` makes of its flags, named
    /// by key here).
    pub fn validate(&self) -> Result<()> {
        if self.max_connections == Some(0) {
            bail!("key `max-connections`: must be at least 1");
        }
        if let Some(text) = &self.socket_mode
            && !matches!(u32::from_str_radix(text, 8), Ok(m) if m <= 0o777)
        {
            bail!("key `socket-mode`: {text:?} is not octal permissions such as \"660\"");
        }
        if let Some(text) = &self.create_default_size {
            snapvol::names::parse_size(text)
                .map_err(|e| anyhow::anyhow!("key `create-default-size`: {e}"))?;
        }
        Ok(())
    }
}

/// toml's message on one line, with the key it is about when the message does not name it.
fn describe(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().to_string();
    let key = e.span().and_then(|span| {
        let line = text[..span.start.min(text.len())].rsplit('\n').next()?;
        let whole = text[span.start.min(text.len())..].split('\n').next()?;
        let line = format!("{line}{whole}");
        let (k, _) = line.split_once('=')?;
        Some(k.trim().to_string())
    });
    let line_no = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    match (key, line_no) {
        (Some(k), Some(n)) if !k.is_empty() && !k.starts_with('[') => {
            format!("key `{k}` (line {n}): {msg}")
        }
        (_, Some(n)) => format!("line {n}: {msg}"),
        _ => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapvol.toml");
        std::fs::write(&path, text).unwrap();
        let c = ServeConfig::load(&path)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn every_key_parses_and_relative_paths_follow_the_file() {
        let c = parse(
            r#"
data-dir = "data"
log-level = "debug"
listen = ["127.0.0.1:10809", "[::1]:10809"]
socket = ["nbd.sock"]
socket-mode = "660"
socket-group = "disk"
max-connections = 8
tls = "require"
tls-certificates = "/etc/snapvol/pki"
tls-verify-peer = true
authz = "authz.toml"
insecure = false
create-default-size = "2G"
"#,
        )
        .unwrap();
        assert!(c.data_dir.unwrap().ends_with("data") && c.authz.unwrap().is_absolute());
        assert_eq!(c.log_level, Some(LogLevel::Debug));
        assert_eq!(c.tls, Some(TlsMode::Require));
        assert_eq!(
            c.tls_certificates.unwrap(),
            PathBuf::from("/etc/snapvol/pki")
        );
        assert_eq!(c.max_connections, Some(8));
    }

    #[test]
    fn bad_keys_and_values_are_one_error_naming_the_key() {
        for (text, want) in [
            ("listne = [\"x\"]\n", "unknown field `listne`"),
            ("tls = \"sometimes\"\n", "key `tls` (line 1)"),
            (
                "\nmax-connections = \"many\"\n",
                "key `max-connections` (line 2)",
            ),
            (
                "max-connections = 0\n",
                "key `max-connections`: must be at least 1",
            ),
            ("socket-mode = \"999\"\n", "key `socket-mode`"),
            (
                "create-default-size = \"1.5G\"\n",
                "key `create-default-size`",
            ),
            ("log-level = \"loud\"\n", "key `log-level`"),
            ("tls = \n", "line 1"),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{text:?}: not one line: {e}");
        }
    }

    #[test]
    fn the_command_line_wins() {
        use clap::Parser;
        let cli = super::super::args::Cli::parse_from([
            "snapvol",
            "serve",
            "--listen",
            "127.0.0.1:1",
            "--tls",
            "off",
        ]);
        let super::super::args::Command::Serve(args) = cli.command else {
            unreachable!()
        };
        let c = ServeConfig {
            listen: Some(vec!["127.0.0.1:2".into()]),
            socket: Some(vec!["/s".into()]),
            tls: Some(TlsMode::Require),
            max_connections: Some(5),
            ..ServeConfig::default()
        };
        let e = c.merge(
            "dd".into(),
            args,
            GivenFlags {
                tls: true,
                ..GivenFlags::default()
            },
        );
        assert_eq!(e.args.listen, ["127.0.0.1:1"]);
        assert_eq!(e.args.sockets, [PathBuf::from("/s")]);
        assert_eq!(e.args.tls, TlsArg::Off);
        assert_eq!(e.args.max_connections, 5);
    }
}
