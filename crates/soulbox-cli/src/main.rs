//! The `soulbox` binary: `serve`, the CLI, and `agent` (PID 1 inside every sandbox).

mod agent;
mod bench;
mod domain;
mod interpreter;
mod sandbox;
mod sandbox_exec;
mod serve;
mod template;

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
    /// Measure a running server: latency, idle density, and peers side by side.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Sandbox(args) => sandbox::run(args),
        Command::Interpreter(args) => interpreter::run(args),
        Command::Template(args) => template::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
