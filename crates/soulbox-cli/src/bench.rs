//! `soulbox bench`: how fast and how dense a running SoulBox server is, measured from a client
//! the way the SDKs use it, and the same "start an isolated process that runs `true`" with
//! bubblewrap, crun and runc side by side.
//!
//! Runs against the server that `E2B_API_URL` / `E2B_SANDBOX_URL` / `E2B_API_KEY` name (the
//! lines `soulbox serve` prints), as root on the server's machine (the memory figures read
//! `/proc` and the sandboxes' cgroups). Prints a table and, with `--json`, writes every number.
//! `--short` is the CI mode: small counts, a few minutes. The full mode is the one
//! `docs/benchmarks.md` reports.

mod host;
mod peers;
mod persistence;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use soulbox_client::envd::{CallOptions, EnvdClient};
use soulbox_client::rest::{ListFilter, RestClient};
use soulbox_wire::envd::process::{self as pb, process_event};
use soulbox_wire::rest::{NewSandbox, POOLS_PATH, WarmPool};
use tokio::sync::Semaphore;

use stats::Summary;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// CI mode: small counts (20 runs, 8 concurrent, 20 idle sandboxes), a few minutes.
    #[arg(long)]
    pub short: bool,
    /// Control plane of the server to measure.
    #[arg(long, env = "E2B_API_URL", default_value = "http://127.0.0.1:3000")]
    pub api_url: String,
    /// Sandbox gateway of the server.
    #[arg(long, env = "E2B_SANDBOX_URL", default_value = "http://127.0.0.1:3001")]
    pub sandbox_url: String,
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Template of every sandbox made.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Sequential create → first command runs [default: 200, short 20].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Creates started at once for the concurrent figure [default: 50, short 8].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Idle sandbox counts to measure memory and API responsiveness at, ascending
    /// [default: 100,1000,2000; short 20].
    #[arg(long, value_delimiter = ',')]
    pub idle: Option<Vec<usize>>,
    /// Creates (and kills) in flight while filling up to the idle counts.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    /// Seconds idle sandboxes settle before their memory is read.
    #[arg(long)]
    pub settle: Option<u64>,
    /// The server's data dir: the leak check then covers its state directories too.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Root filesystem for the side-by-side runs [default: $SOULBOX_BENCH_ROOTFS, the base
    /// template's bootstrap layer in --data-dir, or the CLI tests' cached base template].
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Runs of each side-by-side tool [default: 100, short 20].
    #[arg(long)]
    pub peer_runs: Option<usize>,
    /// Skip the side-by-side comparison.
    #[arg(long)]
    pub no_peers: bool,
    /// Also write every number as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// The counts of one run, from the flags and the mode.
struct Plan {
    runs: usize,
    concurrency: usize,
    idle: Vec<usize>,
    settle: Duration,
    peer_runs: usize,
    rtt_runs: usize,
    api_calls: usize,
    pause_runs: usize,
}

impl Plan {
    fn of(a: &BenchArgs) -> Plan {
        let (runs, concurrency, idle, settle, peer_runs, rtt_runs, api_calls) = if a.short {
            (20, 8, vec![20], 2, 20, 50, 50)
        } else {
            (200, 50, vec![100, 1000, 2000], 10, 100, 500, 200)
        };
        let mut idle = a.idle.clone().unwrap_or(idle);
        idle.sort_unstable();
        idle.dedup();
        Plan {
            runs: a.runs.unwrap_or(runs),
            concurrency: a.concurrency.unwrap_or(concurrency),
            idle,
            settle: Duration::from_secs(a.settle.unwrap_or(settle)),
            peer_runs: a.peer_runs.unwrap_or(peer_runs),
            rtt_runs,
            api_calls,
            pause_runs: if a.short { 10 } else { 100 },
        }
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::async_runtime(true)?.block_on(bench(args))
}

/// The server under test.
#[derive(Clone)]
struct Target {
    rest: RestClient,
    sandbox_url: String,
    template: String,
}

/// A sandbox this run made.
struct Made {
    id: String,
    envd: EnvdClient,
}

impl Target {
    async fn create(&self, timeout: i64) -> anyhow::Result<Made> {
        let s = self
            .rest
            .create(&NewSandbox {
                template_id: self.template.clone(),
                timeout: Some(timeout),
                secure: Some(true),
                ..Default::default()
            })
            .await?;
        let mut envd = EnvdClient::new(&self.sandbox_url)?.sandbox(&s.sandbox_id);
        if let Some(token) = &s.envd_access_token {
            envd = envd.access_token(token);
        }
        Ok(Made {
            id: s.sandbox_id,
            envd,
        })
    }

    async fn kill(&self, id: &str) -> anyhow::Result<()> {
        Ok(self.rest.kill(id).await?)
    }

    async fn pools(&self) -> Vec<WarmPool> {
        self.rest
            .call_json::<(), Vec<WarmPool>>(Method::GET, POOLS_PATH, None)
            .await
            .unwrap_or_default()
    }

    /// Waits (at most `limit`) until the benchmarked template's pool holds its target, so that
    /// a burst meets the pool a server in steady state would have; returns the pool then.
    async fn settled_pool(&self, limit: Duration) -> Option<WarmPool> {
        let deadline = Instant::now() + limit;
        loop {
            let pool = self
                .pools()
                .await
                .into_iter()
                .find(|p| p.template == self.template);
            let full = pool
                .as_ref()
                .is_none_or(|p| p.idle.len() >= p.target && p.starting == 0);
            if full || Instant::now() >= deadline {
                return pool;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs a command to its end: what the SDKs' `commands.run("true")` sends is a login shell
/// (`/bin/bash -l -c true`); `shell: false` runs `/bin/true` itself.
async fn run_true(envd: &EnvdClient, shell: bool) -> anyhow::Result<()> {
    if shell {
        run_output(envd, "/bin/bash", &["-l", "-c", "true"]).await?;
    } else {
        run_output(envd, "/bin/true", &[]).await?;
    }
    Ok(())
}

/// Runs `cmd args` in the sandbox as its default user: its stdout, or an error when it does
/// not exit 0.
async fn run_output(envd: &EnvdClient, cmd: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let req = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let mut stream = envd.start(&req, &opts).await?;
    let mut stdout = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg?.event.and_then(|e| e.event) {
            Some(process_event::Event::Data(d)) => {
                if let Some(process_event::data_event::Output::Stdout(b)) = d.output {
                    stdout.extend_from_slice(&b);
                }
            }
            Some(process_event::Event::End(end)) => {
                if end.exit_code != 0 {
                    bail!("`{cmd}` exited with {}", end.exit_code);
                }
                return Ok(stdout);
            }
            _ => {}
        }
    }
    bail!("the process stream ended without an end event")
}

/// Times `runs` reads of `/proc/meminfo` inside the sandbox (LXCFS's view of it: a FUSE round
/// trip to the host per read), measured there, one line of nanoseconds per read.
async fn proc_meminfo_reads(envd: &EnvdClient, runs: usize) -> Samples {
    const SCRIPT: &str = "import sys, time\n\
        for _ in range(int(sys.argv[1])):\n\
        \x20   t = time.perf_counter_ns()\n\
        \x20   with open('/proc/meminfo', 'rb') as f: f.read()\n\
        \x20   print(time.perf_counter_ns() - t)\n";
    let mut samples = Samples::default();
    let n = runs.to_string();
    let r = run_output(envd, "/usr/bin/env", &["python3", "-c", SCRIPT, &n]).await;
    match &r {
        Ok(out) => {
            for line in String::from_utf8_lossy(out).lines() {
                let ns = line.trim().parse::<u64>().map_err(anyhow::Error::from);
                let took = ns
                    .as_ref()
                    .map_or(Duration::ZERO, |&ns| Duration::from_nanos(ns));
                samples.record(&ns, took);
            }
        }
        Err(_) => samples.record(&r, Duration::ZERO),
    }
    samples
}

/// Latencies of one scenario plus how many attempts failed (and the first error).
#[derive(Default)]
struct Samples {
    times: Vec<Duration>,
    failures: usize,
    first_error: Option<String>,
}

impl Samples {
    fn record<T>(&mut self, r: &anyhow::Result<T>, took: Duration) {
        match r {
            Ok(_) => self.times.push(took),
            Err(e) => {
                self.failures += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    fn json(&self) -> Value {
        json!({
            "summary_ms": Summary::of(&self.times),
            "failures": self.failures,
            "first_error": self.first_error,
        })
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let plan = Plan::of(&args);
    let target = Target {
        rest: RestClient::new(&args.api_url, &args.api_key)?,
        sandbox_url: args.sandbox_url.clone(),
        template: args.template.clone(),
    };
    target
        .rest
        .list(&ListFilter {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .with_context(|| format!("reaching the server at {}", args.api_url))?;
    let started = Instant::now();
    let mut report = Report::new(&args, &plan);
    report.set("pools_before", json!(target.pools().await));

    eprintln!("bench: {} sequential create → first command", plan.runs);
    let (total, create, first) = sequential(&target, plan.runs).await;
    report.latency("create_to_first_command", &total);
    report.latency("create", &create);
    report.latency("first_command", &first);

    eprintln!("bench: {} concurrent creates", plan.concurrency);
    let pool = target.settled_pool(Duration::from_secs(15)).await;
    report.set("pool_before_burst", json!(pool));
    let (conc, conc_create) = concurrent(&target, plan.concurrency).await;
    report.latency("create_to_first_command_concurrent", &conc);
    report.latency("create_concurrent", &conc_create);

    eprintln!("bench: command and file round trips");
    rtts(&target, plan.rtt_runs, &mut report).await?;

    eprintln!("bench: {} pause/resume cycles per kind", plan.pause_runs);
    persistence::pause_resume(&target, plan.pause_runs, &mut report).await;

    eprintln!("bench: idle density at {:?}", plan.idle);
    density(
        &target,
        &plan,
        args.parallel,
        args.data_dir.as_deref(),
        &mut report,
    )
    .await;
    report.set("pools_after", json!(target.pools().await));

    if args.no_peers {
        report.set("peers", json!({"skipped": "--no-peers"}));
    } else {
        eprintln!("bench: side by side with bubblewrap, crun, runc");
        side_by_side(&args, &plan, &mut report).await;
    }
    report.set("elapsed_s", json!(started.elapsed().as_secs_f64()));
    report.finish_host();
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.root)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    let failures = report.failures();
    if !failures.is_empty() {
        bail!("the benchmark saw failures: {}", failures.join("; "));
    }
    Ok(())
}

/// Create → first command (`bash -l -c true`), one at a time; kills outside the timing.
async fn sequential(target: &Target, runs: usize) -> (Samples, Samples, Samples) {
    let (mut total, mut create, mut first) =
        (Samples::default(), Samples::default(), Samples::default());
    // One unmeasured run: connections and first-use costs.
    if let Ok(m) = target.create(60).await {
        let _ = run_true(&m.envd, true).await;
        let _ = target.kill(&m.id).await;
    }
    for _ in 0..runs {
        let t0 = Instant::now();
        let made = target.create(60).await;
        let t1 = Instant::now();
        create.record(&made, t1 - t0);
        let Ok(m) = made else {
            total.record(&made, t1 - t0);
            continue;
        };
        let ran = run_true(&m.envd, true).await;
        let t2 = Instant::now();
        first.record(&ran, t2 - t1);
        total.record(&ran, t2 - t0);
        let _ = target.kill(&m.id).await;
    }
    (total, create, first)
}

/// `n` creates → first command started at once; each one's latency, whole and of the create
/// alone.
async fn concurrent(target: &Target, n: usize) -> (Samples, Samples) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let target = target.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let made = target.create(60).await;
            let created = t0.elapsed();
            let ran = match &made {
                Ok(m) => run_true(&m.envd, true).await,
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            };
            let made = made.map(|m| m.id);
            (made, created, ran, t0.elapsed())
        });
    }
    let (mut total, mut create) = (Samples::default(), Samples::default());
    let mut ids = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok((made, created, ran, took)) = done {
            create.record(&made, created);
            total.record(&ran, took);
            ids.extend(made.ok());
        }
    }
    for id in ids {
        let _ = target.kill(&id).await;
    }
    (total, create)
}

/// Command and file round trips on one sandbox.
async fn rtts(target: &Target, runs: usize, report: &mut Report) -> anyhow::Result<()> {
    let m = target
        .create(600)
        .await
        .context("creating the RTT sandbox")?;
    let mut shell = Samples::default();
    let mut direct = Samples::default();
    let mut write = Samples::default();
    let mut read = Samples::default();
    let data = Bytes::from(vec![b'x'; 1024]);
    for _ in 0..runs {
        let t = Instant::now();
        let r = run_true(&m.envd, true).await;
        shell.record(&r, t.elapsed());
        let t = Instant::now();
        let r = run_true(&m.envd, false).await;
        direct.record(&r, t.elapsed());
        let t = Instant::now();
        let r = m
            .envd
            .write_file("/tmp/bench.txt", data.clone(), Some("user"))
            .await
            .map_err(anyhow::Error::from);
        write.record(&r, t.elapsed());
        let t = Instant::now();
        let r = m
            .envd
            .read_file("/tmp/bench.txt", Some("user"))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|b| {
                if b == data {
                    Ok(())
                } else {
                    bail!("read back {} bytes, not what was written", b.len())
                }
            });
        read.record(&r, t.elapsed());
    }
    let meminfo = proc_meminfo_reads(&m.envd, runs * 10).await;
    target.kill(&m.id).await?;
    report.latency("proc_meminfo_read", &meminfo);
    report.latency("command_rtt_login_shell", &shell);
    report.latency("command_rtt_direct", &direct);
    report.latency("file_write_1k", &write);
    report.latency("file_read_1k", &read);
    Ok(())
}

/// Runs `f` over `items` with at most `parallel` in flight.
async fn for_each<T, F, Fut, R>(items: Vec<T>, parallel: usize, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send,
{
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let f = Arc::new(f);
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        let (permits, f) = (permits.clone(), f.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            f(item).await
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

/// Fills the host with idle sandboxes up to each count; at each: memory per sandbox, API and
/// command latency while they are alive. Then kills them all and looks for leftovers.
async fn density(
    target: &Target,
    plan: &Plan,
    parallel: usize,
    data_dir: Option<&Path>,
    report: &mut Report,
) {
    let mem0 = host::meminfo();
    let slab0 = host::slabinfo();
    let mut alive: Vec<Made> = Vec::new();
    let mut levels = Vec::new();
    let mut failed_creates = 0;
    let mut first_error: Option<String> = None;
    for &level in &plan.idle {
        let want = level.saturating_sub(alive.len());
        let t0 = Instant::now();
        let made = for_each(vec![(); want], parallel, {
            let target = target.clone();
            move |()| {
                let target = target.clone();
                async move {
                    let m = target.create(3600).await?;
                    run_true(&m.envd, false).await?;
                    anyhow::Ok(m)
                }
            }
        })
        .await;
        let fill_s = t0.elapsed().as_secs_f64();
        for r in made {
            match r {
                Ok(m) => alive.push(m),
                Err(e) => {
                    failed_creates += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        eprintln!(
            "bench:   {} idle sandboxes ({failed_creates} creates failed so far); settling",
            alive.len()
        );
        tokio::time::sleep(plan.settle).await;
        let mut l = measure_level(target, &alive, plan, &mem0, &slab0).await;
        l.insert("fill_s".into(), json!(fill_s));
        l.insert("failed_creates_so_far".into(), json!(failed_creates));
        levels.push(Value::Object(l));
    }
    let ids: Vec<String> = alive.iter().map(|m| m.id.clone()).collect();
    let t0 = Instant::now();
    let killed = for_each(ids.clone(), parallel, {
        let target = target.clone();
        move |id: String| {
            let target = target.clone();
            async move { target.kill(&id).await }
        }
    })
    .await;
    let kill_s = t0.elapsed().as_secs_f64();
    let failed_kills = killed.iter().filter(|r| r.is_err()).count();
    // Kill answers once everything is reclaimed; a moment for the kernel's own lazy frees.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leftovers = host::leftovers(&ids, data_dir);
    let mem_end = host::meminfo();
    report.set(
        "density",
        json!({
            "levels": levels,
            "failed_creates": failed_creates,
            "first_create_error": first_error,
            "kill_all_s": kill_s,
            "failed_kills": failed_kills,
            "leftovers": leftovers,
            "mem_available_kib_before": mem0.get("MemAvailable"),
            "mem_available_kib_after_kill": mem_end.get("MemAvailable"),
        }),
    );
}

async fn measure_level(
    target: &Target,
    alive: &[Made],
    plan: &Plan,
    mem0: &host::MemInfo,
    slab0: &std::collections::HashMap<String, u64>,
) -> serde_json::Map<String, Value> {
    let n = alive.len();
    let mem = host::meminfo();
    let slab = host::slabinfo();
    let mut kernel = serde_json::Map::new();
    for field in host::MEMINFO_FIELDS {
        let (before, after) = (
            mem0.get(*field).copied().unwrap_or(0),
            mem.get(*field).copied().unwrap_or(0),
        );
        let delta = if *field == "MemAvailable" || *field == "MemFree" {
            before.saturating_sub(after)
        } else {
            after.saturating_sub(before)
        };
        kernel.insert(
            format!("{field}_kib_per_sandbox"),
            json!(host::per(delta, n)),
        );
    }
    let ids: Vec<String> = alive.iter().map(|m| m.id.clone()).collect();
    let processes = host::sandbox_processes(&ids);
    let agents: Vec<host::ProcessMemory> = processes
        .values()
        .filter_map(|pids| host::process_memory(*pids.first()?))
        .collect();
    let cgroups: Vec<host::CgroupMemory> = processes
        .values()
        .filter_map(|pids| host::cgroup_memory(*pids.first()?))
        .collect();
    let avg = |v: &[u64]| host::per(v.iter().sum(), v.len());
    let extra_processes = processes
        .values()
        .map(|p| p.len().saturating_sub(1))
        .sum::<usize>();

    // API while they are all alive: list (first page of 100, as the SDK pages), info, a command.
    let mut list = Samples::default();
    let mut info = Samples::default();
    let mut cmd = Samples::default();
    for i in 0..plan.api_calls {
        let t = Instant::now();
        let r = target
            .rest
            .list(&ListFilter {
                limit: Some(100),
                ..Default::default()
            })
            .await
            .map_err(anyhow::Error::from);
        list.record(&r, t.elapsed());
        if let Some(m) = alive.get((i * 7919) % n.max(1)) {
            let t = Instant::now();
            let r = target.rest.get(&m.id).await.map_err(anyhow::Error::from);
            info.record(&r, t.elapsed());
            let t = Instant::now();
            let r = run_true(&m.envd, true).await;
            cmd.record(&r, t.elapsed());
        }
    }
    let t = Instant::now();
    let mut all = 0;
    let mut next = None;
    let full_list = loop {
        match target
            .rest
            .list(&ListFilter {
                limit: Some(100),
                next_token: next.take(),
                ..Default::default()
            })
            .await
        {
            Ok((page, token)) => {
                all += page.len();
                match token {
                    Some(t) => next = Some(t),
                    None => break Ok(all),
                }
            }
            Err(e) => break Err(e),
        }
    };
    let full_list_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut out = serde_json::Map::new();
    out.insert("sandboxes".into(), json!(n));
    out.insert(
        "mem_available_drop_kib_per_sandbox".into(),
        kernel
            .get("MemAvailable_kib_per_sandbox")
            .cloned()
            .unwrap_or(Value::Null),
    );
    out.insert("meminfo_deltas".into(), Value::Object(kernel));
    out.insert(
        "slab_growth_kib_per_sandbox".into(),
        json!(host::slab_growth(slab0, &slab, n, 12)),
    );
    out.insert(
        "cgroup_kib_per_sandbox".into(),
        json!({
            "groups": cgroups.len(),
            "charged": avg(&cgroups.iter().map(|c| c.charged).collect::<Vec<_>>()),
            "anon": avg(&cgroups.iter().map(|c| c.anon).collect::<Vec<_>>()),
            "file": avg(&cgroups.iter().map(|c| c.file).collect::<Vec<_>>()),
            "kernel": avg(&cgroups.iter().map(|c| c.kernel).collect::<Vec<_>>()),
        }),
    );
    out.insert(
        "agent_kib".into(),
        json!({
            "agents": agents.len(),
            "rss": avg(&agents.iter().map(|a| a.rss).collect::<Vec<_>>()),
            "pss": avg(&agents.iter().map(|a| a.pss).collect::<Vec<_>>()),
            "private": avg(&agents.iter().map(|a| a.private).collect::<Vec<_>>()),
        }),
    );
    out.insert("processes_besides_agents".into(), json!(extra_processes));
    out.insert("list_page_100".into(), list.json());
    out.insert("info".into(), info.json());
    out.insert("command_rtt_login_shell".into(), cmd.json());
    out.insert(
        "full_list".into(),
        json!({"ms": full_list_ms, "listed": full_list.ok()}),
    );
    out
}

/// bubblewrap, crun, runc and SoulBox's runtime, each running `true` in isolation.
async fn side_by_side(args: &BenchArgs, plan: &Plan, report: &mut Report) {
    let Some(rootfs) = peers::find_rootfs(args.rootfs.as_deref(), args.data_dir.as_deref()) else {
        report.set(
            "peers",
            json!({"skipped": "no rootfs (pass --rootfs or --data-dir, or set SOULBOX_BENCH_ROOTFS)"}),
        );
        return;
    };
    let mut out = serde_json::Map::new();
    out.insert("rootfs".into(), json!(rootfs));
    out.insert("runs".into(), json!(plan.peer_runs));
    let cold = peers::run_soulbox_cold(&rootfs, plan.peer_runs).await;
    let cold_p50 = cold
        .as_ref()
        .ok()
        .and_then(|t| Summary::of(t))
        .map(|s| s.p50);
    out.insert(
        "soulbox_runtime".into(),
        match &cold {
            Ok(t) => json!({"summary_ms": Summary::of(t),
                "what": "runtime create (namespaces, overlay, cgroups, seccomp, agent) + /bin/true via the agent + destroy"}),
            Err(e) => json!({"error": format!("{e:#}")}),
        },
    );
    for peer in peers::available() {
        let runs = plan.peer_runs;
        let name = peer.name;
        let rootfs = rootfs.clone();
        let result = tokio::task::spawn_blocking(move || peers::run_peer(name, &rootfs, runs))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        let entry = match result {
            Ok(t) => {
                let s = Summary::of(&t);
                let ratio = s.zip(cold_p50).map(|(s, c)| s.p50 / c);
                json!({"version": peer.version, "note": peer.note, "summary_ms": s,
                       "p50_ratio_to_soulbox_runtime": ratio})
            }
            Err(e) => json!({"version": peer.version, "error": format!("{e:#}")}),
        };
        out.insert(name.into(), entry);
    }
    report.set("peers", Value::Object(out));
}

/// The results, as JSON, and their table.
struct Report {
    root: serde_json::Map<String, Value>,
}

impl Report {
    fn new(args: &BenchArgs, plan: &Plan) -> Report {
        let mem = host::meminfo();
        let (load, tasks) = host::load();
        let mut root = serde_json::Map::new();
        root.insert(
            "mode".into(),
            json!(if args.short { "short" } else { "full" }),
        );
        root.insert("template".into(), json!(args.template));
        root.insert(
            "host".into(),
            json!({
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "mem_total_kib": mem.get("MemTotal"),
                "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
                "load_1m_before": load,
                "tasks_before": tasks,
            }),
        );
        root.insert(
            "plan".into(),
            json!({"runs": plan.runs, "concurrency": plan.concurrency, "idle": plan.idle,
                   "settle_s": plan.settle.as_secs(), "peer_runs": plan.peer_runs,
                   "rtt_runs": plan.rtt_runs, "api_calls": plan.api_calls}),
        );
        Report { root }
    }

    fn set(&mut self, key: &str, value: Value) {
        self.root.insert(key.into(), value);
    }

    fn latency(&mut self, key: &str, s: &Samples) {
        let entry = self.root.entry("latency").or_insert_with(|| json!({}));
        if let Some(map) = entry.as_object_mut() {
            map.insert(key.into(), s.json());
        }
    }

    fn finish_host(&mut self) {
        let (load, tasks) = host::load();
        if let Some(h) = self.root.get_mut("host").and_then(Value::as_object_mut) {
            h.insert("load_1m_after".into(), json!(load));
            h.insert("tasks_after".into(), json!(tasks));
        }
    }

    fn get(&self, path: &[&str]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        rest.iter()
            .try_fold(self.root.get(*first)?, |v, k| v.get(*k))
    }

    fn num(&self, path: &[&str]) -> Option<f64> {
        self.get(path)?.as_f64()
    }

    /// What went wrong during the run (failed attempts, leftovers): a benchmark that only
    /// prints them would let CI's short run pass on a broken server.
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(lat) = self.get(&["latency"]).and_then(Value::as_object) {
            for (name, v) in lat {
                let n = v.get("failures").and_then(Value::as_u64).unwrap_or(0);
                if n > 0 {
                    let first = v.get("first_error").and_then(Value::as_str).unwrap_or("?");
                    out.push(format!("{name}: {n} failed (first: {first})"));
                }
            }
        }
        for key in ["failed_creates", "failed_kills"] {
            let n = self.num(&["density", key]).unwrap_or(0.0);
            if n > 0.0 {
                out.push(format!("density: {key} {n}"));
            }
        }
        if let Some(left) = self.get(&["density", "leftovers"])
            && left.as_array().is_some_and(|a| !a.is_empty())
        {
            out.push(format!("density: leftovers {left}"));
        }
        // A peer that is installed but cannot run makes the comparison meaningless.
        if let Some(peers) = self.get(&["peers"]).and_then(Value::as_object) {
            for (name, v) in peers {
                if let Some(e) = v.get("error").and_then(Value::as_str) {
                    out.push(format!("peer {name}: {e}"));
                }
            }
        }
        out
    }

    /// The human-readable table.
    fn table(&self) -> String {
        let mut t = String::new();
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let k = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        t.push_str(&format!(
            "\nSoulBox bench ({} mode, template {}): {} CPUs, load {} → {}\n",
            self.get(&["mode"]).and_then(Value::as_str).unwrap_or("?"),
            self.get(&["template"])
                .and_then(Value::as_str)
                .unwrap_or("?"),
            k(self.num(&["host", "cpus"])),
            f(self.num(&["host", "load_1m_before"])),
            f(self.num(&["host", "load_1m_after"])),
        ));
        t.push_str(&format!(
            "\n{:<40} {:>5} {:>9} {:>9} {:>9} {:>9} {:>6}\n",
            "latency (ms)", "n", "p50", "p90", "p99", "max", "fail"
        ));
        let rows = [
            (
                "create_to_first_command",
                "create → first command (sequential)",
            ),
            ("create", "  create"),
            ("first_command", "  first command"),
            (
                "create_to_first_command_concurrent",
                "create → first command (concurrent)",
            ),
            ("create_concurrent", "  create"),
            ("command_rtt_login_shell", "command RTT (bash -l -c true)"),
            ("command_rtt_direct", "command RTT (/bin/true)"),
            ("file_write_1k", "file write 1 KiB"),
            ("file_read_1k", "file read 1 KiB"),
            ("proc_meminfo_read", "read /proc/meminfo (in the sandbox)"),
            ("pause_full_small", "pause full (small)"),
            (
                "resume_full_to_first_command_small",
                "  resume → first command",
            ),
            ("pause_filesystem_small", "pause filesystem (small)"),
            (
                "resume_filesystem_to_first_command_small",
                "  resume (boot) → first command",
            ),
            ("pause_full_large", "pause full (384 MiB held)"),
            (
                "resume_full_to_first_command_large",
                "  resume → first command",
            ),
            ("pause_filesystem_large", "pause filesystem (384 MiB held)"),
            (
                "resume_filesystem_to_first_command_large",
                "  resume (boot) → first command",
            ),
            ("snapshot_small", "snapshot (small)"),
            (
                "create_from_snapshot_to_first_command",
                "  create from it → first command",
            ),
        ];
        for (key, label) in rows {
            let s = |field: &str| self.num(&["latency", key, "summary_ms", field]);
            t.push_str(&format!(
                "{label:<40} {:>5} {:>9} {:>9} {:>9} {:>9} {:>6}\n",
                k(s("n")),
                f(s("p50")),
                f(s("p90")),
                f(s("p99")),
                f(s("max")),
                k(self.num(&["latency", key, "failures"])),
            ));
        }
        if let Some(levels) = self.get(&["density", "levels"]).and_then(Value::as_array) {
            t.push_str(&format!("\n{:<40}", "idle sandboxes"));
            for l in levels {
                t.push_str(&format!(" {:>12}", k(l["sandboxes"].as_f64())));
            }
            t.push('\n');
            let level_rows: [(&str, &[&str], bool); 14] = [
                (
                    "MemAvailable drop / sandbox (KiB)",
                    &["mem_available_drop_kib_per_sandbox"],
                    false,
                ),
                (
                    "cgroup charged / sandbox (KiB)",
                    &["cgroup_kib_per_sandbox", "charged"],
                    false,
                ),
                ("  anon", &["cgroup_kib_per_sandbox", "anon"], false),
                ("  page cache", &["cgroup_kib_per_sandbox", "file"], false),
                ("  kernel", &["cgroup_kib_per_sandbox", "kernel"], false),
                ("agent RSS (KiB)", &["agent_kib", "rss"], false),
                ("agent PSS (KiB)", &["agent_kib", "pss"], false),
                ("agent private (KiB)", &["agent_kib", "private"], false),
                (
                    "host slab / sandbox (KiB)",
                    &["meminfo_deltas", "Slab_kib_per_sandbox"],
                    false,
                ),
                (
                    "host page tables / sandbox (KiB)",
                    &["meminfo_deltas", "PageTables_kib_per_sandbox"],
                    false,
                ),
                (
                    "host kernel stacks / sandbox (KiB)",
                    &["meminfo_deltas", "KernelStack_kib_per_sandbox"],
                    false,
                ),
                (
                    "list (100/page) p99 (ms)",
                    &["list_page_100", "summary_ms", "p99"],
                    true,
                ),
                ("info p99 (ms)", &["info", "summary_ms", "p99"], true),
                (
                    "command RTT p50 (ms)",
                    &["command_rtt_login_shell", "summary_ms", "p50"],
                    true,
                ),
            ];
            for (label, path, ms) in level_rows {
                t.push_str(&format!("{label:<40}"));
                for l in levels {
                    let v = path
                        .iter()
                        .try_fold(l, |v, p| v.get(*p))
                        .and_then(Value::as_f64);
                    t.push_str(&format!(" {:>12}", if ms { f(v) } else { k(v) }));
                }
                t.push('\n');
            }
            t.push_str(&format!(
                "killed all in {} s; failed creates {}, failed kills {}, leftovers {}\n",
                f(self.num(&["density", "kill_all_s"])),
                k(self.num(&["density", "failed_creates"])),
                k(self.num(&["density", "failed_kills"])),
                self.get(&["density", "leftovers"])
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len),
            ));
        }
        if let Some(peers) = self.get(&["peers"]).and_then(Value::as_object) {
            t.push_str(&format!(
                "\n{:<40} {:>9} {:>9} {:>9} {:>10}\n",
                "isolated `true`, start to exit (ms)", "p50", "p90", "p99", "p50 ratio"
            ));
            if let Some(skipped) = peers.get("skipped").and_then(Value::as_str) {
                t.push_str(&format!("  skipped: {skipped}\n"));
            }
            for name in ["soulbox_runtime", "bwrap", "crun", "runc"] {
                let Some(p) = peers.get(name) else { continue };
                if let Some(e) = p.get("error").and_then(Value::as_str) {
                    t.push_str(&format!("{name:<40} error: {e}\n"));
                    continue;
                }
                let s = |field: &str| {
                    p.get("summary_ms")
                        .and_then(|s| s.get(field))
                        .and_then(Value::as_f64)
                };
                let ratio = p
                    .get("p50_ratio_to_soulbox_runtime")
                    .and_then(Value::as_f64);
                t.push_str(&format!(
                    "{name:<40} {:>9} {:>9} {:>9} {:>10}\n",
                    f(s("p50")),
                    f(s("p90")),
                    f(s("p99")),
                    ratio.map_or_else(|| "1.00 (ref)".to_owned(), |r| format!("{r:.2}x")),
                ));
            }
        }
        if let Some(pools) = self.get(&["pools_after"]).and_then(Value::as_array) {
            for p in pools {
                t.push_str(&format!(
                    "pool {}: {} hits, {} cold, {} lost, {} idle now\n",
                    p["template"].as_str().unwrap_or("?"),
                    p["hits"],
                    p["misses"],
                    p["lost"],
                    p["idle"].as_array().map_or(0, Vec::len),
                ));
            }
        }
        if let Some(p) = self.get(&["pool_before_burst"]).filter(|p| !p.is_null()) {
            t.push_str(&format!(
                "pool {} before the concurrent burst: {} idle (max {})\n",
                p["template"].as_str().unwrap_or("?"),
                p["idle"].as_array().map_or(0, Vec::len),
                p["max"],
            ));
        }
        t
    }
}
