//! The `soulbox` binary: `serve`, the CLI, and `agent` (PID 1 inside every sandbox).

mod agent;
mod bench;
mod domain;
mod down;
mod interpreter;
mod sandbox;
mod sandbox_exec;
mod serve;
mod server_args;
mod snapshot;
mod template;
mod volume;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "soulbox",
    version,
    about = "Self-hosted, E2B-compatible sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane and the sandbox gateway.
    Serve(serve::ServeArgs),
    /// Run the in-sandbox agent (PID 1 of every sandbox).
    Agent(agent::AgentArgs),
    /// Manage sandboxes on a running server.
    Sandbox(sandbox::SandboxArgs),
    /// Run the code interpreter service (inside a code-interpreter sandbox).
    Interpreter(interpreter::InterpreterArgs),
    /// Build and manage templates on a running server.
    Template(template::TemplateArgs),
    /// Manage volumes and their files on a running server.
    Volume(volume::VolumeArgs),
    /// List and delete snapshots on a running server.
    Snapshot(snapshot::SnapshotArgs),
    /// Measure a running server: latency, idle density, and peers side by side.
    Bench(bench::BenchArgs),
    /// Take a stopped server's sandboxes, network objects and disk mount off the host.
    Down(down::DownArgs),
}

/// The async runtime a command runs on: all cores for `serve` and `bench`, one thread for the
/// rest.
fn async_runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Logs to stderr, filtered by `RUST_LOG` or else `default_filter`.
fn init_logging(default_filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the command; an error is printed as its chain of causes (without the backtrace anyhow
/// captures when `RUST_BACKTRACE` is set, which buried the one line that mattered).
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Sandbox(args) => sandbox::run(args),
        Command::Interpreter(args) => interpreter::run(args),
        Command::Template(args) => template::run(args),
        Command::Volume(args) => volume::run(args),
        Command::Snapshot(args) => snapshot::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Down(args) => down::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
