//! The `soulbox` binary: `serve`, the CLI, and `agent` (PID 1 inside every sandbox).

fn main() -> anyhow::Result<()> {
    Ok(())
}
