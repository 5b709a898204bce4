//! ferry's chaos runner: `cargo run --release -p chaos-tests -- SCENARIO
//! --runs N --seed S` (or `all`, and `--duration 1h` for a soak). It starts
//! real `ferry serve` processes (this binary, as ferry) in temporary
//! directories, drives writes through the NBD export with an oracle that
//! records every acknowledged flush, injects faults on a schedule drawn
//! from the seed, and checks the invariants. It ends with one table and
//! exits non-zero on any violation.

#[path = "../../tests/common/nbd_client.rs"]
#[allow(dead_code)]
mod nbd_client;
mod oracle;
mod proxy;
mod scenarios;
mod site;

use std::process::ExitCode;
use std::time::{Duration, Instant};

struct Args {
    scenarios: Vec<String>,
    runs: u64,
    seed: u64,
    duration: Option<Duration>,
}

fn usage() -> String {
    format!(
        "usage: chaos-tests SCENARIO|all [--runs N] [--seed S] [--duration 30m]\nscenarios: {}",
        scenarios::ALL.join(" ")
    )
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        scenarios: Vec::new(),
        runs: 1,
        seed: 1,
        duration: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{what} needs a value"));
        match arg.as_str() {
            "--runs" => {
                a.runs = value("--runs")?
                    .parse()
                    .map_err(|e| format!("--runs: {e}"))?
            }
            "--seed" => {
                a.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--duration" => {
                let v = value("--duration")?;
                let d: ferry::units::Dur = v.parse().map_err(|e| format!("--duration: {e}"))?;
                a.duration = Some(d.0);
            }
            "-h" | "--help" => return Err(usage()),
            "all" => a
                .scenarios
                .extend(scenarios::ALL.iter().map(|s| s.to_string())),
            s if scenarios::ALL.contains(&s) => a.scenarios.push(s.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    if a.scenarios.is_empty() {
        return Err(usage());
    }
    Ok(a)
}

/// A run's seed: reproducible from the runner's seed, the scenario and the run.
fn run_seed(seed: u64, scenario: &str, run: u64) -> u64 {
    let h = blake3::hash(format!("{seed}/{scenario}/{run}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}

#[derive(Default)]
struct Row {
    runs: u64,
    faults: u64,
    violations: u64,
    errors: u64,
    written: u64,
    verified: u64,
}

/// `chaos-tests wan-proxy --to HOST:PORT [--rate 100Mbit] [--rtt 50ms]
/// [--jitter 1ms] [--loss 0.1]`: the runner's WAN proxy on its own, for the
/// benchmarks (bench/wan.sh): it prints `listening ADDR`, relays to the
/// target with the impairment both ways (half the RTT each way) and runs
/// until it is killed.
fn wan_proxy(args: &[String]) -> Result<(), String> {
    let mut target = None;
    let mut leg = proxy::Leg::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        let ms = |v: &str| -> Result<Duration, String> {
            let d: ferry::units::Dur = v.parse().map_err(|e| format!("{a}: {e}"))?;
            Ok(d.0)
        };
        match a.as_str() {
            "--to" => target = Some(v.parse().map_err(|e| format!("--to: {e}"))?),
            "--rate" => leg.rate = ferry::cli::parse_rate(v).map_err(|e| format!("--rate: {e}"))?,
            "--rtt" => leg.delay = ms(v)? / 2,
            "--jitter" => leg.jitter = ms(v)?,
            "--loss" => leg.loss_pct = v.parse().map_err(|e| format!("--loss: {e}"))?,
            other => return Err(format!("wan-proxy: unknown argument {other:?}")),
        }
    }
    let target = target.ok_or("wan-proxy needs --to HOST:PORT")?;
    let px = proxy::Proxy::start(target, 1).map_err(|e| format!("wan-proxy: {e}"))?;
    px.set(proxy::Impair {
        up: leg.clone(),
        down: leg,
    });
    println!("listening {}", px.addr);
    loop {
        std::thread::sleep(Duration::from_secs(10));
        eprintln!("wan-proxy: {} packets dropped so far", px.dropped());
    }
}

fn main() -> ExitCode {
    if std::env::var_os("CHAOS_AS_FERRY").is_some() {
        return ferry::cli::main();
    }
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "wan-proxy") {
        if let Err(e) = wan_proxy(&argv[1..]) {
            eprintln!("{e}");
        }
        return ExitCode::from(2);
    }
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t0 = Instant::now();
    let mut rows: Vec<(String, Row)> = args
        .scenarios
        .iter()
        .map(|s| (s.clone(), Row::default()))
        .collect();
    let mut run = 0u64;
    loop {
        for (name, row) in rows.iter_mut() {
            let seed = run_seed(args.seed, name, run);
            let started = Instant::now();
            match rt.block_on(scenarios::run(name, seed)) {
                Ok(o) => {
                    eprintln!(
                        "{name} run {run} (seed {seed}): {} faults, {} violations, {:.1}s",
                        o.faults,
                        o.violations.len(),
                        started.elapsed().as_secs_f64()
                    );
                    row.faults += o.faults;
                    row.violations += o.violations.len() as u64;
                    row.written += o.written;
                    row.verified += o.verified;
                }
                Err(e) => {
                    // The harness could not do what the run needed (a
                    // daemon that did not come up, a writer that got no
                    // acknowledgment): it counts as a failure too.
                    eprintln!("{name} run {run} (seed {seed}): ERROR {e:#}");
                    row.errors += 1;
                }
            }
            row.runs += 1;
        }
        run += 1;
        let more = match args.duration {
            Some(d) => t0.elapsed() < d,
            None => run < args.runs,
        };
        if !more {
            break;
        }
    }
    println!(
        "\n{:<22} {:>5} {:>7} {:>11} {:>7} {:>12} {:>12}",
        "scenario", "runs", "faults", "violations", "errors", "written MiB", "verified MiB"
    );
    let mut bad = 0;
    for (name, r) in &rows {
        println!(
            "{:<22} {:>5} {:>7} {:>11} {:>7} {:>12.1} {:>12.1}",
            name,
            r.runs,
            r.faults,
            r.violations,
            r.errors,
            r.written as f64 / (1 << 20) as f64,
            r.verified as f64 / (1 << 20) as f64
        );
        bad += r.violations + r.errors;
    }
    println!(
        "seed {}, {:.0} s in all; {}",
        args.seed,
        t0.elapsed().as_secs_f64(),
        if bad == 0 { "no violations" } else { "FAILED" }
    );
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
