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

    /// More log output on stderr (-v info, -vv debug, -vvv trace). Without it, RUST_LOG
    /// is honoured and the default level is warn.
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
    Restore {
        /// Snapshot to restore.
        #[arg(value_name = "VOL@SNAP")]
        target: String,
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
        /// Raw image; must not be larger than the volume.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Copy a volume (or one of its snapshots) into a raw, sparse image file.
    Export {
        #[arg(value_name = "VOL[@SNAP]")]
        target: String,
        /// Created or truncated.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Verify volumes without changing them.
    ///
    /// Prints every problem and note on stdout, one per line, and exits 1 if there is any
    /// problem.
    Check {
        /// Volume to check; absent means every volume.
        #[arg(value_name = "VOL")]
        volume: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume.
    Create(VolumeCreateArgs),
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
}

#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Volume size; required unless --origin names an existing file or device.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Chunk size: the unit of copy-on-write (power of two, 4K..1M).
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// Adopt this raw image or block device as the volume's data, in place.
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
