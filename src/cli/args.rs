//! The command line as clap sees it. Values with snapvol-specific syntax (names, sizes,
//! policies) are kept as strings here and parsed by the commands, so that a bad value gives
//! the one-line `snapvol: error: ...` message rather than a clap usage screen.

use clap::{ArgAction, Args, Parser, Subcommand};
use snapvol::datadir::DEFAULT_DATA_DIR;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "snapvol",
    version,
    about = "Block volumes with copy-on-write snapshots",
    after_help = "Sizes are whole numbers with an optional K, M, G or T suffix (powers of 1024), \
                  e.g. 4096, 64K, 10G.\nNames use 1-64 characters from A-Z a-z 0-9 . _ - ; \
                  a snapshot is named VOL@SNAP.\nExit status: 0 on success, 1 on error (one \
                  line on stderr), 2 on a usage error."
)]
pub struct Cli {
    /// Data directory holding the volumes.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "SNAPVOL_DATA_DIR",
        default_value = DEFAULT_DATA_DIR
    )]
    pub data_dir: PathBuf,

    /// More log output on stderr (-v info, -vv debug, -vvv trace; for `serve`, which logs
    /// info by default, -v debug, -vv trace). Without it, RUST_LOG is honoured.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, inspect and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Create, list and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Make a volume equal to one of its snapshots.
    ///
    /// Takes a safety snapshot of the state it replaces first and prints its name as
    /// VOL@SNAP (restore that to undo).
    ///
    /// While `snapvol serve` runs, restore goes through the daemon. If read-write NBD
    /// clients are connected to the volume, it refuses and says how many: their disk would
    /// change under them. --force disconnects them first, waits (up to 10 s) until they are
    /// gone, then restores; no read-write client can connect while the restore runs, so no
    /// client ever sees a mix of old and new data. Read-only snapshot exports are not
    /// affected.
    Restore {
        /// Snapshot to restore.
        #[arg(value_name = "VOL@SNAP")]
        target: String,
        /// Disconnect the volume's read-write NBD clients first (only matters while
        /// `snapvol serve` runs).
        #[arg(long)]
        force: bool,
    },
    /// List the byte ranges that differ between two snapshots, or a snapshot and the live
    /// volume.
    ///
    /// Both sides must belong to the same volume.
    Diff {
        /// The older side.
        #[arg(value_name = "VOL@A")]
        a: String,
        /// The newer side; absent means the live volume. Must name the same volume as A.
        #[arg(value_name = "VOL@B")]
        b: Option<String>,
        /// Print {"ranges":[{"offset":N,"length":N},...]}.
        #[arg(long)]
        json: bool,
    },
    /// Copy a raw image file into a volume, from offset 0.
    ///
    /// Data equal to what the volume already holds is not written, so importing the same
    /// image twice writes nothing the second time.
    Import {
        #[arg(value_name = "VOL")]
        volume: String,
        /// Raw image; must not be larger than the volume. Never a FIFO, a socket or a file
        /// of the data directory.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Copy a volume (or one of its snapshots) into a raw, sparse image file.
    Export {
        #[arg(value_name = "VOL[@SNAP]")]
        target: String,
        /// Created (mode 0600); an existing regular file only with --force (then
        /// truncated); a block device is written in place. Never a FIFO, a socket or a file
        /// of the data directory.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Replace FILE if it is an existing regular file.
        #[arg(long)]
        force: bool,
    },
    /// Write a snapshot, or what changed between two, as a stream (to stdout or -o FILE).
    ///
    /// Without --from the stream is full: `receive` makes a new volume of it. With --from it
    /// holds only the chunks that differ between BASE and SNAP (from the mapping table, as
    /// `diff` finds them), and the receiving volume's newest snapshot must be BASE's copy.
    /// Between machines: `snapvol send v@s2 --from v@s1 | ssh HOST snapvol receive v`.
    /// Stream format: docs/FORMAT.md, "Send stream".
    Send {
        #[arg(value_name = "VOL@SNAP")]
        target: String,
        /// Send only what changed since this older snapshot of the same volume.
        #[arg(long, value_name = "VOL@BASE")]
        from: Option<String>,
        /// Write the stream to FILE (created, mode 0600; an existing file is refused)
        /// instead of stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// Go on with an interrupted receive: TOKEN is what `snapvol receive --token VOL`
        /// printed on the receiving side. The token is checked against this sender's own
        /// key (DATA_DIR/send.key): a token it did not issue for this very stream is
        /// refused.
        #[arg(long, value_name = "TOKEN")]
        resume: Option<String>,
        /// Show progress on stderr.
        #[arg(long)]
        progress: bool,
        /// Volume bytes between two checkpoints (default 64 MiB; at least 1 MiB). For
        /// tests, which resume small streams.
        #[arg(long, value_name = "BYTES", hide = true)]
        checkpoint_bytes: Option<u64>,
    },
    /// Read a stream that `snapvol send` wrote (from stdin or -i FILE) into volume VOL.
    ///
    /// A full stream creates VOL (the stream's size and chunk size) with the stream's
    /// snapshot; an incremental one needs VOL's newest snapshot to be the stream's base. The
    /// snapshot appears only once the whole stream has arrived and checked out; until then
    /// VOL is served unchanged. Prints VOL@SNAP. Interrupted, `--token` prints the token
    /// for `snapvol send --resume`.
    Receive {
        #[arg(value_name = "VOL")]
        volume: String,
        /// Read the stream from FILE instead of stdin.
        #[arg(short = 'i', long = "input", value_name = "FILE", conflicts_with_all = ["token", "abort"])]
        input: Option<PathBuf>,
        /// Print the resume token of VOL's interrupted receive (and read no stream). A
        /// stream that had arrived whole but was not applied yet is applied instead.
        #[arg(long, conflicts_with = "abort")]
        token: bool,
        /// Drop VOL's interrupted receive (a full stream's unfinished volume, an
        /// incremental one's staged data).
        #[arg(long)]
        abort: bool,
        /// Discard what was written to VOL since its newest snapshot, and disconnect its
        /// read-write NBD clients, to apply an incremental stream.
        #[arg(long, conflicts_with_all = ["token", "abort"])]
        force: bool,
        /// Show progress on stderr.
        #[arg(long, conflicts_with_all = ["token", "abort"])]
        progress: bool,
    },
    /// Verify volumes without changing them.
    ///
    /// Prints every problem and note on stdout, one per line, and exits 1 if there is any
    /// problem. While `snapvol serve` runs, a volume can be checked only when no NBD
    /// client is connected to it.
    Check {
        /// Volume to check; absent means every volume.
        #[arg(value_name = "VOL")]
        volume: Option<String>,
    },
    /// Serve the volumes over NBD, with a control socket for the other commands.
    ///
    /// Exports: each volume by name (read-write), each snapshot as VOL@SNAP (read-only);
    /// the empty name means `default`. Without --listen or --socket, serves on
    /// 127.0.0.1:10809 (nbd://127.0.0.1/VOL). Creates volume `default` (1 GiB) when the
    /// data directory has no volumes. Prints `snapvol: serving N volume(s) on ...` on
    /// stderr when ready.
    ///
    /// While it runs, every other snapvol command on this data directory is sent to it
    /// through DATA_DIR/control.sock and runs there, on the volumes it holds open. SIGINT
    /// or SIGTERM stops it: no new connections, clients finish their requests (at most
    /// 30 s), every volume is flushed and closed, exit 0.
    Serve(ServeArgs),
    /// Back snapshots up to an S3-compatible object store or a directory, and restore them.
    ///
    /// REPO is s3://BUCKET/PREFIX (endpoint and keys from AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP) or
    /// file:///PATH. A snapshot is stored as content-addressed objects of 4 MiB of the
    /// volume (zstd-compressed) and one manifest, written last. See docs/BACKUP-FORMAT.md.
    #[command(subcommand)]
    Backup(BackupCommand),
}

/// Options every `backup` command takes.
#[derive(Debug, Clone, Args)]
pub struct BackupOptions {
    /// Parallel requests to the repository (1-64).
    #[arg(long, value_name = "N", default_value_t = snapvol::backup::JOBS_DEFAULT)]
    pub jobs: usize,
    /// The repository's encryption key: a file of 32 to 4096 bytes (e.g. `head -c 32
    /// /dev/urandom > KEY`). The first push into an empty repository with it makes the
    /// repository encrypted (XChaCha20-Poly1305); after that every command needs it.
    #[arg(long, value_name = "FILE")]
    pub encryption_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Upload a snapshot. Incremental by itself: against the newest snapshot of the volume
    /// already in REPO that still exists here (only chunks the mapping table says changed
    /// are read); otherwise objects REPO holds already are not sent again.
    ///
    /// --json prints {"bytes_uploaded", "objects_uploaded", "bytes_total", "seconds",
    /// "base", ...}. Interrupted, run it again: it re-sends at most --jobs objects.
    Push {
        #[arg(value_name = "VOL@SNAP")]
        target: String,
        #[arg(value_name = "REPO")]
        repo: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        opts: BackupOptions,
    },
    /// List the snapshots in a repository.
    ///
    /// --json prints {"backups":[{"volume", "snapshot", "size", "created", "pushed",
    /// "base", "objects", "manifest"},...]} (times in ns since the Unix epoch).
    List {
        #[arg(value_name = "REPO")]
        repo: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        opts: BackupOptions,
    },
    /// Make a new local volume with a backed-up snapshot's contents.
    ///
    /// Every object is checked against its digest before it is written. Until the restore
    /// finishes, NEWVOL cannot be opened or served (but see --lazy); interrupted, run the
    /// same command again to go on from where it stopped (or `volume delete NEWVOL`).
    Restore {
        #[arg(value_name = "REPO")]
        repo: String,
        #[arg(value_name = "VOL@SNAP")]
        target: String,
        #[arg(value_name = "NEWVOL")]
        new_volume: String,
        /// Instant restore: NEWVOL is served at once while it fills in the background; a
        /// read of data not fetched yet fetches it first. Needs `snapvol serve` running on
        /// the data directory; a daemon restarted meanwhile carries on. `volume info`
        /// shows the progress.
        #[arg(long)]
        lazy: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        opts: BackupOptions,
    },
    /// Check a repository: every manifest, and that every object they name is present.
    ///
    /// With --read-data every object is read and checked against its digest
    /// (--read-data-subset PCT: about PCT percent of them). Prints each problem (a damaged
    /// or missing object is named, with a backup that needs it) and exits 1 if any.
    Verify {
        #[arg(value_name = "REPO")]
        repo: String,
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        #[arg(long, value_name = "PCT")]
        read_data_subset: Option<f64>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        opts: BackupOptions,
    },
    /// Drop a snapshot's backup (its manifest). Its objects go at the next `gc`.
    Forget {
        #[arg(value_name = "REPO")]
        repo: String,
        #[arg(value_name = "VOL@SNAP")]
        target: String,
        #[command(flatten)]
        opts: BackupOptions,
    },
    /// Delete the objects no backup needs, in batched deletes.
    ///
    /// Objects younger than --grace are kept: a push still running may need them. Never
    /// run it with a grace shorter than the longest push.
    Gc {
        #[arg(value_name = "REPO")]
        repo: String,
        /// e.g. 30m, 24h, 7d; a plain number is seconds.
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        grace: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        opts: BackupOptions,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Options from a TOML file, keys named as these flags (`tls-certificates = "DIR"`),
    /// plus `data-dir` and `log-level`; flags given here override it (see the README).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// TCP address to serve NBD on (repeatable). An address that is not loopback needs
    /// --tls require (or --insecure). Port 0 picks a free port (printed when ready).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<String>,
    /// TLS for NBD clients: `off` (NBD_OPT_STARTTLS refused), `on` (offered; plaintext
    /// clients are served too), `require` (every option but STARTTLS and ABORT is refused
    /// until TLS is up; no data is ever served in plaintext). `on` and `require` need
    /// --tls-certificates. Applies to --socket connections too.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = TlsArg::Off)]
    pub tls: TlsArg,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (the layout of
    /// nbdkit and qemu's tls-creds-x509). ca-cert.pem verifies client certificates; without
    /// --tls-verify-peer it may be left out, and clients need present none.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Require a client certificate signed by ca-cert.pem (its subject CN and SANs are then
    /// the client's names for --authz).
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// Which clients may open which exports, read-only or read-write (TOML, see the
    /// README): a client is known by its TLS certificate's CN or SANs, or on a --socket by
    /// its uid and groups. Exports a client may not open are not listed to it. Without it
    /// every client may open every export.
    #[arg(long, value_name = "FILE")]
    pub authz: Option<PathBuf>,
    /// Allow a --listen address that is not loopback without --tls require: anyone who
    /// can reach it can then read and write the exports in plaintext.
    #[arg(long)]
    pub insecure: bool,
    /// Unix socket to serve NBD on (repeatable). A stale socket file is replaced; one
    /// that a server answers on is not.
    #[arg(long = "socket", value_name = "PATH")]
    pub sockets: Vec<PathBuf>,
    /// Most NBD connections at once; further ones are closed as soon as accepted.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,
    /// Permissions of the --socket files, in octal (default 600: only the daemon's user
    /// and root may connect). Set whatever the umask.
    #[arg(long, value_name = "MODE", requires = "sockets")]
    pub socket_mode: Option<String>,
    /// Group (name or number) of the --socket files, e.g. with --socket-mode 660 to let
    /// that group's members connect.
    #[arg(long, value_name = "GROUP", requires = "sockets")]
    pub socket_group: Option<String>,
    /// Milliseconds a control client has to send its whole request (default 10000). For
    /// tests, which need not wait 10 s to see a slow client cut off.
    #[arg(long, value_name = "MS", hide = true)]
    pub control_request_timeout_ms: Option<u64>,
    /// Milliseconds an NBD client has for the whole handshake, TLS handshake included
    /// (default 10000). For tests.
    #[arg(long, value_name = "MS", hide = true)]
    pub handshake_timeout_ms: Option<u64>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (port 0 picks a free port,
    /// logged when bound).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// Create volume `default` with this size if it does not exist (without this option
    /// it is created, 1 GiB, only when there are no volumes at all).
    #[arg(long, value_name = "SIZE")]
    pub create_default_size: Option<String>,
}

/// `serve --tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsArg {
    Off,
    On,
    Require,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume.
    Create(Box<VolumeCreateArgs>),
    /// List volumes.
    ///
    /// --json prints {"volumes":[INFO,...]} where each INFO is the object that
    /// `volume info --json` prints.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's configuration, snapshots and I/O counters.
    Info {
        #[arg(value_name = "NAME")]
        name: String,
        /// Print the volume's information as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume with its snapshots.
    ///
    /// Removes the stores snapvol created; an adopted origin is left in place.
    Delete {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Close a volume and open it again, so its recovery runs.
    ///
    /// How a volume that failed (`volume "NAME" has failed and must be reopened`, after an
    /// I/O error or a failed sync) is brought back while `snapvol serve` keeps running:
    /// the failed volume is dropped without a checkpoint and opened again from its journal
    /// and files, as after a power cut; a healthy volume is closed normally first. Refused
    /// while NBD clients or commands use it. Without a running daemon, opens and closes the
    /// volume.
    Reopen {
        #[arg(value_name = "NAME")]
        name: String,
        /// Disconnect the volume's read-write NBD clients first (only matters while
        /// `snapvol serve` runs; other clients must disconnect themselves).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Volume size; required unless --origin names an existing file or device.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Chunk size: the unit of copy-on-write (power of two, 4K..1M; default 64K). The first
    /// write to a chunk after a snapshot copies the whole chunk, and the mapping table keeps
    /// about 24-30 bytes of memory per preserved chunk: smaller chunks make first writes
    /// cheaper and cost more memory per preserved byte.
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// Adopt this raw image or block device as the volume's data, in place (never one
    /// another volume uses, nor any file of the data directory).
    #[arg(long, value_name = "PATH")]
    pub origin: Option<PathBuf>,
    /// Where preserved chunks go (repeat for several stores); default: one file in the
    /// volume's directory.
    #[arg(long = "snapshot-store", value_name = "PATH")]
    pub snapshot_stores: Vec<PathBuf>,
    /// Capacity of each snapshot store; default: as much as its file system allows.
    #[arg(long, value_name = "SIZE")]
    pub store_size: Option<String>,
    /// What a write does when the snapshot stores are full: refuse (fail the write, keep
    /// every snapshot) or prune-oldest (delete the oldest snapshots until it fits).
    #[arg(long, value_name = "POLICY")]
    pub on_store_full: Option<String>,
    /// How writes find what changed: always (compare with the old data, reading it from
    /// the disk when it is not in memory; identical data is never written) or cached
    /// (compare only where the old data is in memory, else write without reading: fewer
    /// reads on volumes larger than memory, identical data there is written).
    #[arg(long, value_name = "POLICY")]
    pub compare: Option<String>,
    /// What the first change to a chunk after a snapshot copies: whole (the chunk; later
    /// changes until the next snapshot copy nothing) or parts (only the sixteenths it
    /// touches, for chunks of 64K and more: fewer bytes for scattered first writes, a copy
    /// again when other parts change).
    #[arg(long, value_name = "POLICY")]
    pub copies: Option<String>,
    /// Most data written to the origin and not yet on its disk before writers wait for
    /// the disk (e.g. 24M): bounds what a snapshot create or flush waits for under heavy
    /// writes, at the price of writes at the disk's rate once reached. Without it, the
    /// kernel's dirty limits apply (gigabytes on a large host).
    #[arg(long, value_name = "SIZE")]
    pub dirty_max: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume's current contents.
    Create {
        #[arg(value_name = "VOL@SNAP")]
        target: String,
    },
    /// List a volume's snapshots, oldest first.
    ///
    /// EXCLUSIVE is the store space only that snapshot uses (what deleting it frees).
    /// --json prints {"snapshots":[{"name", "created" (RFC 3339, UTC), "created_unix_ns",
    /// "id", "exclusive_bytes"},...]}.
    List {
        #[arg(value_name = "VOL")]
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot, freeing the store space only it used.
    Delete {
        #[arg(value_name = "VOL@SNAP")]
        target: String,
    },
}
