//! The operator's command line. Each command lives in its own file and,
//! except `init` and `serve`, talks to the daemon over the admin socket.

mod client;
pub mod demo;
mod drill;
mod failover;
mod init;
mod pair;
mod reads;
pub use reads::parse_rate;
mod sync;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use client::Client;

use crate::store::state::{Mode, SyncFallback};
use crate::units::{ByteSize, Dur};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Disaster-recovery replication of block volumes"
)]
pub struct Cli {
    /// The site's data directory.
    #[arg(
        long,
        global = true,
        env = "FERRY_DIR",
        default_value = "/var/lib/ferry"
    )]
    pub dir: PathBuf,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a site: config, certificate and key, empty store.
    Init {
        #[arg(long)]
        site: String,
        /// UDP address for QUIC (port 0: pick a free port at first start).
        #[arg(long, default_value = "0.0.0.0:7400")]
        listen: std::net::SocketAddr,
        /// HTTP address for Prometheus metrics.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Run the daemon in the foreground.
    Serve,
    /// Pair this site with its peer.
    #[command(subcommand)]
    Pair(PairCmd),
    /// Protect and list volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Run a replication pass now.
    Sync {
        name: String,
        /// Wait for the pass to finish, showing progress.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Role, peer, link, last recovery point and traffic, per volume.
    Status {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Compare the primary image with the DR replica now (exit 0 in sync, 3 when they differ).
    Verify {
        name: String,
        /// When they differ, rewrite the DR image's differing chunks from its
        /// store's copy of the last committed state, and verify again.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Read back every chunk and node of a volume's recovery points and check
    /// each against its name; put back damaged ones from the volume's image
    /// where it holds them (exit 0 when every point reads back whole, 3 when
    /// damage remains).
    Scrub {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List a volume's recovery points (kept at the DR site), or take one now.
    Points {
        name: String,
        /// Take a recovery point at the next flush boundary (async and sync volumes).
        #[arg(long)]
        create: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write a recovery point out as a new image file (at the DR site).
    Restore {
        name: String,
        /// The point (default: the newest).
        #[arg(long)]
        point: Option<u64>,
        /// The new image file; an existing file is never overwritten.
        #[arg(long)]
        to: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Move a volume's primary to the other site: `--planned` (zero loss,
    /// at the primary, both sites up) or `--force` (at the DR site, the
    /// primary unreachable; at a primary cut off from its peer, `--force`
    /// asserts that it stays primary, a split brain if both do).
    Failover {
        name: String,
        /// Promote although the primary cannot confirm it stopped: writes it
        /// took after the promoted state are set aside when it returns.
        #[arg(long, required_unless_present = "planned", conflicts_with = "planned")]
        force: bool,
        /// Zero-loss switchover: writes stop, the journal drains, the DR
        /// site confirms and is promoted, replication reverses (no resync).
        #[arg(long)]
        planned: bool,
        /// With --planned: disconnect NBD clients still connected (their VMs
        /// should be stopped first).
        #[arg(long, requires = "planned")]
        disconnect_clients: bool,
        /// With --planned, for a snapshot-mode volume: its writers are
        /// stopped (they reach the image directly, so ferry cannot stop
        /// them). A last pass must find the image unchanged while it reads.
        #[arg(long, requires = "planned")]
        workload_stopped: bool,
        /// Promote this recovery point (default: the replica image when it
        /// is consistent, else the newest point).
        #[arg(long)]
        point: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// A planned switchover back to the site the volume was first protected at.
    Failback {
        name: String,
        /// Disconnect NBD clients still connected (their VMs should be stopped first).
        #[arg(long)]
        disconnect_clients: bool,
        /// A snapshot-mode volume: its writers are stopped (see `failover --workload-stopped`).
        #[arg(long)]
        workload_stopped: bool,
        #[arg(long)]
        json: bool,
    },
    /// After a split brain: SITE's data wins; the other site's divergent
    /// state is kept there as a pinned point, and it becomes SITE's replica.
    Resolve {
        name: String,
        #[arg(long)]
        keep: String,
        #[arg(long)]
        json: bool,
    },
    /// Fence a primary volume: no more writes here, nothing promoted.
    Demote {
        name: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Failover drills at the DR site: a writable clone of a recovery point.
    #[command(subcommand)]
    Drill(DrillCmd),
    /// The link to the peer.
    #[command(subcommand)]
    Link(LinkCmd),
    /// The hash-chained log of drills, failovers and resolves (read directly, no daemon needed).
    Audit {
        /// Check the chain; exit 1 where it is broken.
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        json: bool,
    },
    /// Two sites on this machine: the whole story, narrated.
    Demo {
        /// Size of the generated volume.
        #[arg(long, default_value = "256MiB")]
        size: ByteSize,
        /// Keep the demo's directory instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum LinkCmd {
    /// Limit what this site sends to its peer, now and until the daemon
    /// restarts (`limits.link_bytes_per_s_max` in ferry.toml keeps it):
    /// RATE is bytes per second (`12MiB`) or bits (`100Mbit`), or `off`.
    Limit { rate: String },
}

#[derive(Subcommand, Debug)]
pub enum DrillCmd {
    /// Clone a recovery point (the newest by default) and export it writable as NAME@drill.
    Start {
        name: String,
        #[arg(long)]
        point: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Discard the clone and write the drill's report (exit 1 unless it passed).
    Stop {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Reports of past drills.
    Report {
        name: String,
        /// Only the newest report, in full.
        #[arg(long)]
        last: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PairCmd {
    /// Print a one-time pairing token (run at the DR site).
    Token {
        #[arg(long, default_value = "10m")]
        ttl: Dur,
        /// The address the other site should dial, when `listen` is not it
        /// (a wildcard like 0.0.0.0, or a NAT in between).
        #[arg(long)]
        address: Option<std::net::SocketAddr>,
        #[arg(long)]
        json: bool,
    },
    /// Present a token from the other site; both sites pin each other.
    Join { token: String },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Protect an image file or block device (run at the primary site).
    Add {
        name: String,
        #[arg(long)]
        path: PathBuf,
        #[arg(long, value_enum, default_value = "snapshot")]
        mode: Mode,
        #[arg(long, default_value = "30s")]
        interval: Dur,
        #[arg(long, default_value = "64KiB")]
        chunk_size: ByteSize,
        /// Alert when the newest recovery point is older than this (default: twice the interval).
        #[arg(long)]
        rpo_target: Option<Dur>,
        /// Sync mode: how long a flush waits for the DR site before the fallback.
        #[arg(long, default_value = "10s")]
        sync_wait: Dur,
        /// Sync mode: when the DR site stays unreachable, fail the flush or
        /// run as async until it catches up.
        #[arg(long, value_enum, default_value = "fail")]
        sync_fallback: SyncFallback,
    },
    /// List volumes at this site.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop protecting a volume at this site: its journal or redo log, its
    /// recovery points and (at the DR site) its replica image go; the
    /// primary's image file stays. Run it at each site.
    Remove {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// After an fsync of a primary's image failed and the journal no longer
    /// held its writes: flushes fail until this is run (check the disk
    /// first; what the failed fsync covered may be lost).
    ClearError {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line; errors are printed with their hint and exit 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.cmd, Cmd::Serve));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    };
    // Do not wait forever for blocking work (a scan of a huge image) at exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

fn init_logging(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = cli.dir;
    let ok = Ok(ExitCode::SUCCESS);
    match cli.cmd {
        Cmd::Init {
            site,
            listen,
            metrics,
        } => init::run(&dir, &site, listen, metrics).map(|_| ExitCode::SUCCESS),
        Cmd::Serve => crate::daemon::serve(&dir).await.map(|_| ExitCode::SUCCESS),
        Cmd::Pair(PairCmd::Token { ttl, address, json }) => {
            pair::token(&dir, ttl, address, json).await.and(ok)
        }
        Cmd::Pair(PairCmd::Join { token }) => pair::join(&dir, &token).await.and(ok),
        Cmd::Volume(VolumeCmd::Add {
            name,
            path,
            mode,
            interval,
            chunk_size,
            rpo_target,
            sync_wait,
            sync_fallback,
        }) => {
            let req = crate::daemon::api::AddVolume {
                name,
                path: std::path::absolute(&path)?.display().to_string(),
                mode,
                interval_ms: interval.0.as_millis() as u64,
                chunk_size: u32::try_from(chunk_size.0).map_err(|_| {
                    anyhow::anyhow!("--chunk-size {chunk_size} is too large (4MiB at most)")
                })?,
                rpo_target_ms: rpo_target.map(|d| d.0.as_millis() as u64).unwrap_or(0),
                sync_wait_ms: sync_wait.0.as_millis() as u64,
                sync_fallback,
            };
            volume::add(&dir, &req).await.and(ok)
        }
        Cmd::Volume(VolumeCmd::List { json }) => volume::list(&dir, json).await.and(ok),
        Cmd::Volume(VolumeCmd::Remove { name, json }) => {
            volume::remove(&dir, &name, json).await.and(ok)
        }
        Cmd::Volume(VolumeCmd::ClearError { name, json }) => {
            volume::clear_error(&dir, &name, json).await.and(ok)
        }
        Cmd::Sync { name, wait, json } => sync::run(&dir, &name, wait, json).await,
        Cmd::Status { name, json } => reads::status(&dir, name.as_deref(), json).await.and(ok),
        Cmd::Verify { name, repair, json } => reads::verify(&dir, &name, repair, json).await,
        Cmd::Scrub { name, json } => reads::scrub(&dir, &name, json).await,
        Cmd::Points { name, create, json } => {
            if create {
                reads::create_point(&dir, &name, json).await.and(ok)
            } else {
                reads::points(&dir, &name, json).await.and(ok)
            }
        }
        Cmd::Restore {
            name,
            point,
            to,
            json,
        } => reads::restore(&dir, &name, point, &to, json).await.and(ok),
        Cmd::Drill(DrillCmd::Start { name, point, json }) => {
            drill::start(&dir, &name, point, json).await.and(ok)
        }
        Cmd::Drill(DrillCmd::Stop { name, json }) => drill::stop(&dir, &name, json).await,
        Cmd::Link(LinkCmd::Limit { rate }) => reads::link_limit(&dir, &rate).await.and(ok),
        Cmd::Drill(DrillCmd::Report { name, last, json }) => {
            drill::report(&dir, &name, last, json).await.and(ok)
        }
        Cmd::Failover {
            name,
            force: _,
            planned: true,
            disconnect_clients,
            workload_stopped,
            point: _,
            json,
        } => failover::planned(
            &dir,
            &name,
            "failover",
            (disconnect_clients, workload_stopped),
            json,
        )
        .await
        .and(ok),
        Cmd::Failover {
            name, point, json, ..
        } => failover::force(&dir, &name, point, json).await.and(ok),
        Cmd::Failback {
            name,
            disconnect_clients,
            workload_stopped,
            json,
        } => failover::planned(
            &dir,
            &name,
            "failback",
            (disconnect_clients, workload_stopped),
            json,
        )
        .await
        .and(ok),
        Cmd::Resolve { name, keep, json } => {
            failover::resolve(&dir, &name, &keep, json).await.and(ok)
        }
        Cmd::Demote { name, reason, json } => {
            failover::demote(&dir, &name, reason, json).await.and(ok)
        }
        Cmd::Audit { verify, json } => drill::audit(&dir, verify, json),
        Cmd::Demo { size, keep } => demo::run(size.0, keep).await.and(ok),
    }
}

/// Prints a value as pretty JSON.
pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
